# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- the cluster's deploy lock ----------------------------------------------------------------
# With its heartbeat. Its own globals: the lock_* fields of the lease read last (read_lock).
# Sets lock_held, lock_version, lock_taken_at, heartbeat_pid (lock_duration comes from the
# entry points).
#
# One deploy at a time per cluster, whichever server it reaches: a Lease in kube-system. Taking
# it is `kubectl create` (the API server refuses a second create: atomic); taking over a lease
# that expired, was released, or belongs to this deploy id with its process gone is `kubectl
# replace` with the resourceVersion just read (refused with a Conflict if anyone changed it in
# between); releasing it is the same replace with no holder (client-go's leader election does
# the same). The lease lasts the longest run the action allows the command from its last
# renewal, and the heartbeat renews it while this process lives, so only a holder that died
# lets it expire.

# Sets REPLY to the Lease manifest naming holder $1 ("" releases it), for resourceVersion $2
# ("" to create it); $3 is when it was taken (a renewal keeps it), else now.
lease_manifest() {
  local holder=$1 version=$2 now duration=1 text
  now=$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)
  lock_taken_at=${3:-$now}
  text="apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: $LOCK_NAME
  namespace: $LOCK_NAMESPACE"
  if [[ -n "$version" ]]; then
    text+=$'\n'"  resourceVersion: \"$version\""
  fi
  if [[ -n "$holder" ]]; then
    duration=$lock_duration
    text+=$'\n'"  annotations:"
    json_string "${HOSTNAME:-unknown}/$$"
    text+=$'\n'"    $ANNOTATION_PREFIX/holder-process: $REPLY"
    json_string "$run_url"
    text+=$'\n'"    $ANNOTATION_PREFIX/run-url: $REPLY"
    json_string "$commit"
    text+=$'\n'"    $ANNOTATION_PREFIX/commit-sha: $REPLY"
  fi
  json_string "$holder"
  text+="
spec:
  holderIdentity: $REPLY
  acquireTime: \"$lock_taken_at\"
  renewTime: \"$now\"
  leaseDurationSeconds: $duration"
  REPLY=$text
}

# Reads the lock into lock_* variables. Returns 1 when there is no lock, 2 when it cannot be
# read.
lock_version_seen=""
lock_holder=""
lock_acquired=""
lock_renewed=""
lock_seconds=""
lock_process=""
lock_run_url=""
read_lock() {
  local output
  if ! kube_capture get lease "$LOCK_NAME" -n "$LOCK_NAMESPACE" --ignore-not-found \
    --request-timeout="$request_timeout" -o "jsonpath=$LOCK_TEMPLATE"; then
    REPLY=$KUBE_ERR
    return 2
  fi
  output=$REPLY
  if [[ -z "$output" ]]; then
    return 1
  fi
  IFS='|' read -r lock_version_seen lock_holder lock_acquired lock_renewed lock_seconds \
    lock_process lock_run_url <<<"$output"
  return 0
}

# True when the lock read last may be taken over: released (no holder), expired, or held by
# this same deploy id whose process is gone (a rollback after the deploy was killed).
lock_is_free() {
  local renewed_at now
  if [[ -z "$lock_holder" ]]; then
    return 0
  fi
  if [[ "$lock_holder" == "$deploy_id" ]] && ! holder_process_alive; then
    return 0
  fi
  # `date -d ""` succeeds (midnight today): only a time that is there counts.
  if [[ ! "$lock_renewed" =~ $LEASE_TIME_PATTERN || ! "$lock_seconds" =~ ^[0-9]{1,9}$ ]] ||
    ! renewed_at=$(date -u -d "$lock_renewed" +%s 2>/dev/null); then
    return 1 # no expiry to go by: never steal it
  fi
  now=$(date +%s)
  ((now > renewed_at + lock_seconds))
}

# True unless the lock's holder process is known to be gone. Only a process on this machine
# can be checked; after a reboot its PID may belong to anything, so it must run this script.
holder_process_alive() {
  local host=${lock_process%/*} pid=${lock_process##*/} arg cmdline=""
  if [[ -z "$lock_process" || "$host" != "${HOSTNAME:-unknown}" ]]; then
    return 0 # another machine's process: cannot tell, assume it runs
  fi
  if [[ ! "$pid" =~ ^[0-9]+$ ]] || { ! kill -0 "$pid" 2>/dev/null && [[ ! -d "/proc/$pid" ]]; }; then
    return 1
  fi
  if [[ ! -r "/proc/$pid/cmdline" ]]; then
    return 0 # no /proc to ask: trust the PID
  fi
  while IFS= read -r -d '' arg; do
    cmdline+="$arg "
  done <"/proc/$pid/cmdline"
  [[ "$cmdline" == *k3s-deploy* ]]
}

# Describes the holder of the lock read last.
lock_holder_text() {
  local expires="unknown" renewed_at
  if [[ "$lock_renewed" =~ $LEASE_TIME_PATTERN && "$lock_seconds" =~ ^[0-9]{1,9}$ ]] &&
    renewed_at=$(date -u -d "$lock_renewed" +%s 2>/dev/null); then
    expires=$(date -u -d "@$((renewed_at + lock_seconds))" +%Y-%m-%dT%H:%M:%SZ)
  fi
  printf 'deploy %s%s since %s (lease expires %s)' "${lock_holder:-?}" \
    "${lock_run_url:+ of $lock_run_url}" "${lock_acquired:-?}" "$expires"
}

acquire_lock() {
  local started output rc waited_logged=false left
  step=lock
  started=$(date +%s)
  log "==> taking the cluster's deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME)"
  while :; do
    lease_manifest "$deploy_id" ""
    rc=0
    printf '%s\n' "$REPLY" >"$work_dir/lease.yaml"
    kube_capture create -f "$work_dir/lease.yaml" --request-timeout="$request_timeout" \
      -o 'jsonpath={.metadata.resourceVersion}' || rc=$?
    output=$REPLY
    if ((rc == 0)) && [[ "$output" =~ ^[0-9]+$ ]]; then
      lock_version=$output
      lock_held=true
      log "lock taken: holder $deploy_id, lease ${lock_duration}s, renewed every ${LEASE_RENEW_SECONDS}s"
      start_heartbeat
      return 0
    fi
    output=${KUBE_ERR:-$output}
    if [[ "$output" != *AlreadyExists* ]]; then
      fail_early 4 lock "could not create the deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME): $(first_line "$output")"
    fi
    rc=0
    read_lock || rc=$?
    if ((rc == 1)); then
      continue # released and deleted in between: create it again
    elif ((rc == 2)); then
      fail_early 4 lock "could not read the deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME): $(first_line "$REPLY")"
    fi
    if lock_is_free; then
      if take_over_lock; then
        return 0
      fi
      continue # someone else changed it first: look again
    fi
    left=$((started + lock_timeout_seconds - $(date +%s)))
    if ((left <= 0)); then
      fail_early 6 lock "another deploy holds the cluster's deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME): $(lock_holder_text); waited ${lock_timeout_seconds}s (input lock-timeout)"
    fi
    if [[ "$waited_logged" != true ]]; then
      log "waiting up to ${lock_timeout_seconds}s for the deploy lock: held by $(lock_holder_text)"
      waited_logged=true
    fi
    sleep "$((left < LOCK_POLL_SECONDS ? left : LOCK_POLL_SECONDS))"
  done
}

# Replaces the lease read last (conditional on its resourceVersion). 1 when that failed.
take_over_lock() {
  local output previous
  if [[ ! "$lock_version_seen" =~ ^[A-Za-z0-9]+$ ]]; then
    fail_early 4 lock "the deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME) has no usable resourceVersion ('$lock_version_seen')"
  fi
  if [[ -z "$lock_holder" ]]; then
    previous="released"
  elif [[ "$lock_holder" == "$deploy_id" ]]; then
    previous="left by this deploy's own process ($lock_process), which is gone"
  else
    previous="held by $(lock_holder_text), expired"
  fi
  lease_manifest "$deploy_id" "$lock_version_seen"
  printf '%s\n' "$REPLY" >"$work_dir/lease.yaml"
  if kube_capture replace -f "$work_dir/lease.yaml" --request-timeout="$request_timeout" \
    -o 'jsonpath={.metadata.resourceVersion}' && [[ "$REPLY" =~ ^[0-9]+$ ]]; then
    lock_version=$REPLY
    lock_held=true
    log "lock taken over (it was $previous): holder $deploy_id, lease ${lock_duration}s, renewed every ${LEASE_RENEW_SECONDS}s"
    start_heartbeat
    return 0
  fi
  output=${KUBE_ERR:-$REPLY}
  if [[ "$output" == *Conflict* || "$output" == *NotFound* ]]; then
    log "the lock changed while it was being taken over; looking again"
    return 1
  fi
  fail_early 4 lock "could not take over the deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME): $(first_line "$output")"
}

# The heartbeat: a subshell of this process, so in its process group (SSM's kill of the group
# stops it too), that renews the lease every LEASE_RENEW_SECONDS while this process lives and
# owns the lease's resourceVersion from then on: each renewal is a replace conditional on the
# version the one before got, which it writes to $work_dir/lock-version for release_lock. A
# renewal refused with a Conflict or NotFound means someone else took the lease: it writes
# $work_dir/lock-lost and stops, and this deploy changes nothing more (lock_still_ours).
start_heartbeat() {
  local main_pid=$$
  printf '%s' "$lock_version" >"$work_dir/lock-version"
  rm -f -- "$work_dir/heartbeat.stop" "$work_dir/lock-lost"
  (
    trap - EXIT INT TERM HUP
    kube_err_file="$work_dir/heartbeat.err"
    version=$lock_version
    while :; do
      for ((tick = 0; tick < LEASE_RENEW_SECONDS; tick++)); do
        sleep 1
        if [[ -e "$work_dir/heartbeat.stop" ]] || ! kill -0 "$main_pid" 2>/dev/null; then
          exit 0
        fi
      done
      lease_manifest "$deploy_id" "$version" "$lock_taken_at"
      printf '%s\n' "$REPLY" >"$work_dir/heartbeat.yaml"
      if kube_capture replace -f "$work_dir/heartbeat.yaml" --request-timeout="$request_timeout" \
        -o 'jsonpath={.metadata.resourceVersion}' && [[ "$REPLY" =~ ^[0-9]+$ ]]; then
        version=$REPLY
        printf '%s' "$version" >"$work_dir/lock-version.tmp" &&
          mv -f -- "$work_dir/lock-version.tmp" "$work_dir/lock-version"
      elif [[ "$KUBE_ERR" == *Conflict* || "$KUBE_ERR" == *NotFound* ]]; then
        log "the deploy lock was taken by someone else (its lease changed under the heartbeat)"
        printf 'lost\n' >"$work_dir/lock-lost"
        exit 0
      fi # anything else (a slow API): try again at the next beat
    done
  ) &
  heartbeat_pid=$!
}

# Stops the heartbeat (at its next second, or at once after 3 s) and takes back the
# resourceVersion it owned.
# shellcheck disable=SC2329 # called by cleanup and release_lock (the EXIT trap)
stop_heartbeat() {
  local waited
  if [[ -z "$heartbeat_pid" ]]; then
    return 0
  fi
  : >"$work_dir/heartbeat.stop" 2>/dev/null || true
  for ((waited = 0; waited < 30; waited++)); do
    kill -0 "$heartbeat_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$heartbeat_pid" 2>/dev/null || true
  wait "$heartbeat_pid" 2>/dev/null || true
  heartbeat_pid=""
  if [[ -r "$work_dir/lock-version" ]] && [[ "$(<"$work_dir/lock-version")" =~ ^[0-9]+$ ]]; then
    lock_version=$(<"$work_dir/lock-version")
  fi
}

# True while the lease is this deploy's: the heartbeat has not seen it taken, and (with
# "read") the lease read now names this deploy and this process.
lock_still_ours() {
  if [[ "$lock_held" != true || -e "$work_dir/lock-lost" ]]; then
    return 1
  fi
  if [[ "${1:-}" == read ]]; then
    read_lock || return 1
    [[ "$lock_holder" == "$deploy_id" && "$lock_process" == "${HOSTNAME:-unknown}/$$" ]] || return 1
  fi
}

# shellcheck disable=SC2329 # called by cleanup (the EXIT trap)
release_lock() {
  local output try
  stop_heartbeat
  lock_held=false
  for try in 1 2 3; do
    lease_manifest "" "$lock_version"
    # A short request timeout: this may run while the job is being cancelled.
    printf '%s\n' "$REPLY" >"$work_dir/lease.yaml"
    if kube_capture replace -f "$work_dir/lease.yaml" --request-timeout=10s -o name; then
      log "deploy lock released"
      return 0
    fi
    output=${KUBE_ERR:-$REPLY}
    # A renewal that was in flight when the heartbeat stopped moved the version on: still
    # this process's lease, so release it at the version it has now.
    if [[ "$output" == *Conflict* ]] && ((try < 3)) && [[ ! -e "$work_dir/lock-lost" ]] &&
      read_lock && [[ "$lock_holder" == "$deploy_id" &&
      "$lock_process" == "${HOSTNAME:-unknown}/$$" && "$lock_version_seen" =~ ^[0-9]+$ ]]; then
      lock_version=$lock_version_seen
      continue
    fi
    break
  done
  if [[ "$output" == *Conflict* || "$output" == *NotFound* ]]; then
    log "warning: the deploy lock changed hands during this run; left as it is"
  else
    log "warning: could not release the deploy lock ($(first_line "$output")); it expires by itself ${lock_duration}s after it was taken"
  fi
}
