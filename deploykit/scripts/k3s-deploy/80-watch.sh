# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- waiting for rollouts, failing fast -------------------------------------------------------
# Then the health check. Sets wl_uid, wl_outcome, wl_after, fail_reason and failure_*.

# Prints the UIDs of the controllers that own workload $1's pods: the StatefulSet's or the
# DaemonSet's own (they own their pods directly), or those of the Deployment's ReplicaSets.
# UIDs are the API server's own (immutable, made by it), so pods are selected by them and
# never by parsing who they say owns them.
workload_owner_uids() {
  local i=$1 uid listing line
  workload_ns_args "$i"
  uid=${wl_uid[i]:-}
  if [[ -z "$uid" ]]; then
    uid=$(kube get "${wl_kind[i]}" "${wl_name[i]}" "${ns_args[@]}" --ignore-not-found \
      --request-timeout="$request_timeout" -o 'jsonpath={.metadata.uid}' 2>/dev/null) || return 0
    if [[ ! "$uid" =~ $UID_PATTERN ]]; then
      return 0
    fi
    wl_uid[i]=$uid
  fi
  if [[ "${wl_kind[i]}" != deployment ]]; then
    printf '%s\n' "$uid"
    return 0
  fi
  listing=$(kube get replicasets "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath={range .items[?(@.metadata.ownerReferences[0].uid==\"$uid\")]}{.metadata.uid}{\"\\n\"}{end}" \
    2>/dev/null) || return 0
  while IFS= read -r line; do
    if [[ "$line" =~ $UID_PATTERN ]]; then
      printf '%s\n' "$line"
    fi
  done <<<"$listing"
}

# Prints the pods of workload $1, one "POD|CREATED|REVISION|DELETING|PHASE|READINESS|RESTARTS|
# REASONS" line each (REASONS: init containers' then containers' waiting reasons, space-
# separated). Every field is checked against what it must be; a pod whose line does not pass
# (status text no kubelet writes) is printed as "POD?|" when its name can be told, else "?|":
# the callers count such a pod as unhealthy, never as data.
workload_pods() {
  local uids
  uids=$(workload_owner_uids "$1")
  workload_ns_args "$1"
  owned_pods "$uids"
}

# Prints, as workload_pods does, the pods in the namespace of ns_args owned by the UIDs in $1
# (one per line).
owned_pods() {
  local uid template="" listing line pod
  while IFS= read -r uid; do
    if [[ "$uid" =~ $UID_PATTERN ]]; then
      template+="{range .items[?(@.metadata.ownerReferences[0].uid==\"$uid\")]}$POD_LINE_TEMPLATE{end}"
    fi
  done <<<"$1"
  if [[ -z "$template" ]]; then
    return 0
  fi
  listing=$(kube get pods "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath=$template" 2>/dev/null) || return 0
  while IFS= read -r line; do
    if [[ -z "$line" ]]; then
      continue
    fi
    if [[ "$line" =~ $POD_LINE_PATTERN ]]; then
      printf '%s\n' "$line"
    else
      pod=${line%%|*}
      if [[ ! "$pod" =~ $DNS_NAME_PATTERN ]]; then
        pod=""
      fi
      printf '%s?|\n' "$pod"
    fi
  done <<<"$listing"
}

# Prints "POD REASON" for the pods of workload $1 created since $2 ("" = all) that wait for a
# reason that will not clear by itself.
stuck_pods() {
  local i=$1 since=$2 pod created revision deleting phase readiness restarts reasons
  local reason reason_list restart_list max_restarts count
  while IFS='|' read -r pod created revision deleting phase readiness restarts reasons; do
    if [[ "$pod" == *\? || -n "$deleting" ]] ||
      { [[ -n "$since" ]] && [[ "$created" < "$since" ]]; }; then
      continue # an unreadable pod is for the health check; a leaving one does not count
    fi
    read -r -a restart_list <<<"$restarts"
    max_restarts=0
    for count in "${restart_list[@]}"; do
      if ((count > max_restarts)); then
        max_restarts=$count
      fi
    done
    read -r -a reason_list <<<"$reasons"
    for reason in "${reason_list[@]}"; do
      if [[ "$FATAL_WAITING_REASONS" != *" $reason "* ]]; then
        continue
      fi
      if [[ "$reason" != CrashLoopBackOff ]] || ((max_restarts >= CRASH_LOOP_MIN_RESTARTS)); then
        printf '%s %s\n' "$pod" "$reason"
        break
      fi
    done
  done < <(workload_pods "$i")
  return 0
}

# Prints "POD WHAT" for each pod of workload $1 that is not healthy: not Running, not Ready,
# or with a container waiting in a back-off. Pods on their way out do not count, nor pods that
# have ended (phase Failed or Succeeded: evicted, or stopped with their node; they stay until
# pod garbage collection, and their controller has already replaced them).
unhealthy_pods() {
  local i=$1 pod created revision deleting phase readiness restarts reasons reason
  while IFS='|' read -r pod created revision deleting phase readiness restarts reasons; do
    if [[ "$pod" == *\? || "$pod" == "" ]]; then
      printf '%s has a status this script cannot read\n' "${pod:-a pod}"
      continue
    fi
    if [[ -n "$deleting" || "$phase" == Failed || "$phase" == Succeeded ]]; then
      continue
    fi
    for reason in $reasons; do
      if [[ "$FATAL_WAITING_REASONS" == *" $reason "* ]]; then
        printf '%s waiting with %s\n' "$pod" "$reason"
        continue 2
      fi
    done
    if [[ "$phase" != Running ]]; then
      printf '%s in phase %s%s\n' "$pod" "${phase:-unknown}" "${reasons:+ (${reasons# })}"
    elif [[ -z "$readiness" || " $readiness " == *" false "* ]]; then
      printf '%s not ready%s\n' "$pod" "${reasons:+ (${reasons# })}"
    fi
  done < <(workload_pods "$i")
  return 0
}

# Prints "POD" of a pod of workload $1 created since $2 that is not ready, if any.
first_unready_pod() {
  local i=$1 since=$2 pod created revision deleting phase readiness restarts reasons
  while IFS='|' read -r pod created revision deleting phase readiness restarts reasons; do
    if [[ "$pod" == *\? || -z "$pod" || "$phase" == Failed || "$phase" == Succeeded ]]; then
      continue
    fi
    if [[ -z "$deleting" ]] && { [[ -z "$since" ]] || [[ ! "$created" < "$since" ]]; } &&
      [[ " $readiness " == *" false "* || -z "$readiness" ]]; then
      printf '%s' "$pod"
      return 0
    fi
  done < <(workload_pods "$i")
  return 0
}

# Fills the failure_* fields for pod $2 of workload $1: the container that fails (preferring
# reason $3), its reason and message, and the end of its log (the previous container's for a
# crash loop; none for an image that was never pulled). Prints what it found.
describe_failure() {
  local i=$1 pod=$2 wanted=${3:-} listing name restarts reason msg output line score best=0
  local chosen_name="" chosen_reason="" chosen_message="" logs_args=() which=""
  workload_ns_args "$i"
  listing=$(kube get pod "$pod" "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath=$CONTAINER_TEMPLATE" 2>/dev/null) || listing=""
  while IFS='|' read -r name restarts reason msg; do
    if [[ ! "$name" =~ $DNS_LABEL_PATTERN || ! "$restarts" =~ ^[0-9]{1,9}$ ||
      ! "$reason" =~ ^[A-Za-z]*$ ]]; then
      continue # a continuation line of a message with newlines
    fi
    # The container waiting with the reason asked for, else with a fatal reason, else with
    # any reason, else the first one.
    if [[ -n "$wanted" && "$reason" == "$wanted" ]]; then
      score=4
    elif [[ -n "$reason" && "$FATAL_WAITING_REASONS" == *" $reason "* ]]; then
      score=3
    elif [[ -n "$reason" ]]; then
      score=2
    else
      score=1
    fi
    if ((score > best)); then
      best=$score
      chosen_name=$name
      chosen_reason=$reason
      chosen_message=$msg
    fi
  done <<<"$listing"
  failure_workload="${wl_kind[i]}/${wl_name[i]}"
  failure_namespace=${wl_ns[i]}
  failure_pod=$pod
  failure_container=$chosen_name
  failure_reason=${chosen_reason:-${wanted:-NotReady}}
  failure_message=$chosen_message
  failure_log=()
  log "pod $pod, container ${chosen_name:-?}: $failure_reason${chosen_message:+: $chosen_message}"
  if [[ -z "$chosen_name" || "$PULL_REASONS" == *" $failure_reason "* ]] ||
    [[ "$FATAL_WAITING_REASONS" != *" $failure_reason "* ]]; then
    return 0 # never started (no image, still creating): no log
  fi
  logs_args=("$pod" "${ns_args[@]}" -c "$chosen_name" --tail="$LOG_TAIL_LINES"
    --request-timeout="$request_timeout")
  if [[ "$failure_reason" == CrashLoopBackOff ]]; then
    logs_args+=(--previous)
    which=" (the container that crashed)"
  fi
  if kube_capture logs "${logs_args[@]}"; then
    output=$REPLY
    if [[ -z "$output" ]]; then
      log "its log$which is empty"
      return 0
    fi
    log "last lines of its log$which:"
    while IFS= read -r line; do
      failure_log+=("$line")
      log "  | $line"
    done <<<"$output"
  else
    failure_log=("(no log: $(first_line "$KUBE_ERR"))")
    log "no log: $(first_line "$KUBE_ERR")"
  fi
}

# The failure text for the report's message: workload, pod, container, reason, message and the
# log's last line.
failure_text() {
  local text
  text="$(workload_text "$1"): pod $failure_pod"
  text+="${failure_container:+, container $failure_container}: $failure_reason"
  if [[ -n "$failure_message" ]]; then
    truncate_text 300 "$failure_message"
    text+=" ($REPLY)"
  fi
  if ((${#failure_log[@]} > 0)) && [[ "${failure_log[-1]}" != "(no log: "* ]]; then
    truncate_text 300 "${failure_log[-1]}"
    text+="; log ends: $REPLY"
  fi
  printf '%s' "$text"
}

# Waits for workload $1 until the epoch second $2. Returns 0 when rolled out, 1 when it failed
# (fail_reason says why), 2 when the time ran out.
wait_for_rollout() {
  local i=$1 until=$2 target left slice output rc stuck previous_stuck="" line last_line="" pod
  target="${wl_kind[i]}/${wl_name[i]}"
  workload_ns_args "$i"
  log "==> waiting for $(workload_text "$i")"
  while :; do
    if ! lock_still_ours; then
      fail_reason="the deploy lock was taken by someone else while waiting for $(workload_text "$i"); this deploy stops here"
      return 1
    fi
    left=$((until - $(date +%s)))
    if ((left <= 0)); then
      fail_reason="$(workload_text "$i") was not ready in time ($(rollout_summary "$i"))"
      pod=$(first_unready_pod "$i" "${wl_since[i]}")
      if [[ -n "$pod" ]]; then
        describe_failure "$i" "$pod"
        fail_reason+="; $(failure_text "$i")"
      fi
      return 2
    fi
    slice=$((left < FAIL_FAST_CHECK_SECONDS ? left : FAIL_FAST_CHECK_SECONDS))
    rc=0
    # --timeout bounds the wait, not a request to a stalled API server: `timeout` bounds both.
    output=$(timeout --foreground --kill-after=5 "$((slice + 10))" "${kubectl_cmd[@]}" \
      rollout status "$target" "${ns_args[@]}" --timeout="${slice}s" \
      --request-timeout="$request_timeout" 2>&1) || rc=$?
    while IFS= read -r line; do
      # Each slice ends with kubectl's timeout message: it means "not yet", not a failure.
      # Progress lines repeat from slice to slice; print each once.
      if [[ "$line" != 'error: timed out waiting for the condition' && "$line" != "$last_line" ]]; then
        log "$line"
        last_line=$line
      fi
    done <<<"$output"
    if ((rc == 0)); then
      return 0
    fi
    line=${output##*$'\n'}
    line=${line#error: }
    if [[ "$output" == *"exceeded its progress deadline"* ]]; then
      # The controller gave up (ProgressDeadlineExceeded): stop at once, and say which pod.
      fail_reason="$(workload_text "$i"): $line (ProgressDeadlineExceeded)"
      pod=$(first_unready_pod "$i" "${wl_since[i]}")
      if [[ -n "$pod" ]]; then
        describe_failure "$i" "$pod"
        fail_reason+="; $(failure_text "$i")"
      fi
      return 1
    fi
    if [[ "$output" == *"(NotFound)"* ]]; then
      fail_reason="$(workload_text "$i"): $line"
      return 1
    fi
    if [[ "$output" != *"timed out waiting for the condition"* ]]; then
      # Most likely the API hiccuped (a small master under load): retry within the budget.
      log "rollout status failed, retrying: $line"
      sleep 1
      continue
    fi
    stuck=$(stuck_pods "$i" "${wl_since[i]}") || stuck=""
    if [[ -n "$stuck" && "$stuck" == "$previous_stuck" ]]; then
      # Seen on two checks in a row: it is not a blip.
      line=${stuck%%$'\n'*}
      describe_failure "$i" "${line% *}" "${line##* }"
      fail_reason="$(failure_text "$i"), which does not clear by itself"
      return 1
    fi
    previous_stuck=$stuck
  done
}

# "1 of 2 ready, 1 updated" for workload $1, read now.
rollout_summary() {
  if read_workload "$1" >/dev/null; then
    counts_text "$1"
    printf '%s' "$REPLY"
  fi
}

# Sets REPLY to "1 of 2 ready, 1 updated" for workload $1 as last read (a DaemonSet's also
# says how many are available: its readiness needs them all).
counts_text() {
  REPLY="${wl_ready[$1]:-0} of ${wl_desired[$1]:-0} ready, ${wl_updated[$1]:-0} updated"
  if [[ "${wl_kind[$1]}" == daemonset ]]; then
    REPLY+=", ${wl_available[$1]:-0} available"
  fi
}

# Waits for the workloads of stage $1 (see stage_workloads), one after the other.
wait_for_workloads() {
  local i rc
  step=rollout
  stage_workloads "$1"
  for i in "${REPLY_ARRAY[@]}"; do
    rc=0
    wait_for_rollout "$i" "$deadline" || rc=$?
    if ((rc == 0)); then
      wl_outcome[i]=ready
    elif ((rc == 1)); then
      wl_outcome[i]=failed
    else
      wl_outcome[i]=timed-out
    fi
    if read_workload "$i"; then
      wl_after[i]=$REPLY
    fi
    if ((rc != 0)); then
      return "$rc"
    fi
    log "$(workload_text "$i"): rolled out, ready ${wl_ready[i]:-0}/${wl_desired[i]:-0}, revision ${wl_before[i]:-(new)} -> ${wl_after[i]}"
  done
}

# The deploy's success criteria, checked on every workload once all have rolled out (an early
# one may have broken while a later one rolled out): ready == desired and updated == desired,
# every pod Running and Ready, no container waiting in a back-off.
verify_health() {
  local i try problem problem_at pod
  step=verify
  if ((${#wl_name[@]} == 0)); then
    return 0
  fi
  log "==> verifying health: every workload ready, its pods Running and Ready, no container in a back-off"
  for ((try = 1; ; try++)); do
    problem=""
    pod=""
    for i in "${!wl_name[@]}"; do
      problem_at=$i
      if ! read_workload "$i" >/dev/null; then
        problem="$(workload_text "$i") could not be read"
        break
      fi
      pod=$(unhealthy_pods "$i")
      if ! is_ready "$i"; then
        counts_text "$i"
        problem="$(workload_text "$i"): $REPLY"
        break
      fi
      if [[ -n "$pod" ]]; then
        problem="$(workload_text "$i"): pod ${pod%%$'\n'*}"
        break
      fi
    done
    if [[ -z "$problem" ]]; then
      for i in "${!wl_name[@]}"; do
        log "$(workload_text "$i"): healthy, ${wl_ready[i]:-0}/${wl_desired[i]:-0} ready, ${wl_updated[i]:-0} updated"
      done
      return 0
    fi
    seconds_left
    if ((try >= HEALTH_CHECK_TRIES || REPLY <= 2)); then
      wl_outcome[problem_at]=failed
      fail_reason="health check failed: $problem"
      if [[ -n "$pod" ]]; then
        pod=${pod%%$'\n'*}
        describe_failure "$problem_at" "${pod%% *}"
        fail_reason="health check failed: $(failure_text "$problem_at"); ${wl_ready[problem_at]:-0} of ${wl_desired[problem_at]:-0} ready"
      fi
      return 1
    fi
    log "not healthy yet ($problem); checking again in 2s"
    sleep 2
  done
}
