# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- jobs: migrations, run after the StatefulSets and before the Deployments -------------------
# bundle/jobs.tsv lists the bundle's Jobs (NAMESPACE, NAME, HASH) in the manifests' order and
# bundle/jobs/N.yaml holds the Nth. A Job's pod template is immutable, so a Job is replaced,
# never patched: a live Job that completed with this deploy's hash ran this very spec and is
# left alone; any other live one is deleted with its pods, then applied again. Each Job is
# waited for before the next starts. A Job's own retries (backoffLimit) are its policy: the
# deploy fails when the Job has failed (condition Failed), or at once when a pod cannot start
# (a pull error, a bad config), never on one failed attempt the Job will retry.
# Sets job_ns/name/hash/outcome, and fail_reason and failure_* when a Job fails.

load_jobs() {
  local line ns rest name hash
  if [[ ! -f "$work_dir/bundle/jobs.tsv" ]]; then
    return 0
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ -z "$line" ]]; then
      continue
    fi
    ns=${line%%$'\t'*} rest=${line#*$'\t'}
    name=${rest%%$'\t'*} hash=${rest#*$'\t'}
    if [[ "$line" != *$'\t'*$'\t'* || "$hash" == *$'\t'* ]] ||
      [[ -n "$ns" && ! "$ns" =~ $DNS_LABEL_PATTERN ]] || [[ ! "$name" =~ $DNS_NAME_PATTERN ]] ||
      [[ ! "$hash" =~ ^[0-9a-f]{20}$ ]] || [[ ! -f "$work_dir/bundle/jobs/$((${#job_name[@]} + 1)).yaml" ]]; then
      fail_early 5 check "bundle/jobs.tsv: bad line '$line' (expected NAMESPACE<TAB>NAME<TAB>HASH, and bundle/jobs/N.yaml for the Nth Job)"
    fi
    job_ns+=("$ns") job_name+=("$name") job_hash+=("$hash") job_outcome+=("")
  done <"$work_dir/bundle/jobs.tsv"
}

job_ns_args() {
  ns_args=()
  if [[ -n "${job_ns[$1]}" ]]; then
    ns_args=(-n "${job_ns[$1]}")
  fi
}

job_text() {
  printf 'job/%s%s' "${job_name[$1]}" "${job_ns[$1]:+ in ${job_ns[$1]}}"
}

# Sets REPLY to Job $1 as JOB_TEMPLATE reads it ("" when it does not exist).
read_job() {
  job_ns_args "$1"
  kube_capture get job "${job_name[$1]}" "${ns_args[@]}" --ignore-not-found \
    --request-timeout="$request_timeout" -o "jsonpath=$JOB_TEMPLATE"
}

# Sets REPLY to what a deploy does with Job $1: run (no live Job), replace (a live one with
# another spec, or one that failed), keep (completed with this spec), wait (this spec, still
# running: an earlier deploy stopped while it ran). Returns 1 when the Job cannot be read.
job_plan() {
  local j=$1 uid hash active succeeded failed conditions
  read_job "$j" || return 1
  if [[ -z "$REPLY" ]]; then
    REPLY=run
    return 0
  fi
  IFS='|' read -r uid hash active succeeded failed conditions <<<"$REPLY"
  if [[ "$hash" != "${job_hash[j]}" ]]; then
    REPLY=replace
  elif [[ ";$conditions" == *";Complete=True="* ]]; then
    REPLY=keep
  elif [[ ";$conditions" == *";Failed=True="* ]]; then
    REPLY=replace
  else
    REPLY="wait"
  fi
}

# dry-run: what a deploy would do with each Job, into diff_changes (kubectl diff cannot show a
# Job that is replaced: the server refuses the patch of its template).
plan_jobs() {
  local j
  for j in "${!job_name[@]}"; do
    if ! job_plan "$j"; then
      fail_early 4 api "could not read $(job_text "$j"): $(first_line "$KUBE_ERR")"
    fi
    case $REPLY in
    run) diff_changes+=("$(job_text "$j") (would run)") ;;
    replace) diff_changes+=("$(job_text "$j") (would be replaced and run again)") ;;
    wait) diff_changes+=("$(job_text "$j") (still running with this spec: would be waited for)") ;;
    keep) log "$(job_text "$j"): completed with this spec before; would not run again" ;;
    esac
  done
}

# The server-side check of the Jobs: `apply --dry-run=server` would refuse a changed Job's
# template, which the deploy replaces rather than patches, so bundle/jobs/check.yaml (the Jobs
# under names the server makes up) is created with --dry-run=server instead.
server_dry_run_jobs() {
  local errors="$work_dir/server-dry-run-jobs.err" output rc=0
  if ((${#job_name[@]} == 0)); then
    return 0
  fi
  output=$(kube_within_budget create --dry-run=server --request-timeout="$request_timeout" \
    -f "$work_dir/bundle/jobs/check.yaml" -o name 2>"$errors") || rc=$?
  if [[ -n "$output" ]]; then
    log "$output"
  fi
  log_real_errors "$errors"
  if ((rc == 124)); then
    timed_out_before_changes
  fi
  if ((rc != 0)) && ! only_ignorable_errors "$errors" true; then
    fail_early 5 check "the server-side dry run rejected a Job of bundle/$JOBS_PHASE_FILE, nothing was applied: $(first_real_error "$errors")"
  fi
}

# Runs the Jobs one after the other. Returns 0 when every one completed (or had completed with
# this spec), 1 when one failed (fail_reason says why), 2 when the time ran out.
run_jobs() {
  local j rc plan output
  step="jobs"
  for j in "${!job_name[@]}"; do
    if ! lock_still_ours; then
      fail_reason="the deploy lock was taken by someone else; stopped before $(job_text "$j")"
      return 1
    fi
    if ! job_plan "$j"; then
      fail_reason="could not read $(job_text "$j"): $(first_line "$KUBE_ERR")"
      job_outcome[j]=failed
      return 1
    fi
    plan=$REPLY
    if [[ "$plan" == keep ]]; then
      log "$(job_text "$j"): completed with this spec before; not run again"
      job_outcome[j]=unchanged
      continue
    fi
    if [[ "$plan" == replace ]]; then
      log "==> replacing $(job_text "$j") (its spec changed, or it failed): deleting it and its pods"
      rc=0
      delete_job "$j" || rc=$?
      if ((rc != 0)); then
        return "$rc"
      fi
    fi
    if [[ "$plan" == wait ]]; then
      log "==> $(job_text "$j") is still running with this spec (an earlier deploy stopped while it ran): waiting for it"
    else
      log "==> kubectl apply -f bundle/jobs/$((j + 1)).yaml ($(job_text "$j"))"
      rc=0
      output=$(kube_within_budget apply --validate="$validate" --request-timeout="$request_timeout" \
        -f "$work_dir/bundle/jobs/$((j + 1)).yaml" 2>&1) || rc=$?
      log "$output"
      if ((rc != 0)); then
        job_outcome[j]=failed
        if ((rc == 124)); then
          job_outcome[j]=timed-out
          fail_reason="timed out after ${timeout_seconds}s applying $(job_text "$j")"
          return 2
        fi
        fail_reason="kubectl apply of $(job_text "$j") failed: $(first_error_line "$output")"
        return 1
      fi
    fi
    rc=0
    wait_for_job "$j" || rc=$?
    if ((rc != 0)); then
      return "$rc"
    fi
  done
}

# Deletes Job $1 and, first, its pods (foreground), waiting within the budget.
delete_job() {
  local j=$1 output rc=0
  seconds_left
  job_ns_args "$j"
  output=$(kube_within_budget delete job "${job_name[j]}" "${ns_args[@]}" --cascade=foreground \
    --wait=true --timeout="$((REPLY > 1 ? REPLY : 1))s" --ignore-not-found \
    --request-timeout="$request_timeout" 2>&1) || rc=$?
  log "$output"
  if ((rc == 0)); then
    return 0
  fi
  if ((rc == 124)) || [[ "$output" == *"timed out waiting"* ]]; then
    job_outcome[j]=timed-out
    fail_reason="timed out after ${timeout_seconds}s deleting the earlier $(job_text "$j")"
    return 2
  fi
  job_outcome[j]=failed
  fail_reason="could not delete the earlier $(job_text "$j") to run it again: $(first_error_line "$output")"
  return 1
}

# Prints the pods of Job $1 (UID $2) as workload_pods does, one checked line each.
job_pods() {
  job_ns_args "$1"
  owned_pods "$2"
}

# Waits for Job $1 to complete. Returns 0 when it did, 1 when it failed, 2 when time ran out.
wait_for_job() {
  local j=$1 uid hash active succeeded failed conditions started pod created revision deleting
  local phase readiness restarts reasons reason stuck="" stuck_since=0 seen_failed=0 left
  started=$(date +%s)
  log "==> waiting for $(job_text "$j") to complete"
  while :; do
    if ! lock_still_ours; then
      fail_reason="the deploy lock was taken by someone else while waiting for $(job_text "$j"); this deploy stops here"
      job_outcome[j]=failed
      return 1
    fi
    if ! read_job "$j"; then
      log "could not read $(job_text "$j"), retrying: $(first_line "$KUBE_ERR")"
      REPLY="?"
    elif [[ -z "$REPLY" ]]; then
      fail_reason="$(job_text "$j") was deleted while the deploy waited for it"
      job_outcome[j]=failed
      return 1
    fi
    if [[ "$REPLY" != "?" ]]; then
      IFS='|' read -r uid hash active succeeded failed conditions <<<"$REPLY"
      if [[ ";$conditions" == *";Complete=True="* ]]; then
        job_outcome[j]=completed
        log "$(job_text "$j"): completed in $(($(date +%s) - started))s (${succeeded:-0} succeeded, ${failed:-0} failed attempt(s))"
        return 0
      fi
      if [[ ";$conditions" == *";Failed=True="* ]]; then
        reason=${conditions#*Failed=True=}
        reason=${reason%%;*}
        job_outcome[j]=failed
        describe_job_failure "$j" "$uid" ""
        fail_reason="$(job_text "$j") failed${reason:+ ($reason)} after ${failed:-0} failed attempt(s); $(job_failure_text)"
        return 1
      fi
      if [[ "$failed" =~ ^[0-9]+$ ]] && ((failed > seen_failed)); then
        log "$(job_text "$j"): attempt $failed failed; the Job retries it (its backoffLimit decides how often)"
        seen_failed=$failed
      fi
      # A pod that cannot start (no image, a bad config) does not count as a failed attempt:
      # the Job would wait for it forever. Seen for FAIL_FAST_CHECK_SECONDS, it fails the deploy.
      reason=""
      if [[ "$uid" =~ $UID_PATTERN ]]; then
        while IFS='|' read -r pod created revision deleting phase readiness restarts reasons; do
          for reason in $reasons; do
            if [[ "$FATAL_WAITING_REASONS" == *" $reason "* && "$reason" != CrashLoopBackOff ]]; then
              break 2
            fi
          done
          reason=""
        done < <(job_pods "$j" "$uid")
      fi
      # The pod, not its reason: a kubelet alternates ErrImagePull and ImagePullBackOff.
      if [[ -z "$reason" ]]; then
        stuck=""
      elif [[ "$stuck" != "$pod" ]]; then
        stuck=$pod
        stuck_since=$(date +%s)
      elif (($(date +%s) - stuck_since >= FAIL_FAST_CHECK_SECONDS)); then
        job_outcome[j]=failed
        describe_job_failure "$j" "$uid" "$pod"
        fail_reason="$(job_text "$j"): $(job_failure_text), which does not clear by itself"
        return 1
      fi
    fi
    seconds_left
    left=$REPLY
    if ((left <= 0)); then
      job_outcome[j]=timed-out
      fail_reason="$(job_text "$j") did not complete in time (${active:-0} active, ${failed:-0} failed attempt(s))"
      if [[ "$uid" =~ $UID_PATTERN ]]; then
        describe_job_failure "$j" "$uid" ""
        if [[ -n "$failure_pod" ]]; then
          fail_reason+="; $(job_failure_text)"
        fi
      fi
      return 2
    fi
    sleep "$((left < JOB_POLL_SECONDS ? left : JOB_POLL_SECONDS))"
  done
}

# Fills failure_* for Job $1 (UID $2) from pod $3, else from its newest pod: the container that
# failed or cannot start, its reason and exit code, and the end of its log.
describe_job_failure() {
  local j=$1 uid=$2 pod=$3 line name restarts waiting terminated code last chosen="" detail=""
  local logs_args=() newest="" created phase
  if [[ -z "$pod" ]]; then
    while IFS='|' read -r name created _ _ phase _; do
      if [[ "$name" =~ $DNS_NAME_PATTERN && "$created" > "$newest" ]]; then
        newest=$created
        pod=$name
      fi
    done < <(job_pods "$j" "$uid")
  fi
  failure_workload="job/${job_name[j]}"
  failure_namespace=${job_ns[j]}
  failure_pod=$pod
  failure_container=""
  failure_reason="Failed"
  failure_message=""
  failure_log=()
  if [[ -z "$pod" ]]; then
    return 0
  fi
  job_ns_args "$j"
  kube_capture get pod "$pod" "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath=$JOB_CONTAINER_TEMPLATE" || REPLY=""
  while IFS='|' read -r name restarts waiting terminated code last; do
    if [[ ! "$name" =~ $DNS_LABEL_PATTERN || ! "$waiting$terminated" =~ ^[A-Za-z]*$ ||
      ! "$code$last" =~ ^-?[0-9]*$ ]]; then
      continue
    fi
    if [[ -z "$chosen" || -n "$waiting" || (-n "$code" && "$code" != 0) ]]; then
      chosen=$name
      failure_reason=${waiting:-${terminated:-Failed}}
      detail=""
      if [[ -n "$code" ]]; then
        detail="exit code $code"
      elif [[ -n "$last" ]]; then
        detail="last exit code $last"
      fi
      if [[ -n "$waiting" || (-n "$code" && "$code" != 0) ]]; then
        break
      fi
    fi
  done <<<"$REPLY"
  failure_container=$chosen
  failure_message=$detail
  log "pod $pod, container ${chosen:-?}: $failure_reason${detail:+ ($detail)}"
  if [[ -z "$chosen" || "$PULL_REASONS" == *" $failure_reason "* ||
    "$failure_reason" == CreateContainer* ]]; then
    return 0 # never started: no log
  fi
  logs_args=("$pod" "${ns_args[@]}" -c "$chosen" --tail="$LOG_TAIL_LINES"
    --request-timeout="$request_timeout")
  if [[ "$failure_reason" == CrashLoopBackOff ]]; then
    logs_args+=(--previous)
  fi
  if kube_capture logs "${logs_args[@]}"; then
    if [[ -z "$REPLY" ]]; then
      log "its log is empty"
      return 0
    fi
    log "last lines of its log:"
    while IFS= read -r line; do
      failure_log+=("$line")
      log "  | $line"
    done <<<"$REPLY"
  else
    failure_log=("(no log: $(first_line "$KUBE_ERR"))")
    log "no log: $(first_line "$KUBE_ERR")"
  fi
}

# Sets REPLY to the report's "jobs" list (the first JOBS_REPORT_MAX), "" without Jobs: each
# Job's namespace, name and result (completed, unchanged, failed, timed-out, not-run).
jobs_json() {
  local j out=""
  REPLY=""
  if ((${#job_name[@]} == 0)) || [[ "$command" != deploy ]]; then
    return 0
  fi
  for j in "${!job_name[@]}"; do
    if ((j >= JOBS_REPORT_MAX)); then
      break
    fi
    out+="${out:+,}"'{"namespace":"'"${job_ns[j]}"'","name":"'"${job_name[j]}"'","result":"'"${job_outcome[j]:-not-run}"'"}'
  done
  REPLY="[$out]"
}

# Sets REPLY to what the Jobs did, for a healthy deploy's message ("" without Jobs).
jobs_summary() {
  local j ran=() kept=() text=""
  for j in "${!job_name[@]}"; do
    if [[ "${job_outcome[j]}" == completed ]]; then
      ran+=("job/${job_name[j]}")
    elif [[ "${job_outcome[j]}" == unchanged ]]; then
      kept+=("job/${job_name[j]}")
    fi
  done
  if ((${#ran[@]} > 0)); then
    join_by_comma "${ran[@]}"
    text+="; ran ${REPLY//,/, }"
  fi
  if ((${#kept[@]} > 0)); then
    join_by_comma "${kept[@]}"
    text+="; not run again (completed with this spec before): ${REPLY//,/, }"
  fi
  REPLY=$text
}

# The failure text of a Job for the report's message: pod, container, reason, exit code and the
# log's last line.
job_failure_text() {
  local text
  if [[ -z "$failure_pod" ]]; then
    printf '%s' "no pod of it was found"
    return 0
  fi
  text="pod $failure_pod${failure_container:+, container $failure_container}: $failure_reason"
  text+="${failure_message:+ ($failure_message)}"
  if ((${#failure_log[@]} > 0)) && [[ "${failure_log[-1]}" != "(no log: "* ]]; then
    truncate_text 300 "${failure_log[-1]}"
    text+="; log ends: $REPLY"
  fi
  printf '%s' "$text"
}
