# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- JSON report ------------------------------------------------------------------------------
# Also the ways out before anything changed (finish, fail_early, usage_error). Its own
# globals: control_chars, control_escapes. Sets report_printed; fail_early sets result, step,
# message and rollback_status. Reads the report's: wl_*, wide_changes, diff_changes, report_*,
# failure_*.

# Control characters other than \n \r \t \b \f, and their JSON escapes (made once: the escaper
# runs for every line of the report).
control_chars=()
control_escapes=()
for ((code = 1; code < 32; code++)); do
  printf -v hex '%02x' "$code"
  printf -v 'control_chars[code]' '%b' "\\x$hex"
  control_escapes[code]="\\u00$hex"
done
unset code hex

# Sets REPLY to the JSON string literal for $1 (also a valid YAML double-quoted scalar).
json_string() {
  local s=$1 code backslash=$'\\'
  s=${s//"$backslash"/"$backslash$backslash"}
  s=${s//'"'/"$backslash"'"'}
  s=${s//$'\n'/'\n'}
  s=${s//$'\r'/'\r'}
  s=${s//$'\t'/'\t'}
  s=${s//$'\b'/'\b'}
  s=${s//$'\f'/'\f'}
  if [[ "$s" == *[$'\001'-$'\037']* ]]; then
    for code in "${!control_chars[@]}"; do
      if [[ "$s" == *"${control_chars[code]}"* ]]; then
        s=${s//"${control_chars[code]}"/"${control_escapes[code]}"}
      fi
    done
  fi
  REPLY="\"$s\""
}

# Sets REPLY to $2 cut to at most $1 bytes, without leaving half a UTF-8 character at the end.
truncate_text() {
  REPLY=${2:0:$1}
  if ((${#2} > $1)); then
    while [[ "$REPLY" == *[$'\200'-$'\377'] ]]; do
      REPLY=${REPLY%?}
    done
  fi
}

join_by_comma() {
  local IFS=,
  REPLY="$*"
}

number_or_zero() {
  if [[ "$1" =~ ^[0-9]+$ ]]; then
    REPLY=$1
  else
    REPLY=0
  fi
}

workload_result() {
  local i=$1
  if [[ "${wl_undo[i]}" == "done" ]]; then
    REPLY=rolled-back
  elif [[ "${wl_undo[i]}" == superseded ]]; then
    REPLY=changed-by-another
  elif [[ "${wl_outcome[i]}" == failed || "${wl_outcome[i]}" == timed-out ]]; then
    REPLY=failed
  elif [[ "${wl_outcome[i]}" == ready ]] || { [[ -z "${wl_outcome[i]}" ]] && is_ready "$i"; }; then
    if [[ "${wl_before[i]}" == "${wl_after[i]}" ]]; then
      REPLY=unchanged
    else
      REPLY=ready
    fi
  else
    REPLY=not-ready
  fi
}

# Ready and updated == desired; a DaemonSet's pods must also be available on every node it
# should run on (what `rollout status daemonset` waits for; minReadySeconds makes it later).
is_ready() {
  local i=$1 desired ready updated available
  number_or_zero "${wl_desired[i]}"
  desired=$REPLY
  number_or_zero "${wl_ready[i]}"
  ready=$REPLY
  number_or_zero "${wl_updated[i]}"
  updated=$REPLY
  number_or_zero "${wl_available[i]:-}"
  available=$REPLY
  if ((ready < desired || updated < desired)); then
    return 1
  fi
  [[ "${wl_kind[i]}" != daemonset ]] || ((available >= desired))
}

workloads_json() {
  local limit=$1 i out="" entry result_text
  for ((i = 0; i < limit && i < ${#wl_name[@]}; i++)); do
    workload_result "$i"
    result_text=$REPLY
    entry='{"kind":"'"${wl_kind[i]}"'"'
    json_string "${wl_ns[i]}"
    entry+=',"namespace":'"$REPLY"
    json_string "${wl_name[i]}"
    entry+=',"name":'"$REPLY"
    number_or_zero "${wl_desired[i]}"
    entry+=',"desired":'"$REPLY"
    number_or_zero "${wl_ready[i]}"
    entry+=',"ready":'"$REPLY"
    number_or_zero "${wl_updated[i]}"
    entry+=',"updated":'"$REPLY"
    json_string "${wl_before[i]}"
    entry+=',"revision_before":'"$REPLY"
    json_string "${wl_after[i]}"
    entry+=',"revision_after":'"$REPLY"
    entry+=',"result":"'"$result_text"'"}'
    out+="${out:+,}$entry"
  done
  REPLY="[$out]"
}

# Sets REPLY to the "failure" object with at most $1 log lines, or to "" when nothing failed in
# a container.
failure_json() {
  local limit=$1 out line start
  REPLY=""
  if [[ -z "$failure_pod" ]]; then
    return 0
  fi
  json_string "$failure_workload"
  out='{"workload":'"$REPLY"
  json_string "$failure_namespace"
  out+=',"namespace":'"$REPLY"
  json_string "$failure_pod"
  out+=',"pod":'"$REPLY"
  json_string "$failure_container"
  out+=',"container":'"$REPLY"
  json_string "$failure_reason"
  out+=',"reason":'"$REPLY"
  truncate_text 500 "$failure_message"
  json_string "$REPLY"
  out+=',"message":'"$REPLY"',"log":['
  start=$((${#failure_log[@]} - limit))
  if ((start < 0)); then
    start=0
  fi
  for line in "${failure_log[@]:start}"; do
    truncate_text "$REPORT_LINE_MAX" "$line"
    json_string "$REPLY"
    out+="$REPLY,"
  done
  REPLY="${out%,}]}"
}

# Sets REPLY to the report's fields up to and including the workloads.
report_head() {
  local text=$1 workload_count=$2 log_lines=$3 change_count=$4 prune_items=$5 head item changes=""
  json_string "$deploy_id"
  head='{"version":1,"mode":"'"$command"'","deploy_id":'"$REPLY"',"result":"'"$result"'","step":"'"$step"'"'
  json_string "$text"
  head+=',"message":'"$REPLY"',"rollback":"'"$rollback_status"'"'
  failure_json "$log_lines"
  if [[ -n "$REPLY" ]]; then
    head+=',"failure":'"$REPLY"
  fi
  if [[ "$command" == dry-run ]]; then
    for item in "${diff_changes[@]:0:change_count}"; do
      truncate_text "$REPORT_LINE_MAX" "$item"
      json_string "$REPLY"
      changes+="${changes:+,}$REPLY"
    done
    head+=',"changes":['"$changes"']'
  fi
  if ((${#wide_changes[@]} > 0)); then
    changes=""
    for item in "${wide_changes[@]:0:20}"; do
      truncate_text "$REPORT_LINE_MAX" "$item"
      json_string "$REPLY"
      changes+="${changes:+,}$REPLY"
    done
    head+=',"cluster_changes":['"$changes"']'
  fi
  prune_json "$prune_items"
  if [[ -n "$REPLY" ]]; then
    head+=',"prune":'"$REPLY"
  fi
  jobs_json
  if [[ -n "$REPLY" ]]; then
    head+=',"jobs":'"$REPLY"
  fi
  workloads_json "$workload_count"
  REPLY="$head,\"workloads\":$REPLY"
}

# Sets REPLY to the report, shortened to fit: oldest events and last pods go first, then the
# message is cut, then the failed container's log, the dry run's list of changes and prune's
# lists are cut short, then workloads are left out (the message says how many).
build_report() {
  local pods=() events=() line i size head text=$message workload_count=${#wl_name[@]}
  local pod_count event_start=0 pods_part log_lines=$REPORT_LOG_LINES
  local change_count=${#diff_changes[@]} prune_items=$PRUNE_REPORT_ITEMS
  for line in "${report_pods[@]}"; do
    truncate_text "$REPORT_LINE_MAX" "$line"
    json_string "$REPLY"
    pods+=("$REPLY")
  done
  for line in "${report_events[@]}"; do
    truncate_text "$REPORT_LINE_MAX" "$line"
    json_string "$REPLY"
    events+=("$REPLY")
  done
  pod_count=${#pods[@]}
  size=0
  for i in "${!pods[@]}"; do
    size=$((size + ${#pods[i]} + 1))
  done
  for i in "${!events[@]}"; do
    size=$((size + ${#events[i]} + 1))
  done
  while :; do
    report_head "$text" "$workload_count" "$log_lines" "$change_count" "$prune_items"
    head=$REPLY
    # What follows the head: ,"pods":[...],"events":[...]}
    while ((${#head} + 22 + size > REPORT_MAX_BYTES)); do
      if ((event_start < ${#events[@]} && ${#events[@]} - event_start >= pod_count / 2)); then
        size=$((size - ${#events[event_start]} - 1))
        event_start=$((event_start + 1))
      elif ((pod_count > 0)); then
        pod_count=$((pod_count - 1))
        size=$((size - ${#pods[pod_count]} - 1))
      else
        break
      fi
    done
    if ((${#head} + 22 + size <= REPORT_MAX_BYTES)); then
      break
    fi
    if ((${#text} > 1000)); then
      truncate_text 1000 "$text"
      text="$REPLY..."
    elif ((log_lines > 0)); then
      log_lines=0
    elif ((change_count > 10)); then
      change_count=10
    elif ((prune_items > 3)); then
      prune_items=3
    elif ((workload_count > 0)); then
      workload_count=$((workload_count - 1))
      truncate_text 1000 "$message"
      text="$REPLY (report shortened: $((${#wl_name[@]} - workload_count)) workloads left out)"
    elif ((change_count > 0)); then
      change_count=0
    elif ((prune_items > 0)); then
      prune_items=0
    else
      truncate_text 200 "$text"
      text=$REPLY
    fi
  done
  join_by_comma "${pods[@]:0:pod_count}"
  pods_part=$REPLY
  join_by_comma "${events[@]:event_start}"
  REPLY="$head,\"pods\":[$pods_part],\"events\":[$REPLY]}"
}

finish() {
  local code=$1
  build_report
  report_printed=true
  printf '%s\n%s\n%s\n' "$REPORT_BEGIN" "$REPLY" "$REPORT_END" >&3
  exit "$code"
}

fail_early() {
  # Ends the run before anything changed: usage, tools, API, lock, bundle.
  local code=$1
  step=$2
  message=$3
  result=failed
  rollback_status=not-needed
  log "error: $message"
  finish "$code"
}

usage_error() {
  usage
  fail_early 2 tools "$1"
}
