# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- reporting --------------------------------------------------------------------------------
# What the report says at the end: namespaces, pods and events, the rollback's summary.
# Sets namespaces, report_pods, report_events, result, message, rollback_status.

report_namespaces() {
  local i ns
  local -A seen=()
  namespaces=()
  if [[ -n "$report_namespace" ]]; then
    namespaces=("$report_namespace")
    return 0
  fi
  for i in "${!wl_ns[@]}"; do
    ns=${wl_ns[i]}
    if [[ -n "$ns" && -z "${seen[$ns]:-}" ]]; then
      seen[$ns]=1
      namespaces+=("$ns")
    fi
  done
}

collect_pods_and_events() {
  local ns output line
  report_namespaces
  for ns in "${namespaces[@]}"; do
    # The log gets the wide table (node, IP); the report the narrow one, to save room.
    log "==> pods in $ns"
    kube get pods -n "$ns" -o wide --request-timeout="$request_timeout" || true
    output=$(kube get pods -n "$ns" --request-timeout="$request_timeout" 2>/dev/null) || true
    while IFS= read -r line; do
      if [[ -n "$line" ]]; then
        report_pods+=("${line%"${line##*[! ]}"}")
      fi
    done <<<"$output"
    log "==> warning events in $ns"
    kube_capture get events -n "$ns" --field-selector type=Warning \
      --sort-by=.metadata.creationTimestamp --request-timeout="$request_timeout" || true
    output=$REPLY
    log "$output${KUBE_ERR:+$'\n'}$KUBE_ERR"
    while IFS= read -r line; do
      if [[ -n "$line" && "$line" != "LAST SEEN"* && "$line" != "No resources found"* ]]; then
        report_events+=("${line%"${line##*[! ]}"}")
      fi
    done <<<"$output"
  done
}

# Reads the workloads the run has not read since it changed things.
refresh_counts() {
  local i
  for i in "${!wl_name[@]}"; do
    if [[ -z "${wl_desired[i]}" || -z "${wl_after[i]}" ]] && read_workload "$i" &&
      [[ -z "${wl_after[i]}" ]]; then
      wl_after[i]=$REPLY
    fi
  done
}

# Ends a deploy or rollback that got as far as changing things: report, forget the state.
finish_after_changes() {
  local outcome=$1 code
  refresh_counts
  collect_pods_and_events
  rm -rf -- "$state_dir"
  if [[ "$outcome" == success ]]; then
    result=success
    step="done"
    finish 0
  fi
  result=$outcome
  case "$outcome/$rollback_status" in
  failed/done) code=7 ;;
  failed/failed) code=8 ;;
  failed/*) code=9 ;;
  timed-out/done) code=10 ;;
  timed-out/failed) code=11 ;;
  *) code=12 ;;
  esac
  finish "$code"
}

handle_failure() {
  local outcome=$1
  log "error: $fail_reason"
  message=$fail_reason
  if [[ "$rollback_enabled" != true ]]; then
    rollback_status=off
    message+="; rollback is off, nothing undone"
  else
    roll_back_changed "$(($(date +%s) + rollback_timeout_seconds))"
    message+="; $(rollback_summary)"
  fi
  finish_after_changes "$outcome"
}

# Names the workloads whose undo ended as $1 (done, failed, no-history).
workloads_with_undo() {
  local i out=""
  for i in "${!wl_name[@]}"; do
    if [[ "${wl_undo[i]}" == "$1" ]]; then
      out+="${out:+, }${wl_kind[i]}/${wl_name[i]}"
    fi
  done
  printf '%s' "$out"
}

# What the rollback did, for the report's message.
rollback_summary() {
  local new
  new=$(workloads_with_undo no-history)
  case "$rollback_status" in
  "done") printf 'rolled back: %s' "$(workloads_with_undo "done")" ;;
  failed) printf 'rollback failed: %s' "$(workloads_with_undo failed)" ;;
  *) printf 'nothing rolled back' ;;
  esac
  if [[ -n "$new" ]]; then
    printf '; new in this deploy, no earlier revision to go back to (left as applied): %s' "$new"
  elif [[ "$rollback_status" == nothing-changed ]]; then
    printf ' (no workload changed revision)'
  fi
}
