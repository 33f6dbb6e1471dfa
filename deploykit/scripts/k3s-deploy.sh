#!/usr/bin/env bash
# k3s-deploy.sh: applies a manifest bundle to a Kubernetes cluster (the K3s master, reached
# through SSM Run Command, or the runner's kubeconfig with transport `local`), waits for the
# rollout, proves the result healthy, undoes what it changed when the deploy fails, and prints
# a JSON report. docs/internals.md has the contract.
#
# Usage:
#   k3s-deploy.sh deploy   --bundle FILE --deploy-id ID [options]
#   k3s-deploy.sh dry-run  --bundle FILE --deploy-id ID [options]
#   k3s-deploy.sh rollback --deploy-id ID [options]
#
#   deploy    1 tools    checks every command it needs and names a missing one
#             2 api      kubectl get --raw=/readyz
#             3 lock     takes the cluster's deploy lock: Lease kube-system/k3s-deploy-lock,
#                        created atomically; waits up to --lock-timeout while another deploy
#                        holds it; takes over a lease that expired or was released; a
#                        heartbeat renews it while the script runs, and a deploy whose lease
#                        someone else took changes nothing more
#             4 check    client-side dry run of every phase file, every namespace it needs
#                        exists or is in the bundle, then a server-side dry run of the whole
#                        bundle (--server-dry-run): a bad document fails with nothing applied
#             5 apply    records each workload's revision in STATE/ID/revisions.tsv, applies
#                        the phase files in order, annotates each workload with the commit,
#                        the run URL and the time (its own metadata: the revision stays)
#             6 rollout  waits for each workload; every 3 s checks its new pods and stops at
#                        once on a container that will not start by itself (back-off, bad
#                        image, config error) or a Deployment past its progress deadline
#             7 verify   every workload ready == desired, its pods Running and Ready, no
#                        container waiting in a back-off
#             on failure: undoes only the workloads whose revision changed (rollback),
#                        each only while it still holds the revision this deploy made
#                        (STATE/ID/applied.tsv), a Deployment to the exact revision recorded
#   dry-run   steps 1, 2 and 4, then `kubectl diff` of the whole bundle; changes nothing and
#             takes no lock. The diff goes to stdout between ===K3S-DEPLOY-DIFF-BEGIN=== and
#             ===K3S-DEPLOY-DIFF-END===.
#   rollback  for the action, after a deploy it could not wait for (timeout, cancel): undoes
#             what that deploy changed, using STATE/ID/revisions.tsv (takes the lock over from
#             that deploy when its process is gone).
#
# Options (on the command line, or as NAME=VALUE lines in the bundle's `options` file, which
# is how the action passes them: the bundle is verified by its sha256 before it runs, and the
# command that starts the script carries no option a narrow SSM document would have to allow;
# the deploy keeps its options in STATE/ID/options for its rollback):
#   --kubectl CMD           kubectl command, may be several words ("k3s kubectl"); default kubectl
#   --namespace NS          namespace whose pods and events are reported (default: the
#                           workloads' namespaces)
#   --timeout SECONDS       budget for the deploy once it holds the lock: API check, checks,
#                           apply, rollout waits, health check (default 600)
#   --rollback true|false   undo changed workloads when the deploy fails (default true)
#   --rollback-timeout S    budget for waiting on undone rollouts (default 120)
#   --lock-timeout S        how long to wait for the deploy lock held by another deploy
#                           (default 300; 0: do not wait)
#   --server-dry-run true|false  server-side dry run of the bundle before applying (default true)
#   --max-diff-bytes N      dry-run: longest diff printed (default 16000: SSM keeps 24,000
#                           characters of stdout)
#   --request-timeout DUR   kubectl --request-timeout (default 60s)
#   --validate true|false   kubectl --validate (default false: schema download is slow on small
#                           masters)
#   --state-dir DIR         where a deploy keeps its revisions until it is over
#                           (default ${K3S_DEPLOY_STATE_DIR:-/var/lib/k3s-deploy})
#   --commit SHA, --run-url URL   written to the workloads and the lock (may be empty)
#
# Needs: bash 4.4+, coreutils, tar, gzip, kubectl; `diff` for dry-run. No jq, no python.
#
# Output: the log on stdout (kubectl's stderr merged into it); on stderr only the JSON report
# between ===K3S-DEPLOY-REPORT-BEGIN=== and ===K3S-DEPLOY-REPORT-END=== (SSM returns only
# 8,000 characters of stderr, so the report stays under 7,500).
#
# Exit codes (never 194 or 3010: the SSM agent reads those as reboot requests):
#   0  success: every workload ready and healthy (dry-run: the diff ran)
#   2  usage error (bad arguments; nothing was run)
#   3  a tool is missing (or the state dir cannot be created)
#   4  Kubernetes API not healthy (or the lock could not be read or written)
#   5  bundle rejected before anything changed (client or server dry run, missing namespace)
#   6  another deploy holds the cluster's deploy lock (after waiting --lock-timeout)
#   7  deploy failed, changed workloads rolled back
#   8  deploy failed, rollback failed
#   9  deploy failed, nothing rolled back (rollback off, or nothing had changed)
#   10 timed out, changed workloads rolled back (rollback: changed workloads undone)
#   11 timed out, rollback failed               (rollback: an undo failed)
#   12 timed out, nothing rolled back           (rollback: nothing to undo)
# A run stopped by a signal (SIGINT, SIGTERM, SIGHUP) exits 128+N (143 for SIGTERM). A deploy
# with rollback on first sends the undos of what it changed (without waiting for their
# rollouts), releases the lock and leaves only STATE/ID/rolled-back.txt and its copy of this
# script; when an undo fails it keeps STATE/ID and the lock for `rollback`.
set -euo pipefail

# Byte-wise string operations: the report limit is counted in bytes (never fewer than SSM's
# characters) and the JSON escaper works on ASCII control bytes.
export LC_ALL=C

readonly REPORT_BEGIN='===K3S-DEPLOY-REPORT-BEGIN==='
readonly REPORT_END='===K3S-DEPLOY-REPORT-END==='
readonly DIFF_BEGIN='===K3S-DEPLOY-DIFF-BEGIN==='
readonly DIFF_END='===K3S-DEPLOY-DIFF-END==='
# SSM keeps 8,000 characters of stderr; leave room for the markers.
readonly REPORT_MAX_BYTES=7500
readonly REPORT_LINE_MAX=200
readonly PHASE_FILES=(1-namespaces.yaml 2-config.yaml 3-services.yaml 4-statefulsets.yaml
  5-workloads.yaml)
# While a rollout is waited for, its new pods are checked this often for a container that will
# not start by itself (bad image, crash loop): no point waiting out the whole timeout then.
readonly FAIL_FAST_CHECK_SECONDS=3
readonly FATAL_WAITING_REASONS=" CrashLoopBackOff ImagePullBackOff ErrImagePull InvalidImageName \
ErrImageNeverPull CreateContainerConfigError CreateContainerError RunContainerError "
# A container that never got an image has no log to show.
readonly PULL_REASONS=" ImagePullBackOff ErrImagePull InvalidImageName ErrImageNeverPull "
# A container may crash once or twice while what it needs comes up; more is a crash loop.
readonly CRASH_LOOP_MIN_RESTARTS=2
# Lines of a failed container's log printed, and kept in the report.
readonly LOG_TAIL_LINES=20
readonly REPORT_LOG_LINES=10
# After apply, a controller needs a moment to record the new revision (observedGeneration).
readonly CONTROLLER_SETTLE_TRIES=10
readonly API_CHECK_TRIES=3
# The final health check looks this many times, 2 s apart, before it calls a workload unhealthy
# (an old pod may still be on its way out).
readonly HEALTH_CHECK_TRIES=5
# How long a new CustomResourceDefinition may take to be served before its objects are applied.
readonly CRD_ESTABLISHED_SECONDS=60
# The cluster's deploy lock. Its lease outlives the holder's own budget by this margin, so only
# a holder that died (SIGKILL, lost master) ever lets it expire.
readonly LOCK_NAMESPACE=kube-system
readonly LOCK_NAME=k3s-deploy-lock
readonly LOCK_POLL_SECONDS=2
# A Lease's MicroTime as the API server writes it (2026-12-01T12:00:00.000000Z).
readonly LEASE_TIME_PATTERN='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$'
# The lease lasts the longest run the action allows its command (lock-timeout + timeout +
# rollback-timeout + this margin: command.py's execution timeout) from when it is taken or
# last renewed, so it never ends while the command may still run; the heartbeat renews it
# every LEASE_RENEW_SECONDS while this process lives.
readonly LOCK_MARGIN_SECONDS=60
LEASE_RENEW_SECONDS=${K3S_DEPLOY_LEASE_RENEW_SECONDS:-15}
# Left in the state dir by a deploy that undid its own changes when a signal stopped it.
readonly ROLLED_BACK_FILE=rolled-back.txt
# Annotations written to each workload (and the lock), under the action's own prefix.
readonly ANNOTATION_PREFIX=k3s-deploy-action
readonly TRACE_KEYS=(commit-sha run-url deployed-at deploy-id)
readonly KUBECTL_WORD_PATTERN='^[A-Za-z0-9_./:=-]+$'
readonly DNS_LABEL_PATTERN='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
readonly DNS_NAME_PATTERN='^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$'
readonly DEPLOY_ID_PATTERN='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
readonly NO_HISTORY_MESSAGES=("no rollout history found" "no last revision to roll back to")
# One line per pod (workload_pods selects the pods by their owner's UID), only fields the API
# server types or validates and the kubelet's status words; checked by POD_LINE_PATTERN.
readonly POD_LINE_TEMPLATE='{.metadata.name}|{.metadata.creationTimestamp}|{.metadata.labels.controller-revision-hash}|{.metadata.deletionTimestamp}|{.status.phase}|{.status.containerStatuses[*].ready}|{.status.containerStatuses[*].restartCount}|{.status.initContainerStatuses[*].state.waiting.reason} {.status.containerStatuses[*].state.waiting.reason}{"\n"}'
readonly POD_LINE_PATTERN='^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\|[0-9TZ:.-]*\|[A-Za-z0-9._-]*\|[0-9TZ:.-]*\|(Pending|Running|Succeeded|Failed|Unknown)?\|((true|false)( (true|false))*)?\|([0-9]{1,9}( [0-9]{1,9})*)?\|[A-Za-z ]*$'
# A kubectl log line (klog's header: level, date, time, thread, file:line]).
readonly KLOG_PATTERN='^[IWEF][0-9]{4} [0-9:.]+ +[0-9]+ [^ ]+:[0-9]+\] '
readonly UID_PATTERN='^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
# One line per container of one pod (init containers first); the message last: it may hold "|".
readonly CONTAINER_TEMPLATE='{range .status.initContainerStatuses[*]}{.name}|{.restartCount}|{.state.waiting.reason}|{.state.waiting.message}{"\n"}{end}{range .status.containerStatuses[*]}{.name}|{.restartCount}|{.state.waiting.reason}|{.state.waiting.message}{"\n"}{end}'
readonly LOCK_TEMPLATE='{.metadata.resourceVersion}|{.spec.holderIdentity}|{.spec.acquireTime}|{.spec.renewTime}|{.spec.leaseDurationSeconds}|{.metadata.annotations.k3s-deploy-action/holder-process}|{.metadata.annotations.k3s-deploy-action/run-url}'
readonly TRACE_TEMPLATE='{.metadata.annotations.k3s-deploy-action/commit-sha}{"\t"}{.metadata.annotations.k3s-deploy-action/run-url}{"\t"}{.metadata.annotations.k3s-deploy-action/deployed-at}{"\t"}{.metadata.annotations.k3s-deploy-action/deploy-id}'

# Options.
command=""
bundle=""
deploy_id=""
kubectl_words="kubectl"
report_namespace=""
timeout_seconds=600
rollback_enabled=true
rollback_timeout_seconds=120
lock_timeout_seconds=300
server_dry_run=true
max_diff_bytes=16000
request_timeout=60s
validate=false
state_root="${K3S_DEPLOY_STATE_DIR:-/var/lib/k3s-deploy}"
commit=""
run_url=""

# Run state.
kubectl_cmd=()
ns_args=()
namespaces=()
bundle_phase_files=()
bundle_crds=()
declare -A bundle_crd_kinds=()
declare -A bundle_namespaces=() # Namespace documents of the bundle
declare -A new_namespace_objects=() # namespace not in the cluster yet -> "kind/name, ..."
report_printed=false
interrupted=false
state_dir=""
work_dir=""
kube_err_file=/dev/null
KUBE_ERR=""
lock_held=false
lock_keep=false
rollback_wait=true # false: undo and go, no wait for the undone rollouts (on a signal)
lock_version=""
lock_duration=0
lock_taken_at=""
heartbeat_pid=""
deadline=0
rollout_started_at=""
fail_reason=""
annotate_failures=""

# Report.
result="failed"
step="tools"
message=""
rollback_status="not-needed"
report_pods=()
report_events=()
diff_changes=()
# Objects whose change reaches past the deploy's own namespaces: cluster-scoped ones and those in
# kube-system (#15). Their resourceVersion before the apply; what changed goes in the report.
wide_kind=()
wide_ns=()
wide_name=()
wide_before=()
wide_changes=() # "created KIND/NAME", "changed KIND kube-system/NAME"
wl_kind=()
wl_ns=()
wl_name=()
wl_before=()
wl_after=()
wl_desired=()
wl_ready=()
wl_updated=()
wl_uid=()     # the workload's metadata.uid, once read (its pods are selected by it)
wl_since=()   # pods created since then are this deploy's ("" when it did not change the workload)
wl_trace=()   # the workload's traceability annotations before this deploy, tab-separated
wl_outcome=() # ready | failed | timed-out | "" (not waited for)
wl_undo=()    # done | no-history | superseded | failed | "" (not undone)
# The container that made the deploy fail, when one did.
failure_workload=""
failure_namespace=""
failure_pod=""
failure_container=""
failure_reason=""
failure_message=""
failure_log=()

exec 3>&2 2>&1

log() {
  printf '%s\n' "$*"
}

# shellcheck disable=SC2329 # called by the EXIT trap
cleanup() {
  local code=$?
  # Nothing here may fail the script (set -e applies in traps too): every step is guarded.
  # Stopped by an unexpected error before anything changed: still say so in a report. Once
  # the state dir exists (or on a signal) there is deliberately no report: the action then
  # knows the deploy did not finish and runs `rollback --deploy-id`, which uses that dir.
  if [[ "$report_printed" != true && "$interrupted" != true ]] && ((code != 0)) &&
    [[ -z "$state_dir" || ! -d "$state_dir" ]]; then
    message="the deploy script stopped unexpectedly (exit $code) during step $step; see the log"
    build_report || true
    printf '%s\n%s\n%s\n' "$REPORT_BEGIN" "$REPLY" "$REPORT_END" >&3 || true
  fi
  if [[ "$lock_held" == true ]]; then
    if [[ "$lock_keep" == true ]]; then
      stop_heartbeat || true
      log "keeping the deploy lock for the rollback of $deploy_id (it takes the lock over); it expires ${lock_duration}s after it was taken otherwise" || true
    else
      release_lock || true
    fi
  fi
  if [[ -n "$work_dir" ]]; then
    rm -rf -- "$work_dir" || true
  fi
}
trap cleanup EXIT

# shellcheck disable=SC2329 # called by the signal traps
on_signal() {
  # Stopped mid-deploy (the job was cancelled): undo what changed at once, from this process,
  # which already knows the revisions; no second process, lock hand-over or rollout wait,
  # because the runner kills the job seconds after its first signal. Only when an undo
  # fails, or the undos themselves are cut short, are the state dir and the lock kept for
  # `rollback --deploy-id`.
  trap '' INT TERM HUP
  log "interrupted by SIG$1"
  interrupted=true
  if [[ "$command" == deploy && "$rollback_enabled" == true && -n "$state_dir" &&
    -f "$state_dir/revisions.tsv" ]]; then
    lock_keep=true
    rollback_wait=false
    if roll_back_changed 0 && [[ "$rollback_status" != failed ]]; then
      # What is left for `rollback --deploy-id` (the action sends it after a cancel through
      # SSM, and it runs this copy of the script): the word that this rollback is done, so it
      # neither undoes again nor says "nothing undone".
      find "$state_dir" -mindepth 1 ! -name k3s-deploy.sh -delete 2>/dev/null || true
      printf '%s\n' "$(rollback_summary)" >"$state_dir/$ROLLED_BACK_FILE" 2>/dev/null || true
      lock_keep=false
    else
      log "the action can finish this rollback with: rollback --deploy-id $deploy_id"
    fi
  fi
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

usage() {
  log "usage: k3s-deploy.sh deploy --bundle FILE --deploy-id ID [options]"
  log "       k3s-deploy.sh dry-run --bundle FILE --deploy-id ID [options]"
  log "       k3s-deploy.sh rollback --deploy-id ID [options]"
  log "options: --kubectl CMD --namespace NS --timeout SECONDS --rollback true|false"
  log "         --rollback-timeout SECONDS --lock-timeout SECONDS --server-dry-run true|false"
  log "         --max-diff-bytes N --request-timeout DUR --validate true|false"
  log "         --state-dir DIR --commit SHA --run-url URL"
}

# -- JSON report ------------------------------------------------------------------------------

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

is_ready() {
  local i=$1 desired ready updated
  number_or_zero "${wl_desired[i]}"
  desired=$REPLY
  number_or_zero "${wl_ready[i]}"
  ready=$REPLY
  number_or_zero "${wl_updated[i]}"
  updated=$REPLY
  ((ready >= desired && updated >= desired))
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
  local text=$1 workload_count=$2 log_lines=$3 change_count=$4 head item changes=""
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
  workloads_json "$workload_count"
  REPLY="$head,\"workloads\":$REPLY"
}

# Sets REPLY to the report, shortened to fit: oldest events and last pods go first, then the
# message is cut, then the failed container's log, the dry run's list of changes, then
# workloads are left out (the message says how many).
build_report() {
  local pods=() events=() line i size head text=$message workload_count=${#wl_name[@]}
  local pod_count event_start=0 pods_part log_lines=$REPORT_LOG_LINES
  local change_count=${#diff_changes[@]}
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
    report_head "$text" "$workload_count" "$log_lines" "$change_count"
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
    elif ((workload_count > 0)); then
      workload_count=$((workload_count - 1))
      truncate_text 1000 "$message"
      text="$REPLY (report shortened: $((${#wl_name[@]} - workload_count)) workloads left out)"
    elif ((change_count > 0)); then
      change_count=0
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

# -- arguments --------------------------------------------------------------------------------

parse_arguments() {
  local option value
  if (($# == 0)); then
    usage_error "missing command: deploy, dry-run or rollback"
  fi
  command=$1
  shift
  case "$command" in
  deploy | dry-run | rollback) ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    local wrong=$command
    command=deploy
    usage_error "unknown command '$wrong': expected deploy, dry-run or rollback"
    ;;
  esac
  while (($# > 0)); do
    option=$1
    case "$option" in
    --*=*)
      value=${option#*=}
      option=${option%%=*}
      shift
      ;;
    --*)
      if (($# < 2)); then
        usage_error "option $option needs a value"
      fi
      value=$2
      shift 2
      ;;
    *) usage_error "unexpected argument '$option'" ;;
    esac
    case "$option" in
    --bundle) bundle=$value ;;
    --deploy-id) deploy_id=$value ;;
    --state-dir) state_root=$value ;;
    *) set_option "${option#--}" "$value" || usage_error "unknown option $option" ;;
    esac
  done
  validate_arguments
}

# The options a deploy runs with: given on the command line, or (the action's way) in the
# bundle's `options` file, which the master verified with the bundle's sha256. The entry point,
# --bundle, --deploy-id and --state-dir never come from a file.
set_option() {
  case "$1" in
  kubectl) kubectl_words=$2 ;;
  namespace) report_namespace=$2 ;;
  timeout) timeout_seconds=$2 ;;
  rollback) rollback_enabled=$2 ;;
  rollback-timeout) rollback_timeout_seconds=$2 ;;
  lock-timeout) lock_timeout_seconds=$2 ;;
  server-dry-run) server_dry_run=$2 ;;
  max-diff-bytes) max_diff_bytes=$2 ;;
  request-timeout) request_timeout=$2 ;;
  validate) validate=$2 ;;
  commit) commit=$2 ;;
  run-url) run_url=$2 ;;
  *) return 1 ;;
  esac
}

options_text() {
  printf '%s=%s\n' kubectl "$kubectl_words" namespace "$report_namespace" \
    timeout "$timeout_seconds" rollback "$rollback_enabled" \
    rollback-timeout "$rollback_timeout_seconds" lock-timeout "$lock_timeout_seconds" \
    server-dry-run "$server_dry_run" max-diff-bytes "$max_diff_bytes" \
    request-timeout "$request_timeout" validate "$validate" commit "$commit" run-url "$run_url"
}

# Reads NAME=VALUE lines (names as the long options, without --) and validates the result like
# the command line. The file comes from the verified bundle (deploy, dry run) or from the state
# folder the deploy wrote (rollback); it replaces what the command line said.
load_options() {
  local file=$1 line count=0
  if [[ ! -f "$file" ]]; then
    return 0
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    count=$((count + 1))
    if [[ -z "$line" ]]; then
      continue
    fi
    if [[ "$line" != *=* ]] || ! set_option "${line%%=*}" "${line#*=}"; then
      fail_early 5 check "${file##*/} line $count is not a known NAME=VALUE option: the bundle is damaged or was made by another version of the action"
    fi
  done <"$file"
  validate_arguments
}

validate_arguments() {
  local word
  if [[ ! "$deploy_id" =~ $DEPLOY_ID_PATTERN ]]; then
    usage_error "--deploy-id must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got '$deploy_id'"
  fi
  if [[ "$command" != rollback && -z "$bundle" ]]; then
    usage_error "$command needs --bundle FILE"
  fi
  # The kubectl command is split into words and run directly, never through a shell: refuse
  # anything that would mean something else to a shell (quotes, ;, $, |, newlines...).
  if [[ ! "$kubectl_words" =~ ^[A-Za-z0-9_./:=\ -]+$ ]]; then
    usage_error "--kubectl must be words of letters, digits and _ . / : = - separated by spaces, got '$kubectl_words'"
  fi
  read -r -a kubectl_cmd <<<"$kubectl_words"
  if ((${#kubectl_cmd[@]} == 0)); then
    usage_error "--kubectl is empty"
  fi
  for word in "${kubectl_cmd[@]}"; do
    if [[ ! "$word" =~ $KUBECTL_WORD_PATTERN ]]; then
      usage_error "--kubectl word '$word' has characters other than letters, digits and _ . / : = -"
    fi
  done
  check_seconds --timeout "$timeout_seconds" 1
  check_seconds --rollback-timeout "$rollback_timeout_seconds" 1
  check_seconds --lock-timeout "$lock_timeout_seconds" 0
  if [[ ! "$max_diff_bytes" =~ ^[0-9]{1,9}$ ]] || ((max_diff_bytes < 1000)); then
    usage_error "--max-diff-bytes must be a whole number of at least 1000, got '$max_diff_bytes'"
  fi
  check_boolean --rollback "$rollback_enabled"
  check_boolean --validate "$validate"
  check_boolean --server-dry-run "$server_dry_run"
  if [[ ! "$request_timeout" =~ ^[0-9]+[smh]?$ ]]; then
    usage_error "--request-timeout must be a whole number with an optional unit s, m or h (like 60s), got '$request_timeout'"
  fi
  if [[ -n "$report_namespace" && ! "$report_namespace" =~ $DNS_LABEL_PATTERN ]]; then
    usage_error "--namespace must be a Kubernetes namespace name, got '$report_namespace'"
  fi
  if [[ -z "$state_root" ]]; then
    usage_error "--state-dir is empty"
  fi
  # Written to the workloads, the lock and the state folder's options file: one printable line.
  if [[ ! "$commit" =~ ^[[:graph:]]{0,100}$ || ! "$run_url" =~ ^[[:graph:]]{0,500}$ ]]; then
    usage_error "--commit and --run-url must be one word of printable characters"
  fi
  state_dir="$state_root/$deploy_id"
}

check_seconds() {
  if [[ ! "$2" =~ ^[0-9]{1,6}$ ]] || (($2 < $3)); then
    usage_error "$1 must be a whole number of seconds between $3 and 999999, got '$2'"
  fi
}

check_boolean() {
  if [[ "$2" != true && "$2" != false ]]; then
    usage_error "$1 must be true or false, got '$2'"
  fi
}

# -- tools, budget ----------------------------------------------------------------------------

check_tools() {
  local tools=(date mkdir mktemp cp mv rm sleep timeout) missing=() tool
  if [[ "$command" != rollback ]]; then
    tools+=(tar gzip)
  fi
  if [[ "$command" == dry-run ]]; then
    tools+=(diff wc) # kubectl diff runs diff
  fi
  if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    fail_early 3 tools "bash 4.4 or newer is needed, this is $BASH_VERSION"
  fi
  for tool in "${tools[@]}" "${kubectl_cmd[0]}"; do
    if ! command -v -- "$tool" >/dev/null 2>&1; then
      missing+=("$tool")
    fi
  done
  if ((${#missing[@]} > 0)); then
    fail_early 3 tools "missing: ${missing[*]} (install it or fix PATH)"
  fi
}

seconds_left() {
  REPLY=$((deadline - $(date +%s)))
}

now_utc() {
  REPLY=$(date -u +%Y-%m-%dT%H:%M:%SZ)
}

kube() {
  "${kubectl_cmd[@]}" "$@"
}

# Runs kubectl and keeps its standard output (the data) apart from its standard error: REPLY
# gets the output, KUBE_ERR the errors. kubectl's own log lines (klog: "E1201 12:00:00.000000
# 123 memcache.go:265] couldn't get resource list ...", written on every call that maps
# resources while an aggregated API is down) are logged, never taken for data or for the error.
kube_capture() {
  local rc=0 line
  REPLY=$(kube "$@" 2>"$kube_err_file") || rc=$?
  KUBE_ERR=""
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ $KLOG_PATTERN ]]; then
      log "kubectl: $line"
    else
      KUBE_ERR+="${KUBE_ERR:+$'\n'}$line"
    fi
  done <"$kube_err_file"
  return "$rc"
}

# Runs kubectl within what is left of the deploy budget; exit 124 when the budget runs out.
# --foreground keeps kubectl in this process group, so a kill of the group stops it too.
kube_within_budget() {
  seconds_left
  if ((REPLY <= 0)); then
    return 124
  fi
  timeout --foreground --kill-after=10 "$REPLY" "${kubectl_cmd[@]}" "$@"
}

check_api() {
  local try
  step=api
  log "==> checking the Kubernetes API (kubectl get --raw=/readyz)"
  for ((try = 1; try <= API_CHECK_TRIES; try++)); do
    if kube_within_budget get --raw=/readyz --request-timeout="$request_timeout"; then
      log ""
      return 0
    fi
    if ((try < API_CHECK_TRIES)); then
      sleep "$try"
    fi
  done
  fail_early 4 api "the Kubernetes API is not healthy (kubectl get --raw=/readyz failed $API_CHECK_TRIES times)"
}

first_line() {
  printf '%s' "${1%%$'\n'*}"
}

# -- the cluster's deploy lock ----------------------------------------------------------------
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

# -- bundle -----------------------------------------------------------------------------------

make_work_dir() {
  if [[ -n "$work_dir" ]]; then
    return 0
  fi
  if ! work_dir=$(mktemp -d "${TMPDIR:-/tmp}/k3s-deploy.XXXXXX"); then
    work_dir=""
    fail_early 3 tools "cannot create a temporary directory in ${TMPDIR:-/tmp}"
  fi
}

unpack_bundle() {
  local line kind ns name rest
  step=check
  if [[ ! -f "$bundle" ]]; then
    fail_early 5 check "bundle $bundle not found"
  fi
  make_work_dir
  if ! command -v tar >/dev/null 2>&1 || ! command -v gzip >/dev/null 2>&1; then
    fail_early 3 tools "missing: tar or gzip (install it or fix PATH)"
  fi
  if ! tar -xzf "$bundle" -C "$work_dir" --no-same-owner --no-same-permissions; then
    fail_early 5 check "bundle $bundle is not a readable .tar.gz"
  fi
  load_options "$work_dir/bundle/options"
  bundle_phase_files=()
  for name in "${PHASE_FILES[@]}"; do
    if [[ -f "$work_dir/bundle/$name" ]]; then
      bundle_phase_files+=("$name")
    fi
  done
  if ((${#bundle_phase_files[@]} == 0)); then
    fail_early 5 check "bundle has no manifests (expected bundle/1-namespaces.yaml ... bundle/5-workloads.yaml)"
  fi
  if [[ ! -f "$work_dir/bundle/workloads.tsv" ]]; then
    return 0
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ -z "$line" ]]; then
      continue
    fi
    # Split by hand: read with IFS=tab would merge the empty NAMESPACE field away.
    kind=${line%%$'\t'*}
    rest=${line#*$'\t'}
    ns=${rest%%$'\t'*}
    name=${rest#*$'\t'}
    if [[ "$line" != *$'\t'*$'\t'* || "$name" == *$'\t'* ]] ||
      [[ "$kind" != deployment && "$kind" != statefulset ]] ||
      [[ -n "$ns" && ! "$ns" =~ $DNS_LABEL_PATTERN ]] || [[ ! "$name" =~ $DNS_NAME_PATTERN ]]; then
      fail_early 5 check "bundle/workloads.tsv: bad line '$line' (expected KIND<TAB>NAMESPACE<TAB>NAME, KIND deployment or statefulset)"
    fi
    add_workload "$kind" "$ns" "$name" "" ""
  done <"$work_dir/bundle/workloads.tsv"
  order_workloads
}

add_workload() {
  wl_kind+=("$1")
  wl_ns+=("$2")
  wl_name+=("$3")
  wl_before+=("$4")
  wl_trace+=("$5")
  wl_after+=("")
  wl_desired+=("")
  wl_ready+=("")
  wl_updated+=("")
  wl_since+=("")
  wl_outcome+=("")
  wl_undo+=("")
}

# Waits follow the apply order: StatefulSets (phase 4) before Deployments (phase 5).
order_workloads() {
  local kinds=("${wl_kind[@]}") nss=("${wl_ns[@]}") names=("${wl_name[@]}") befores=("${wl_before[@]}")
  local traces=("${wl_trace[@]}") wanted i
  wl_kind=() wl_ns=() wl_name=() wl_before=() wl_trace=() wl_after=() wl_desired=() wl_ready=()
  wl_updated=() wl_since=() wl_outcome=() wl_undo=() wl_uid=()
  for wanted in statefulset deployment; do
    for i in "${!kinds[@]}"; do
      if [[ "${kinds[i]}" == "$wanted" ]]; then
        add_workload "${kinds[i]}" "${nss[i]}" "${names[i]}" "${befores[i]}" "${traces[i]}"
      fi
    done
  done
}

# kubectl apply goes on past an object it cannot apply and applies the rest, so problems must
# be found before the first apply: every document must parse and map to a known kind (client
# dry run), and every namespace an object needs must exist or be in the bundle.
check_bundle() {
  local name file errors kind ns object_name defined_kind rc line rest
  local -A needed_by=()
  step=check
  errors="$work_dir/dry-run.err"
  log "==> checking the bundle (kubectl apply --dry-run=client)"
  # What the bundle holds comes from its index (the action wrote it from the manifests), not
  # from kubectl: it lists a multi-document file back as one List, or not at all on an error.
  while IFS= read -r line || [[ -n "$line" ]]; do
    # Split by hand: read with IFS=tab would merge an empty NAMESPACE field away.
    kind=${line%%$'\t'*} rest=${line#*$'\t'}
    ns=${rest%%$'\t'*} rest=${rest#*$'\t'}
    object_name=${rest%%$'\t'*} defined_kind=${rest#*$'\t'}
    if [[ "$line" != *$'\t'*$'\t'*$'\t'* || "$defined_kind" == *$'\t'* ]] ||
      [[ ! "$kind" =~ ^[A-Za-z][A-Za-z0-9]*$ || ! "$object_name" =~ ^[[:graph:]]+$ ]] ||
      [[ -n "$ns" && ! "$ns" =~ $DNS_LABEL_PATTERN ]]; then
      fail_early 5 check "bundle/objects.tsv has a line that is not KIND, NAMESPACE, NAME: the bundle is damaged"
    fi
    if [[ "$kind" == Lease && "$ns" == "$LOCK_NAMESPACE" && "$object_name" == "$LOCK_NAME" ]]; then
      fail_early 5 check "the bundle holds Lease $LOCK_NAMESPACE/$LOCK_NAME, the deploy lock itself: applying it would break the lock; remove it from the manifests"
    fi
    if [[ "$kind" == Namespace ]]; then
      bundle_namespaces[$object_name]=1
    elif [[ "$kind" == CustomResourceDefinition ]]; then
      bundle_crds+=("$object_name")
      if [[ "$defined_kind" =~ ^[A-Za-z][A-Za-z0-9]*$ ]]; then
        bundle_crd_kinds[$defined_kind]=1
      fi
    elif [[ -n "$ns" ]]; then
      needed_by[$ns]+="${needed_by[$ns]:+, }${kind,,}/$object_name"
    fi
  done <"$work_dir/bundle/objects.tsv"
  for name in "${bundle_phase_files[@]}"; do
    file="$work_dir/bundle/$name"
    rc=0
    kube_within_budget apply --dry-run=client --validate="$validate" \
      --request-timeout="$request_timeout" -f "$file" -o name >/dev/null 2>"$errors" || rc=$?
    if ((rc != 0)); then
      log_real_errors "$errors"
      if ((rc == 124)); then
        timed_out_before_changes
      fi
      if only_ignorable_errors "$errors" false; then
        # kubectl cannot map them before their CustomResourceDefinitions exist.
        log "bundle/$name: objects of kinds this bundle defines are checked when applied"
      else
        fail_early 5 check "bundle/$name was rejected by kubectl: $(first_real_error "$errors")"
      fi
    fi
  done
  for ns in "${!needed_by[@]}"; do
    if ! kube_capture get namespace "$ns" --ignore-not-found \
      --request-timeout="$request_timeout" -o name; then
      fail_early 4 api "could not check that namespace $ns exists: $(first_line "$KUBE_ERR")"
    fi
    if [[ -n "$REPLY" ]]; then
      continue
    fi
    if [[ -z "${bundle_namespaces[$ns]:-}" ]]; then
      fail_early 5 check "namespaces \"$ns\" not found: needed by ${needed_by[$ns]}; add a Namespace document for it to the manifests"
    fi
    new_namespace_objects[$ns]=${needed_by[$ns]}
  done
  log "bundle ok: ${bundle_phase_files[*]}"
}

# Prints kubectl's errors in file $1 one per line. When one call fails for several objects,
# kubectl may print them as one aggregate, "[error 1, error 2\nensure CRDs are installed
# first]" (seen with apply --dry-run=server): that is taken apart here.
error_lines() {
  local text line
  text=$(<"$1") || return 0
  text=${text//"ensure CRDs are installed first, "/$'ensure CRDs are installed first\n'}
  while IFS= read -r line || [[ -n "$line" ]]; do
    line=${line#\[}
    line=${line%\]}
    printf '%s\n' "$line"
  done <<<"$text"
}

# True when every error line in file $1 is one a dry run must put up with: kubectl not knowing
# a kind that a CustomResourceDefinition of this bundle defines and, when $2 is true, the API
# server refusing an object whose namespace this bundle creates (it does not exist yet, so the
# server cannot dry-run anything in it). Warnings are not errors.
only_ignorable_errors() {
  local line allow_new_namespaces=$2
  while IFS= read -r line; do
    if [[ -z "$line" || "$line" == "ensure CRDs are installed first" || "$line" == Warning:* ||
      "$line" =~ $KLOG_PATTERN ]]; then
      continue
    fi
    if [[ "$line" =~ no\ matches\ for\ kind\ \"([^\"]+)\" ]] &&
      [[ -n "${bundle_crd_kinds[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    if [[ "$allow_new_namespaces" == true && "$line" =~ namespaces\ \"([^\"]+)\"\ not\ found ]] &&
      [[ -n "${new_namespace_objects[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    return 1
  done < <(error_lines "$1")
  return 0
}

# First line of file $1 that only_ignorable_errors would not put up with.
first_real_error() {
  local line
  while IFS= read -r line; do
    if [[ -z "$line" || "$line" == "ensure CRDs are installed first" || "$line" == Warning:* ||
      "$line" =~ $KLOG_PATTERN ]]; then
      continue
    fi
    if [[ "$line" =~ no\ matches\ for\ kind\ \"([^\"]+)\" ]] &&
      [[ -n "${bundle_crd_kinds[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    if [[ "$line" =~ namespaces\ \"([^\"]+)\"\ not\ found ]] &&
      [[ -n "${new_namespace_objects[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    printf '%s' "$line"
    return 0
  done < <(error_lines "$1")
}

# The API server checks every object as a real apply would (admission, validation, immutable
# fields) and stores nothing. Objects in a namespace this bundle creates cannot be checked this
# way (the namespace does not exist yet and nothing may change before the checks pass): they
# had the client-side check only, and the log says so.
server_dry_run_bundle() {
  local name file output errors rc ns
  step=check
  if [[ "$server_dry_run" != true ]]; then
    log "==> server-side dry run skipped (--server-dry-run false)"
    return 0
  fi
  errors="$work_dir/server-dry-run.err"
  log "==> server-side dry run of the whole bundle (kubectl apply --dry-run=server): nothing is changed"
  for name in "${bundle_phase_files[@]}"; do
    file="$work_dir/bundle/$name"
    rc=0
    output=$(kube_within_budget apply --dry-run=server --validate="$validate" \
      --request-timeout="$request_timeout" -f "$file" 2>"$errors") || rc=$?
    if [[ -n "$output" ]]; then
      log "$output"
    fi
    log_real_errors "$errors"
    if ((rc == 124)); then
      timed_out_before_changes
    fi
    if ((rc != 0)) && ! only_ignorable_errors "$errors" true; then
      fail_early 5 check "the server-side dry run rejected bundle/$name, nothing was applied: $(first_real_error "$errors")"
    fi
  done
  for ns in "${!new_namespace_objects[@]}"; do
    log "namespace $ns is new: its objects (${new_namespace_objects[$ns]}) had the client-side check only; the API server cannot dry-run objects in a namespace that does not exist yet"
  done
  log "server-side dry run ok"
}

# Logs the lines of file $1 except the refusals of objects in a namespace this bundle creates
# (expected: the summary after the dry run names those objects).
log_real_errors() {
  local line
  while IFS= read -r line; do
    if [[ "$line" =~ namespaces\ \"([^\"]+)\"\ not\ found ]] &&
      [[ -n "${new_namespace_objects[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    log "$line"
  done < <(error_lines "$1")
}

# dry-run: `kubectl diff` of each phase file into $work_dir/diff.txt, and diff_changes.
diff_bundle() {
  local name file errors rc output line ns
  step=check
  errors="$work_dir/diff.err"
  : >"$work_dir/diff.txt"
  log "==> kubectl diff of the whole bundle against the cluster"
  for name in "${bundle_phase_files[@]}"; do
    file="$work_dir/bundle/$name"
    rc=0
    kube_within_budget diff -f "$file" --request-timeout="$request_timeout" \
      >"$work_dir/diff.part" 2>"$errors" || rc=$?
    if ((rc == 124)); then
      timed_out_before_changes
    fi
    if ((rc == 0)); then
      log "bundle/$name: no differences"
    elif ((rc == 1)); then
      # 1 means "differences found", not a failure.
      cat -- "$work_dir/diff.part" >>"$work_dir/diff.txt"
      while IFS= read -r line; do
        if [[ "$line" == "diff -u -N "* ]]; then
          diff_changes+=("${line##*/}")
        fi
      done <"$work_dir/diff.part"
      log "bundle/$name: differences found"
    elif only_ignorable_errors "$errors" true; then
      log_real_errors "$errors"
      log "bundle/$name: not diffed: kubectl diff stops at objects in a namespace that does not exist yet (it cannot dry-run them); the objects in new namespaces would be created"
    else
      log "$(<"$errors")"
      fail_early 5 check "kubectl diff failed on bundle/$name (exit $rc): $(first_line "$(first_real_error "$errors")")"
    fi
  done
  for ns in "${!new_namespace_objects[@]}"; do
    output=${new_namespace_objects[$ns]}
    output=${output//, /$'\n'}
    while IFS= read -r line; do
      diff_changes+=("$line in $ns (new namespace: would be created)")
    done <<<"$output"
  done
}

# Prints the diff between the markers, cut to --max-diff-bytes at a line end.
print_diff() {
  local line size=0 total cut=false
  total=$(wc -c <"$work_dir/diff.txt")
  log "$DIFF_BEGIN"
  while IFS= read -r line || [[ -n "$line" ]]; do
    if ((size + ${#line} + 1 > max_diff_bytes)); then
      cut=true
      break
    fi
    if [[ "$line" == "$DIFF_BEGIN" || "$line" == "$DIFF_END" ]]; then
      line="(a line equal to the diff marker was left out)"
    fi
    log "$line"
    size=$((size + ${#line} + 1))
  done <"$work_dir/diff.txt"
  if [[ "$cut" == true ]]; then
    log "... (diff cut at $size of $total bytes; run kubectl diff on the cluster for the rest)"
  fi
  log "$DIFF_END"
}

timed_out_before_changes() {
  result=timed-out
  message="timed out after ${timeout_seconds}s before anything was applied"
  rollback_status=not-needed
  log "error: $message"
  finish 12
}

# -- workloads --------------------------------------------------------------------------------

workload_ns_args() {
  ns_args=()
  if [[ -n "${wl_ns[$1]}" ]]; then
    ns_args=(-n "${wl_ns[$1]}")
  fi
}

workload_text() {
  printf '%s/%s%s' "${wl_kind[$1]}" "${wl_name[$1]}" "${wl_ns[$1]:+ in ${wl_ns[$1]}}"
}

# Reads desired/ready/updated and the revision of workload $1 into the wl_ arrays' slot and
# REPLY (the revision; empty when the workload does not exist). Waits for the controller to
# have seen the latest spec so that the revision is not the one from before an apply.
read_workload() {
  local i=$1 revision_path output desired ready updated generation observed revision try
  if [[ "${wl_kind[i]}" == deployment ]]; then
    revision_path='{.metadata.annotations.deployment\.kubernetes\.io/revision}'
  else
    revision_path='{.status.updateRevision}'
  fi
  workload_ns_args "$i"
  for ((try = 1; try <= CONTROLLER_SETTLE_TRIES; try++)); do
    if ! output=$(kube get "${wl_kind[i]}" "${wl_name[i]}" "${ns_args[@]}" --ignore-not-found \
      --request-timeout="$request_timeout" \
      -o "jsonpath={.spec.replicas}|{.status.readyReplicas}|{.status.updatedReplicas}|{.metadata.generation}|{.status.observedGeneration}|$revision_path"); then
      log "$output"
      return 1
    fi
    IFS='|' read -r desired ready updated generation observed revision <<<"$output"
    if [[ -z "$output" || "$generation" == "$observed" ]]; then
      break
    fi
    sleep 1
  done
  wl_desired[i]=$desired
  wl_ready[i]=$ready
  wl_updated[i]=$updated
  REPLY=$revision
}

# Sets REPLY to the traceability annotations of workload $1, tab-separated in TRACE_KEYS order
# (tabs and newlines inside a value would break the state file: such a value counts as unset).
read_trace() {
  local i=$1 output field fields=() rest
  workload_ns_args "$i"
  REPLY=""
  output=$(kube get "${wl_kind[i]}" "${wl_name[i]}" "${ns_args[@]}" --ignore-not-found \
    --request-timeout="$request_timeout" -o "jsonpath=$TRACE_TEMPLATE" 2>/dev/null) || return 1
  if [[ -z "$output" || "$output" == *$'\n'* ]]; then
    return 0
  fi
  rest=$output
  for field in 1 2 3; do
    fields+=("${rest%%$'\t'*}")
    rest=${rest#*$'\t'}
  done
  fields+=("$rest")
  for field in "${fields[@]}"; do
    [[ "$field" == *$'\t'* ]] && field=""
    REPLY+="${REPLY:+$'\t'}$field"
  done
  # Four fields even when all are empty.
  if [[ -z "$REPLY" ]]; then
    REPLY=$'\t\t\t'
  fi
}

record_revisions() {
  local i lines="" meta
  step=apply
  log "==> recording revisions in $state_dir"
  if [[ -e "$state_dir" ]]; then
    fail_early 5 apply "deploy $deploy_id already has state in $state_dir: a run with this id did not finish; run 'rollback --deploy-id $deploy_id' first"
  fi
  now_utc
  printf -v meta 'deploy_id=%s\ncommit=%s\nrun_url=%s\nstarted=%s\n' \
    "$deploy_id" "$commit" "$run_url" "$REPLY"
  # The action's rollback command runs the copy of this script: the uploaded one may be gone.
  # The options too: the rollback command names only the deploy id.
  if ! { mkdir -p -- "$state_dir" && cp -- "${BASH_SOURCE[0]}" "$state_dir/k3s-deploy.sh" &&
    printf '%s' "$meta" >"$state_dir/deploy.txt" && options_text >"$state_dir/options"; } 2>/dev/null; then
    rm -rf -- "$state_dir" 2>/dev/null || true
    fail_early 3 tools "cannot write the state dir $state_dir (run as root, or pass --state-dir)"
  fi
  for i in "${!wl_name[@]}"; do
    if ! read_workload "$i"; then
      rm -rf -- "$state_dir"
      fail_early 4 api "could not read ${wl_kind[i]}/${wl_name[i]} before applying"
    fi
    wl_before[i]=$REPLY
    read_trace "$i" || REPLY=$'\t\t\t'
    wl_trace[i]=$REPLY
    log "$(workload_text "$i"): revision ${wl_before[i]:-(new)}"
    lines+="${wl_kind[i]}"$'\t'"${wl_ns[i]}"$'\t'"${wl_name[i]}"$'\t'"${wl_before[i]}"$'\t'"${wl_trace[i]}"$'\n'
  done
  # Written whole then renamed: a rollback never reads half a file.
  if ! { printf '%s' "$lines" >"$state_dir/revisions.tsv.tmp" &&
    mv -- "$state_dir/revisions.tsv.tmp" "$state_dir/revisions.tsv"; }; then
    rm -rf -- "$state_dir"
    fail_early 3 tools "cannot write $state_dir/revisions.tsv"
  fi
}

load_revisions() {
  local line kind ns rest name revision
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ -z "$line" ]]; then
      continue
    fi
    kind=${line%%$'\t'*}
    rest=${line#*$'\t'}
    ns=${rest%%$'\t'*}
    rest=${rest#*$'\t'}
    name=${rest%%$'\t'*}
    rest=${rest#*$'\t'}
    revision=${rest%%$'\t'*}
    if [[ "$rest" == *$'\t'* ]]; then
      rest=${rest#*$'\t'}
    else
      rest=$'\t\t\t' # a state file without annotations
    fi
    add_workload "$kind" "$ns" "$name" "$revision" "$rest"
  done <"$state_dir/revisions.tsv"
}

apply_bundle() {
  local name rc output
  step=apply
  rollout_started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for name in "${bundle_phase_files[@]}"; do
    if ! lock_still_ours; then
      fail_reason="the deploy lock was taken by someone else; stopped before applying bundle/$name"
      return 1
    fi
    log "==> kubectl apply -f bundle/$name"
    rc=0
    output=$(kube_within_budget apply --validate="$validate" --request-timeout="$request_timeout" \
      -f "$work_dir/bundle/$name" 2>&1) || rc=$?
    log "$output"
    if ((rc == 124)); then
      fail_reason="timed out after ${timeout_seconds}s applying bundle/$name"
      return 2
    elif ((rc != 0)); then
      fail_reason="kubectl apply -f bundle/$name failed: $(first_error_line "$output")"
      return 1
    fi
    if [[ "$name" == 1-namespaces.yaml ]] && ! wait_for_crds; then
      return 1
    fi
  done
}

# A new CustomResourceDefinition is served a moment after it is created; objects of its kind
# can only be applied then.
wait_for_crds() {
  local crd rc until output
  for crd in "${bundle_crds[@]}"; do
    seconds_left
    until=$(($(date +%s) + (REPLY < CRD_ESTABLISHED_SECONDS ? REPLY : CRD_ESTABLISHED_SECONDS)))
    while :; do
      rc=0
      output=$(kube_within_budget wait --for=condition=established \
        --timeout="$((until - $(date +%s) > 1 ? until - $(date +%s) : 1))s" \
        "customresourcedefinition/$crd" --request-timeout="$request_timeout" 2>&1) || rc=$?
      log "$output"
      if ((rc == 0)); then
        break
      fi
      # Right after the create, before the API server has written any condition, real kubectl
      # fails at once (".status.conditions accessor error: <nil> is of the type <nil>") instead
      # of waiting: seen on a real API server. Ask again until the time is up.
      if [[ "$output" == *"accessor error"* ]] && (($(date +%s) < until)); then
        sleep 1
        continue
      fi
      fail_reason="CustomResourceDefinition $crd was not established"
      return 1
    done
  done
}

first_error_line() {
  local line
  while IFS= read -r line; do
    if [[ "$line" == error:* || "$line" == Error* || "$line" == The\ * ]]; then
      printf '%s' "${line#error: }"
      return 0
    fi
  done <<<"$1"
  printf '%s' "see the log"
}

# After apply: which workloads this deploy changed (their new pods are the ones to watch; an
# unchanged workload's pods all count), and the traceability annotations on each.
# The revision each changed workload holds after the apply goes to STATE/ID/applied.tsv: a
# rollback (this run's, or the action's rollback command later) undoes a workload only while
# it still holds it, so a change someone else made since is never undone.
# The bundle's cluster-scoped and kube-system objects (the API says which kinds are cluster-scoped)
# and their resourceVersion before anything is applied. Objects of a kind the bundle itself
# defines are not known to the API yet: only their CustomResourceDefinition is listed.
find_wide_objects() {
  local line kind ns name rest cluster_kinds=" " i
  if grep -q $'^[^\t]*\t\t' "$work_dir/bundle/objects.tsv"; then
    if kube_capture api-resources --namespaced=false --no-headers \
      --request-timeout="$request_timeout"; then
      while IFS= read -r line; do
        kind=${line##* }
        if [[ "$kind" =~ ^[A-Za-z][A-Za-z0-9]*$ ]]; then
          cluster_kinds+="$kind "
        fi
      done <<<"$REPLY"
    else
      log "warning: could not list the cluster-scoped kinds (kubectl api-resources): $(first_line "$KUBE_ERR"); the report names only kube-system objects"
    fi
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    kind=${line%%$'\t'*} rest=${line#*$'\t'}
    ns=${rest%%$'\t'*} rest=${rest#*$'\t'}
    name=${rest%%$'\t'*}
    if [[ -z "$ns" && "$cluster_kinds" == *" $kind "* ]] || [[ "$ns" == kube-system ]]; then
      wide_kind+=("$kind") wide_ns+=("$ns") wide_name+=("$name")
    fi
  done <"$work_dir/bundle/objects.tsv"
  for i in "${!wide_kind[@]}"; do
    read_resource_version "$i"
    wide_before[i]=$REPLY
  done
}

# Sets REPLY to wide object $1's resourceVersion ("" when it does not exist; "?" when unknown).
read_resource_version() {
  local i=$1 where=()
  if [[ -n "${wide_ns[i]}" ]]; then
    where=(-n "${wide_ns[i]}")
  fi
  if ! kube_capture get "${wide_kind[i]}" "${wide_name[i]}" "${where[@]}" --ignore-not-found \
    --request-timeout="$request_timeout" -o 'jsonpath={.metadata.resourceVersion}'; then
    REPLY="?"
  elif [[ ! "$REPLY" =~ ^[[:alnum:]]*$ ]]; then
    REPLY="?"
  fi
}

# After the apply (whole or not): the wide objects whose resourceVersion moved.
note_wide_changes() {
  local i shown
  for i in "${!wide_kind[@]}"; do
    read_resource_version "$i"
    if [[ "$REPLY" == "${wide_before[i]}" || "$REPLY" == "?" || "${wide_before[i]}" == "?" ]]; then
      continue
    fi
    shown="${wide_kind[i]}/${wide_name[i]}"
    if [[ -n "${wide_ns[i]}" ]]; then
      shown="${wide_kind[i]} ${wide_ns[i]}/${wide_name[i]}"
    fi
    if [[ -z "$REPLY" ]]; then
      wide_changes+=("deleted $shown")
    elif [[ -z "${wide_before[i]}" ]]; then
      wide_changes+=("created $shown")
    else
      wide_changes+=("changed $shown")
    fi
  done
  if ((${#wide_changes[@]} > 0)); then
    join_by_comma "${wide_changes[@]}"
    log "cluster-wide and kube-system objects this deploy changed: ${REPLY//,/, }"
  fi
}

after_apply() {
  local i lines=""
  for i in "${!wl_name[@]}"; do
    if read_workload "$i"; then
      wl_after[i]=$REPLY
    fi
    if [[ "${wl_after[i]}" != "${wl_before[i]}" ]]; then
      wl_since[i]=$rollout_started_at
      if [[ -n "${wl_after[i]}" ]]; then
        lines+="${wl_kind[i]}/${wl_ns[i]}/${wl_name[i]}"$'\t'"${wl_after[i]}"$'\n'
      fi
    else
      wl_since[i]=""
    fi
  done
  # Written whole then renamed. Without it (a kill before this line) a rollback undoes every
  # workload whose revision moved, as it did before this file existed.
  if ! { printf '%s' "$lines" >"$state_dir/applied.tsv.tmp" &&
    mv -- "$state_dir/applied.tsv.tmp" "$state_dir/applied.tsv"; }; then
    log "warning: could not write $state_dir/applied.tsv: a rollback will undo every workload whose revision moved"
  fi
  if lock_still_ours; then
    annotate_workloads
  fi
}

# Writes commit, run URL, time and deploy id to each workload's own metadata. Not to its pod
# template: that would make a new revision and roll the pods.
annotate_workloads() {
  local i output updates=() now update
  if ((${#wl_name[@]} == 0)); then
    return 0
  fi
  now_utc
  now=$REPLY
  trace_updates "$commit" "$run_url" "$now" "$deploy_id"
  for update in "${REPLY_ARRAY[@]}"; do
    if [[ "$update" != *- ]]; then
      updates+=("$update") # the values known; an unknown commit or run URL is left out
    fi
  done
  log "==> annotating the workloads (${updates[*]})"
  for i in "${!wl_name[@]}"; do
    workload_ns_args "$i"
    if output=$(kube annotate --overwrite "${wl_kind[i]}/${wl_name[i]}" "${ns_args[@]}" \
      "${updates[@]}" --request-timeout="$request_timeout" 2>&1); then
      log "$output"
    else
      log "$output"
      log "warning: could not annotate ${wl_kind[i]}/${wl_name[i]}: $(first_line "$output")"
      annotate_failures+="${annotate_failures:+, }${wl_kind[i]}/${wl_name[i]}"
    fi
  done
}

# Sets REPLY_ARRAY to `kubectl annotate` arguments for the values $1..$4 (TRACE_KEYS order):
# KEY=VALUE for a value, KEY- (remove) for an empty one.
REPLY_ARRAY=()
trace_updates() {
  local values=("$@") i
  REPLY_ARRAY=()
  for i in "${!TRACE_KEYS[@]}"; do
    if [[ -n "${values[i]:-}" ]]; then
      REPLY_ARRAY+=("$ANNOTATION_PREFIX/${TRACE_KEYS[i]}=${values[i]}")
    else
      REPLY_ARRAY+=("$ANNOTATION_PREFIX/${TRACE_KEYS[i]}-")
    fi
  done
}

# After an undo: the workload's annotations go back to what they said before this deploy.
restore_trace() {
  local i=$1 values=() rest output field
  rest=${wl_trace[i]}
  for field in 1 2 3; do
    values+=("${rest%%$'\t'*}")
    rest=${rest#*$'\t'}
  done
  values+=("$rest")
  trace_updates "${values[@]}"
  workload_ns_args "$i"
  if ! output=$(kube annotate --overwrite "${wl_kind[i]}/${wl_name[i]}" "${ns_args[@]}" \
    "${REPLY_ARRAY[@]}" --request-timeout="$request_timeout" 2>&1); then
    log "warning: could not restore the annotations of ${wl_kind[i]}/${wl_name[i]}: $(first_line "$output")"
  fi
}

# -- waiting for rollouts, failing fast -------------------------------------------------------

# Prints the UIDs of the controllers that own workload $1's pods: the StatefulSet's own, or
# those of the Deployment's ReplicaSets. UIDs are the API server's own (immutable, made by it),
# so pods are selected by them and never by parsing who they say owns them.
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
  local i=$1 uid template="" listing line pod
  while IFS= read -r uid; do
    if [[ -n "$uid" ]]; then
      template+="{range .items[?(@.metadata.ownerReferences[0].uid==\"$uid\")]}$POD_LINE_TEMPLATE{end}"
    fi
  done < <(workload_owner_uids "$i")
  if [[ -z "$template" ]]; then
    return 0
  fi
  workload_ns_args "$i"
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
    printf '%s of %s ready, %s updated' "${wl_ready[$1]:-0}" "${wl_desired[$1]:-0}" \
      "${wl_updated[$1]:-0}"
  fi
}

wait_for_workloads() {
  local i rc
  step=rollout
  for i in "${!wl_name[@]}"; do
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
        problem="$(workload_text "$i"): ${wl_ready[i]:-0} of ${wl_desired[i]:-0} ready, ${wl_updated[i]:-0} updated"
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

# -- rollback ---------------------------------------------------------------------------------

# A StatefulSet does not replace a pod that never became ready, even once its template is
# reverted (Kubernetes' "forced rollback" note): delete such pods so the old revision returns.
release_stuck_statefulset_pods() {
  local i=$1 pod created revision deleting phase readiness restarts reasons update
  workload_ns_args "$i"
  read_workload "$i" || return 0
  update=$REPLY
  while IFS='|' read -r pod created revision deleting phase readiness restarts reasons; do
    if [[ "$revision" != "$update" && -z "$deleting" ]] && [[ " $readiness " == *" false "* ]]; then
      log "deleting pod $pod: it runs revision $revision, never became ready, and the StatefulSet will not replace it by itself"
      kube delete pod "$pod" "${ns_args[@]}" --wait=false --request-timeout="$request_timeout" || true
    fi
  done < <(workload_pods "$i")
}

# Undoes the workloads whose revision differs from the one recorded before the deploy, and
# puts their traceability annotations back. Sets rollback_status to done, failed or
# nothing-changed.
roll_back_changed() {
  local until=$1 i output current undone=() failed=0 done_count=0
  local undone_file="$state_dir/undone.tsv" undoing_file="$state_dir/undoing.tsv" line key
  local applied_file="$state_dir/applied.tsv" to_revision
  local -A already_undone=() undoing=() applied=()
  # Pods the undo creates are the new ones the fail-fast check looks at.
  rollout_started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  # A rollback interrupted earlier: its undos created new revisions, and undoing those again
  # would bring the failed template back. undone.tsv has the revision each undo left;
  # undoing.tsv the revision each undo started from, written before the undo, for a kill
  # that lands between the undo and its line in undone.tsv.
  # A line cut short by a kill (or an empty one) has no key: skipped, as a key of nothing
  # would abort the script (bash refuses an empty subscript) before it could report.
  if [[ -f "$undone_file" ]]; then
    while IFS=$'\t' read -r line current; do
      if [[ -n "$line" ]]; then
        already_undone[$line]=$current
      fi
    done <"$undone_file"
  fi
  if [[ -f "$undoing_file" ]]; then
    while IFS=$'\t' read -r line current; do
      if [[ -n "$line" ]]; then
        undoing[$line]=$current
      fi
    done <"$undoing_file"
  fi
  if [[ -f "$applied_file" ]]; then
    while IFS=$'\t' read -r line current; do
      if [[ -n "$line" ]]; then
        applied[$line]=$current
      fi
    done <"$applied_file"
  fi
  log "==> rolling back what this deploy changed"
  if ! lock_still_ours read; then
    # Another deploy holds the cluster now: undoing would race it. The rollback command the
    # action sends (or a person) can do it once the lock is free.
    log "the deploy lock is no longer this deploy's: nothing undone (another deploy may be changing these workloads)"
    rollback_status=failed
    return 0
  fi
  for i in "${!wl_name[@]}"; do
    if ! read_workload "$i"; then
      wl_undo[i]=failed
      failed=$((failed + 1))
      continue
    fi
    current=$REPLY
    key="${wl_kind[i]}/${wl_ns[i]}/${wl_name[i]}"
    if [[ -n "${undoing[$key]:-}" && "${undoing[$key]}" != "$current" && -z "${already_undone[$key]:-}" ]]; then
      # The revision moved since an interrupted rollback was about to undo it (the deploy
      # lock keeps every other writer out): that undo went through.
      log "${wl_kind[i]}/${wl_name[i]}: already rolled back (revision $current) by a rollback that was interrupted"
      wl_after[i]=${wl_after[i]:-${undoing[$key]}}
      wl_undo[i]="done"
      undone+=("$i")
      printf '%s\t%s\n' "$key" "$current" >>"$undone_file" || true
      restore_trace "$i"
      continue
    fi
    if [[ -z "${wl_after[i]}" ]]; then
      wl_after[i]=$current
    fi
    if [[ "$current" == "${wl_before[i]}" ]]; then
      log "${wl_kind[i]}/${wl_name[i]}: unchanged (revision ${current:-none}), left alone"
      continue
    fi
    if [[ -z "$current" ]]; then
      log "${wl_kind[i]}/${wl_name[i]}: not created, nothing to undo"
      continue
    fi
    if [[ "${already_undone[$key]:-}" == "$current" ]]; then
      log "${wl_kind[i]}/${wl_name[i]}: already rolled back (revision $current)"
      wl_undo[i]="done"
      undone+=("$i")
      continue
    fi
    if [[ -n "${applied[$key]:-}" && "$current" != "${applied[$key]}" ]]; then
      # Not this deploy's revision any more: another deploy (or a person) changed it since,
      # and undoing it would revert their change, or bring back this deploy's template.
      log "warning: ${wl_kind[i]}/${wl_name[i]}: changed by someone else since this deploy applied it (revision ${applied[$key]}, now $current): left alone"
      wl_undo[i]=superseded
      continue
    fi
    # Back to the exact revision recorded before the deploy, never to what `rollout undo`
    # calls previous (the highest other number, which another deploy's change in between
    # would be). A Deployment's revision is its number. A StatefulSet's is the name of a
    # ControllerRevision, whose number is read now: going back to a template renumbers its
    # ControllerRevision, so a number recorded earlier could name nothing by now.
    workload_ns_args "$i"
    to_revision=()
    if [[ "${wl_kind[i]}" == deployment && "${wl_before[i]}" =~ ^[0-9]+$ ]]; then
      to_revision=(--to-revision="${wl_before[i]}")
    elif [[ "${wl_kind[i]}" == statefulset && -n "${wl_before[i]}" ]]; then
      if kube_capture get controllerrevision "${wl_before[i]}" "${ns_args[@]}" \
        --request-timeout="$request_timeout" -o 'jsonpath={.revision}' &&
        [[ "$REPLY" =~ ^[0-9]+$ ]]; then
        to_revision=(--to-revision="$REPLY")
      else
        log "${wl_kind[i]}/${wl_name[i]}: its revision before the deploy (${wl_before[i]}) is no longer in its history${KUBE_ERR:+: $(first_line "$KUBE_ERR")}; undo failed (roll it back by hand: kubectl rollout history)"
        wl_undo[i]=failed
        failed=$((failed + 1))
        continue
      fi
    fi
    if ! printf '%s\t%s\n' "$key" "$current" >>"$undoing_file"; then
      log "warning: could not record the undo of ${wl_kind[i]}/${wl_name[i]} in $undoing_file; a rollback run after a kill may undo it twice"
    fi
    workload_ns_args "$i"
    if output=$(kube rollout undo "${wl_kind[i]}/${wl_name[i]}" "${ns_args[@]}" "${to_revision[@]}" \
      --request-timeout="$request_timeout" 2>&1); then
      log "$output"
      wl_undo[i]="done"
      undone+=("$i")
      # Without a wait (a signal), each call counts: undoing.tsv already guards against a
      # second undo, and the traceability annotations stay as this deploy wrote them.
      if [[ "$rollback_wait" == true ]]; then
        if read_workload "$i"; then
          printf '%s\t%s\n' "$key" "$REPLY" >>"$undone_file" || true
        fi
        restore_trace "$i"
      fi
    elif [[ "$output" == *"${NO_HISTORY_MESSAGES[0]}"* || "$output" == *"${NO_HISTORY_MESSAGES[1]}"* ]]; then
      # New in this deploy: there is no earlier revision to go back to. Reported, not fatal.
      log "$output"
      log "${wl_kind[i]}/${wl_name[i]}: no earlier revision (new in this deploy), left as applied"
      wl_undo[i]=no-history
    else
      log "$output"
      log "${wl_kind[i]}/${wl_name[i]}: undo failed"
      wl_undo[i]=failed
      failed=$((failed + 1))
    fi
  done
  if [[ "$rollback_wait" != true ]]; then
    if ((failed > 0)); then
      rollback_status=failed
    elif ((${#undone[@]} > 0)); then
      rollback_status="done"
    else
      rollback_status=nothing-changed
    fi
    log "rollback: $rollback_status (undos sent, not waited for)"
    return 0
  fi
  for i in "${undone[@]}"; do
    if [[ "${wl_kind[i]}" == statefulset ]]; then
      release_stuck_statefulset_pods "$i"
    fi
  done
  # The report's failure stays the deploy's, whatever the waits below find.
  local saved=("$failure_workload" "$failure_namespace" "$failure_pod" "$failure_container"
    "$failure_reason" "$failure_message") saved_log=("${failure_log[@]}")
  for i in "${undone[@]}"; do
    wl_since[i]=$rollout_started_at
    if wait_for_rollout "$i" "$until"; then
      done_count=$((done_count + 1))
      read_workload "$i" || true
      log "${wl_kind[i]}/${wl_name[i]}: rolled back, ready ${wl_ready[i]:-0}/${wl_desired[i]:-0}"
    else
      log "${wl_kind[i]}/${wl_name[i]}: not ready after the undo: $fail_reason"
      wl_undo[i]=failed
      failed=$((failed + 1))
      read_workload "$i" || true
    fi
  done
  failure_workload=${saved[0]} failure_namespace=${saved[1]} failure_pod=${saved[2]}
  failure_container=${saved[3]} failure_reason=${saved[4]} failure_message=${saved[5]}
  failure_log=("${saved_log[@]}")
  if ((failed > 0)); then
    rollback_status=failed
  elif ((done_count > 0)); then
    rollback_status="done"
  else
    rollback_status=nothing-changed
  fi
  log "rollback: $rollback_status"
}

# -- reporting --------------------------------------------------------------------------------

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

# -- entry points -----------------------------------------------------------------------------

run_deploy() {
  local rc
  deadline=$(($(date +%s) + timeout_seconds))
  unpack_bundle
  deadline=$(($(date +%s) + timeout_seconds))
  lock_duration=$((lock_timeout_seconds + timeout_seconds + rollback_timeout_seconds + LOCK_MARGIN_SECONDS))
  log "k3s-deploy: deploy $deploy_id${commit:+ (commit $commit)}${run_url:+ from $run_url}"
  check_tools
  check_api
  acquire_lock
  # The budget starts once the lock is held: waiting for another deploy is not rollout time.
  deadline=$(($(date +%s) + timeout_seconds))
  check_bundle
  server_dry_run_bundle
  if ! lock_still_ours read; then
    fail_early 6 lock "the deploy lock (Lease $LOCK_NAMESPACE/$LOCK_NAME) was taken by someone else before this deploy changed anything: $(lock_holder_text)"
  fi
  record_revisions
  find_wide_objects
  # From here bash runs apply_bundle, wait_for_workloads and verify_health with errexit off
  # (a function called in an `||` list). That is the decision, not an accident: once the
  # cluster has changed, no unexpected failure may end the script before the rollback and the
  # report, so each of these checks every command whose failure matters and returns 1 (failed)
  # or 2 (timed out); the rest (log lines, annotations) may fail without changing the outcome.
  rc=0
  apply_bundle || rc=$?
  if ((rc != 2)); then
    note_wide_changes
  fi
  if ((rc == 0)); then
    after_apply
    wait_for_workloads || rc=$?
  fi
  if ((rc == 0)); then
    verify_health || rc=$?
  fi
  if ((rc == 0)); then
    if ((${#wl_name[@]} == 0)); then
      message="applied ${#bundle_phase_files[@]} manifest file(s); no workloads to wait for"
    else
      message="all ${#wl_name[@]} workload(s) ready and healthy"
    fi
    if [[ -n "$annotate_failures" ]]; then
      message+=" (could not annotate: $annotate_failures)"
    fi
    log "$message"
    finish_after_changes success
  fi
  if ((rc == 2)); then
    handle_failure timed-out
  fi
  handle_failure failed
}

run_dry_run() {
  local count
  deadline=$(($(date +%s) + timeout_seconds))
  unpack_bundle
  deadline=$(($(date +%s) + timeout_seconds))
  log "k3s-deploy: dry run $deploy_id: checks and kubectl diff only, nothing is changed (no lock taken)"
  check_tools
  check_api
  check_bundle
  server_dry_run_bundle
  diff_bundle
  print_diff
  count=${#diff_changes[@]}
  if ((count == 0)); then
    message="dry run: the cluster already matches the manifests; nothing was changed"
  else
    join_by_comma "${diff_changes[@]:0:20}"
    message="dry run: $count object(s) would change: ${REPLY//,/, }"
    if ((count > 20)); then
      message+=", ..."
    fi
    message+="; nothing was changed"
  fi
  log "$message"
  result=success
  step="done"
  finish 0
}

run_rollback() {
  if [[ -d "$state_dir" && ! -f "$state_dir/$ROLLED_BACK_FILE" ]]; then
    load_options "$state_dir/options"
  fi
  deadline=$(($(date +%s) + rollback_timeout_seconds))
  lock_duration=$((lock_timeout_seconds + rollback_timeout_seconds + LOCK_MARGIN_SECONDS))
  log "k3s-deploy: rollback of deploy $deploy_id"
  result=timed-out
  check_tools
  step=rollback
  if [[ -f "$state_dir/$ROLLED_BACK_FILE" ]]; then
    rollback_status="done"
    message="deploy $deploy_id was rolled back by its own script when it was interrupted: $(head -c 1000 -- "$state_dir/$ROLLED_BACK_FILE")"
    rm -rf -- "$state_dir"
    log "$message"
    finish 10
  fi
  if [[ ! -d "$state_dir" ]]; then
    rollback_status=nothing-changed
    message="no unfinished deploy $deploy_id in $state_root (it finished, or never started applying); nothing undone"
    log "$message"
    finish 12
  fi
  check_api
  acquire_lock
  deadline=$(($(date +%s) + rollback_timeout_seconds))
  step=rollback
  if [[ ! -f "$state_dir/revisions.tsv" ]]; then
    # Killed before it recorded revisions, so before it applied anything.
    rm -rf -- "$state_dir"
    rollback_status=nothing-changed
    message="deploy $deploy_id stopped before applying anything; nothing undone"
    log "$message"
    finish 12
  fi
  load_revisions
  roll_back_changed "$deadline"
  message="deploy $deploy_id did not finish; $(rollback_summary)"
  finish_after_changes timed-out
}

main() {
  parse_arguments "$@"
  make_work_dir
  kube_err_file="$work_dir/kubectl.err"
  case "$command" in
  deploy) run_deploy ;;
  dry-run) run_dry_run ;;
  *) run_rollback ;;
  esac
}

main "$@"
