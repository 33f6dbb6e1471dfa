#!/usr/bin/env bash
# k3s-deploy.sh: applies a manifest bundle on the K3s master, waits for the rollout, undoes
# what it changed when the deploy fails, and prints a JSON report. It runs under SSM Run
# Command; the action uploads it next to the bundle. docs/internals.md has the contract.
#
# Usage:
#   k3s-deploy.sh deploy   --bundle FILE --deploy-id ID [options]
#   k3s-deploy.sh rollback --deploy-id ID [options]
#
#   deploy    checks the tools and the API, checks the bundle (every object parses and every
#             namespace it needs exists or is in the bundle), records each workload's revision
#             in STATE/ID/revisions.tsv, applies the phase files in order, waits for each
#             workload, and on failure undoes only the workloads whose revision changed.
#   rollback  for the action, after a deploy it could not wait for (timeout, cancel): undoes
#             what that deploy changed, using STATE/ID/revisions.tsv.
#
# Options:
#   --kubectl CMD           kubectl command, may be several words ("k3s kubectl"); default kubectl
#   --namespace NS          namespace whose pods and events are reported (default: the
#                           workloads' namespaces)
#   --timeout SECONDS       budget for the deploy: API check, apply, rollout waits (default 600)
#   --rollback true|false   undo changed workloads when the deploy fails (default true)
#   --rollback-timeout S    budget for waiting on undone rollouts (default 120)
#   --request-timeout DUR   kubectl --request-timeout (default 60s)
#   --validate true|false   kubectl --validate (default false: schema download is slow on small
#                           masters)
#   --state-dir DIR         where a deploy keeps its revisions until it is over
#                           (default ${K3S_DEPLOY_STATE_DIR:-/var/lib/k3s-deploy})
#   --commit SHA, --run-url URL   recorded in the log and the state dir (may be empty)
#
# Output: the log on stdout (kubectl's stderr merged into it); on stderr only the JSON report
# between ===K3S-DEPLOY-REPORT-BEGIN=== and ===K3S-DEPLOY-REPORT-END=== (SSM returns only
# 8,000 characters of stderr, so the report stays under 7,500).
#
# Exit codes (never 194 or 3010: the SSM agent reads those as reboot requests):
#   0  success: every workload ready
#   2  usage error (bad arguments; nothing was run)
#   3  a tool is missing on the master (or the state dir cannot be created)
#   4  Kubernetes API not healthy
#   5  bundle rejected before anything changed
#   6  another deploy holds the lock
#   7  deploy failed, changed workloads rolled back
#   8  deploy failed, rollback failed
#   9  deploy failed, nothing rolled back (rollback off, or nothing had changed)
#   10 timed out, changed workloads rolled back (rollback: changed workloads undone)
#   11 timed out, rollback failed               (rollback: an undo failed)
#   12 timed out, nothing rolled back           (rollback: nothing to undo)
# A run stopped by a signal exits 128+N (143 for SIGTERM) and keeps STATE/ID for `rollback`.
set -euo pipefail

# Byte-wise string operations: the report limit is counted in bytes (never fewer than SSM's
# characters) and the JSON escaper works on ASCII control bytes.
export LC_ALL=C

readonly REPORT_BEGIN='===K3S-DEPLOY-REPORT-BEGIN==='
readonly REPORT_END='===K3S-DEPLOY-REPORT-END==='
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
# A container may crash once or twice while what it needs comes up; more is a crash loop.
readonly CRASH_LOOP_MIN_RESTARTS=2
# After apply, a controller needs a moment to record the new revision (observedGeneration).
readonly CONTROLLER_SETTLE_TRIES=10
readonly API_CHECK_TRIES=3
# How long a new CustomResourceDefinition may take to be served before its objects are applied.
readonly CRD_ESTABLISHED_SECONDS=60
readonly KUBECTL_WORD_PATTERN='^[A-Za-z0-9_./:=-]+$'
readonly DNS_LABEL_PATTERN='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
readonly DNS_NAME_PATTERN='^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$'
readonly DEPLOY_ID_PATTERN='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
readonly NO_HISTORY_MESSAGES=("no rollout history found" "no last revision to roll back to")
# One line per object the bundle would apply (kubectl defaults the namespace of namespaced
# objects, so an empty namespace means a cluster-scoped object); the last field is the kind a
# CustomResourceDefinition defines.
readonly OBJECT_LIST_TEMPLATE='{.kind}|{.metadata.namespace}|{.metadata.name}|{.spec.names.kind}{"\n"}'
readonly POD_LIST_TEMPLATE='{range .items[*]}{.metadata.name}|{.metadata.ownerReferences[0].kind}|{.metadata.ownerReferences[0].name}|{.metadata.creationTimestamp}|{.metadata.labels.controller-revision-hash}|{.status.containerStatuses[*].ready}|{.status.containerStatuses[*].restartCount}|{.status.initContainerStatuses[*].state.waiting.reason} {.status.containerStatuses[*].state.waiting.reason}{"\n"}{end}'

# Options.
command=""
bundle=""
deploy_id=""
kubectl_words="kubectl"
report_namespace=""
timeout_seconds=600
rollback_enabled=true
rollback_timeout_seconds=120
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
report_printed=false
interrupted=false
state_dir=""
work_dir=""
lock_path=""
lock_held=false
deadline=0
rollout_started_at=""
fail_reason=""

# Report.
result="failed"
step="tools"
message=""
rollback_status="not-needed"
report_pods=()
report_events=()
wl_kind=()
wl_ns=()
wl_name=()
wl_before=()
wl_after=()
wl_desired=()
wl_ready=()
wl_updated=()
wl_outcome=() # ready | failed | timed-out | "" (not waited for)
wl_undo=()    # done | no-history | failed | "" (not undone)

exec 3>&2 2>&1

log() {
  printf '%s\n' "$*"
}

# shellcheck disable=SC2329 # called by the EXIT trap
cleanup() {
  local code=$?
  # Stopped by an unexpected error before anything changed: still say so in a report. Once
  # the state dir exists (or on a signal) there is deliberately no report: the action then
  # knows the deploy did not finish and runs `rollback --deploy-id`, which uses that dir.
  if [[ "$report_printed" != true && "$interrupted" != true ]] && ((code != 0)) &&
    [[ -z "$state_dir" || ! -d "$state_dir" ]]; then
    message="the deploy script stopped unexpectedly (exit $code) during step $step; see the log"
    build_report
    printf '%s\n%s\n%s\n' "$REPORT_BEGIN" "$REPLY" "$REPORT_END" >&3
  fi
  if [[ -n "$work_dir" ]]; then
    rm -rf -- "$work_dir"
  fi
  if [[ "$lock_held" == true ]]; then
    rm -f -- "$lock_path"
  fi
}
trap cleanup EXIT

# shellcheck disable=SC2329 # called by the signal traps
on_signal() {
  # Killed mid-deploy: keep the state dir so `rollback --deploy-id` can undo what changed.
  log "interrupted by SIG$1; the action can undo this deploy with: rollback --deploy-id $deploy_id"
  interrupted=true
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

usage() {
  log "usage: k3s-deploy.sh deploy --bundle FILE --deploy-id ID [options]"
  log "       k3s-deploy.sh rollback --deploy-id ID [options]"
  log "options: --kubectl CMD --namespace NS --timeout SECONDS --rollback true|false"
  log "         --rollback-timeout SECONDS --request-timeout DUR --validate true|false"
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

# Sets REPLY to the JSON string literal for $1.
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

# Sets REPLY to the report's fields up to and including the workloads.
report_head() {
  local text=$1 workload_count=$2 head
  json_string "$deploy_id"
  head='{"version":1,"deploy_id":'"$REPLY"',"result":"'"$result"'","step":"'"$step"'"'
  json_string "$text"
  head+=',"message":'"$REPLY"',"rollback":"'"$rollback_status"'"'
  workloads_json "$workload_count"
  REPLY="$head,\"workloads\":$REPLY"
}

# Sets REPLY to the report, shortened to fit: oldest events and last pods go first, then the
# message is cut, then workloads are left out (the message says how many).
build_report() {
  local pods=() events=() line i size head text=$message workload_count=${#wl_name[@]}
  local pod_count event_start=0 pods_part
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
    report_head "$text" "$workload_count"
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
    elif ((workload_count > 0)); then
      workload_count=$((workload_count - 1))
      truncate_text 1000 "$message"
      text="$REPLY (report shortened: $((${#wl_name[@]} - workload_count)) workloads left out)"
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
  # Ends the run before anything changed: usage, tools, API, bundle, lock.
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
    usage_error "missing command: deploy or rollback"
  fi
  command=$1
  shift
  case "$command" in
  deploy | rollback) ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) usage_error "unknown command '$command': expected deploy or rollback" ;;
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
    --kubectl) kubectl_words=$value ;;
    --namespace) report_namespace=$value ;;
    --timeout) timeout_seconds=$value ;;
    --rollback) rollback_enabled=$value ;;
    --rollback-timeout) rollback_timeout_seconds=$value ;;
    --request-timeout) request_timeout=$value ;;
    --validate) validate=$value ;;
    --state-dir) state_root=$value ;;
    --commit) commit=$value ;;
    --run-url) run_url=$value ;;
    *) usage_error "unknown option $option" ;;
    esac
  done
  validate_arguments
}

validate_arguments() {
  local word
  if [[ ! "$deploy_id" =~ $DEPLOY_ID_PATTERN ]]; then
    usage_error "--deploy-id must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got '$deploy_id'"
  fi
  if [[ "$command" == deploy && -z "$bundle" ]]; then
    usage_error "deploy needs --bundle FILE"
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
  check_seconds --timeout "$timeout_seconds"
  check_seconds --rollback-timeout "$rollback_timeout_seconds"
  check_boolean --rollback "$rollback_enabled"
  check_boolean --validate "$validate"
  if [[ ! "$request_timeout" =~ ^[0-9]+[smh]?$ ]]; then
    usage_error "--request-timeout must be a whole number with an optional unit s, m or h (like 60s), got '$request_timeout'"
  fi
  if [[ -n "$report_namespace" && ! "$report_namespace" =~ $DNS_LABEL_PATTERN ]]; then
    usage_error "--namespace must be a Kubernetes namespace name, got '$report_namespace'"
  fi
  if [[ -z "$state_root" ]]; then
    usage_error "--state-dir is empty"
  fi
  state_dir="$state_root/$deploy_id"
}

check_seconds() {
  if [[ ! "$2" =~ ^[0-9]{1,6}$ ]] || (($2 < 1)); then
    usage_error "$1 must be a whole number of seconds between 1 and 999999, got '$2'"
  fi
}

check_boolean() {
  if [[ "$2" != true && "$2" != false ]]; then
    usage_error "$1 must be true or false, got '$2'"
  fi
}

# -- tools, lock, budget ----------------------------------------------------------------------

check_tools() {
  local tools=(date mkdir mktemp cp mv rm ln readlink sleep timeout) missing=() tool
  if [[ "$command" == deploy ]]; then
    tools+=(tar gzip)
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
    fail_early 3 tools "missing on the master: ${missing[*]} (install it or fix PATH)"
  fi
}

# One deploy at a time per master. The lock is a symlink naming its holder's PID: creating it
# is atomic and carries the PID, so a lock left by a killed run (SSM kills with SIGKILL after
# executionTimeout, no trap runs) is recognised and taken over.
acquire_lock() {
  local holder
  if ! mkdir -p -- "$state_root" 2>/dev/null; then
    fail_early 3 tools "cannot create the state dir $state_root (run as root, or pass --state-dir)"
  fi
  lock_path="$state_root/.lock"
  if ln -s -- "$$" "$lock_path" 2>/dev/null; then
    lock_held=true
    return 0
  fi
  holder=$(readlink -- "$lock_path" 2>/dev/null || true)
  if is_deploy_process "$holder"; then
    fail_early 6 tools "another deploy (process $holder) holds the lock $lock_path"
  fi
  log "taking over the lock left by process ${holder:-unknown}, which is gone"
  rm -f -- "$lock_path"
  if ! ln -s -- "$$" "$lock_path" 2>/dev/null; then
    fail_early 6 tools "another deploy took the lock $lock_path"
  fi
  lock_held=true
}

# True when process $1 runs this script. After a reboot the PID in a stale lock can belong to
# anything; only a running k3s-deploy.sh holds the lock.
is_deploy_process() {
  local arg cmdline=""
  if [[ ! "$1" =~ ^[0-9]+$ ]]; then
    return 1
  fi
  # kill -0 fails for a live process of another user too; /proc tells those apart.
  if ! kill -0 "$1" 2>/dev/null && [[ ! -d "/proc/$1" ]]; then
    return 1
  fi
  if [[ ! -r "/proc/$1/cmdline" ]]; then
    return 0 # no /proc to ask: trust the PID
  fi
  while IFS= read -r -d '' arg; do
    cmdline+="$arg "
  done <"/proc/$1/cmdline"
  [[ "$cmdline" == *k3s-deploy* ]]
}

seconds_left() {
  REPLY=$((deadline - $(date +%s)))
}

kube() {
  "${kubectl_cmd[@]}" "$@"
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

# -- bundle -----------------------------------------------------------------------------------

unpack_bundle() {
  local line kind ns name rest
  step=apply
  if [[ ! -f "$bundle" ]]; then
    fail_early 5 apply "bundle $bundle not found"
  fi
  if ! work_dir=$(mktemp -d "${TMPDIR:-/tmp}/k3s-deploy.XXXXXX"); then
    work_dir=""
    fail_early 3 tools "cannot create a temporary directory in ${TMPDIR:-/tmp}"
  fi
  if ! tar -xzf "$bundle" -C "$work_dir" --no-same-owner --no-same-permissions; then
    fail_early 5 apply "bundle $bundle is not a readable .tar.gz"
  fi
  bundle_phase_files=()
  for name in "${PHASE_FILES[@]}"; do
    if [[ -f "$work_dir/bundle/$name" ]]; then
      bundle_phase_files+=("$name")
    fi
  done
  if ((${#bundle_phase_files[@]} == 0)); then
    fail_early 5 apply "bundle has no manifests (expected bundle/1-namespaces.yaml ... bundle/5-workloads.yaml)"
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
      fail_early 5 apply "bundle/workloads.tsv: bad line '$line' (expected KIND<TAB>NAMESPACE<TAB>NAME, KIND deployment or statefulset)"
    fi
    add_workload "$kind" "$ns" "$name" ""
  done <"$work_dir/bundle/workloads.tsv"
  order_workloads
}

add_workload() {
  wl_kind+=("$1")
  wl_ns+=("$2")
  wl_name+=("$3")
  wl_before+=("$4")
  wl_after+=("")
  wl_desired+=("")
  wl_ready+=("")
  wl_updated+=("")
  wl_outcome+=("")
  wl_undo+=("")
}

# Waits follow the apply order: StatefulSets (phase 4) before Deployments (phase 5).
order_workloads() {
  local kinds=("${wl_kind[@]}") nss=("${wl_ns[@]}") names=("${wl_name[@]}") befores=("${wl_before[@]}")
  local wanted i
  wl_kind=() wl_ns=() wl_name=() wl_before=() wl_after=() wl_desired=() wl_ready=()
  wl_updated=() wl_outcome=() wl_undo=()
  for wanted in statefulset deployment; do
    for i in "${!kinds[@]}"; do
      if [[ "${kinds[i]}" == "$wanted" ]]; then
        add_workload "${kinds[i]}" "${nss[i]}" "${names[i]}" "${befores[i]}"
      fi
    done
  done
}

# kubectl apply goes on past an object it cannot apply and applies the rest, so problems must
# be found before the first apply: every document must parse and map to a known kind (client
# dry run), and every namespace an object needs must exist or be in the bundle.
check_bundle() {
  local name file listing errors kind ns object_name defined_kind rc
  local -A declared=() needed_by=()
  errors="$work_dir/dry-run.err"
  log "==> checking the bundle"
  for name in "${bundle_phase_files[@]}"; do
    file="$work_dir/bundle/$name"
    rc=0
    listing=$(kube_within_budget apply --dry-run=client --validate="$validate" \
      --request-timeout="$request_timeout" -f "$file" -o "jsonpath=$OBJECT_LIST_TEMPLATE" \
      2>"$errors") || rc=$?
    if ((rc != 0)); then
      log "$(<"$errors")"
      if ((rc == 124)); then
        timed_out_before_changes
      fi
      if only_kinds_from_bundle_crds "$errors"; then
        # kubectl cannot map them before their CustomResourceDefinitions exist.
        log "bundle/$name: objects of kinds this bundle defines are checked when applied"
      else
        fail_early 5 apply "bundle/$name was rejected by kubectl: $(first_line "$(<"$errors")")"
      fi
    fi
    while IFS='|' read -r kind ns object_name defined_kind; do
      if [[ "$kind" == Namespace ]]; then
        declared[$object_name]=1
      elif [[ "$kind" == CustomResourceDefinition ]]; then
        bundle_crds+=("$object_name")
        bundle_crd_kinds[$defined_kind]=1
      elif [[ -n "$ns" ]]; then
        needed_by[$ns]+="${needed_by[$ns]:+, }${kind,,}/$object_name"
      fi
    done <<<"$listing"
  done
  for ns in "${!needed_by[@]}"; do
    if [[ -n "${declared[$ns]:-}" ]]; then
      continue
    fi
    if ! listing=$(kube_within_budget get namespace "$ns" --ignore-not-found \
      --request-timeout="$request_timeout" -o name); then
      fail_early 4 api "could not check that namespace $ns exists: $(first_line "$listing")"
    fi
    if [[ -z "$listing" ]]; then
      fail_early 5 apply "namespaces \"$ns\" not found: needed by ${needed_by[$ns]}; add a Namespace document for it to the manifests"
    fi
  done
  log "bundle ok: ${bundle_phase_files[*]}"
}

# True when every error in file $1 is kubectl not knowing a kind that a CustomResourceDefinition
# of this bundle defines.
only_kinds_from_bundle_crds() {
  local line
  while IFS= read -r line; do
    if [[ -z "$line" || "$line" == "ensure CRDs are installed first" ]]; then
      continue
    fi
    if [[ "$line" =~ no\ matches\ for\ kind\ \"([^\"]+)\" ]] &&
      [[ -n "${bundle_crd_kinds[${BASH_REMATCH[1]}]:-}" ]]; then
      continue
    fi
    return 1
  done <"$1"
  return 0
}

timed_out_before_changes() {
  result=timed-out
  message="timed out after ${timeout_seconds}s before anything was applied"
  rollback_status=not-needed
  log "error: $message"
  finish 12
}

first_line() {
  printf '%s' "${1%%$'\n'*}"
}

# -- workloads --------------------------------------------------------------------------------

workload_ns_args() {
  ns_args=()
  if [[ -n "${wl_ns[$1]}" ]]; then
    ns_args=(-n "${wl_ns[$1]}")
  fi
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

record_revisions() {
  local i lines="" meta
  log "==> recording revisions in $state_dir"
  if [[ -e "$state_dir" ]]; then
    fail_early 5 apply "deploy $deploy_id already has state in $state_dir: a run with this id did not finish; run 'rollback --deploy-id $deploy_id' first"
  fi
  printf -v meta 'deploy_id=%s\ncommit=%s\nrun_url=%s\nstarted=%s\n' \
    "$deploy_id" "$commit" "$run_url" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # The action's rollback command runs the copy of this script: the uploaded one may be gone.
  if ! { mkdir -p -- "$state_dir" && cp -- "${BASH_SOURCE[0]}" "$state_dir/k3s-deploy.sh" &&
    printf '%s' "$meta" >"$state_dir/deploy.txt"; }; then
    fail_early 3 tools "cannot write the state dir $state_dir"
  fi
  for i in "${!wl_name[@]}"; do
    if ! read_workload "$i"; then
      rm -rf -- "$state_dir"
      fail_early 4 api "could not read ${wl_kind[i]}/${wl_name[i]} before applying"
    fi
    wl_before[i]=$REPLY
    log "${wl_kind[i]}/${wl_name[i]}${wl_ns[i]:+ in ${wl_ns[i]}}: revision ${REPLY:-(new)}"
    lines+="${wl_kind[i]}"$'\t'"${wl_ns[i]}"$'\t'"${wl_name[i]}"$'\t'"$REPLY"$'\n'
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
    revision=${rest#*$'\t'}
    add_workload "$kind" "$ns" "$name" "$revision"
  done <"$state_dir/revisions.tsv"
}

apply_bundle() {
  local name rc output
  step=apply
  rollout_started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for name in "${bundle_phase_files[@]}"; do
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
  local crd rc
  for crd in "${bundle_crds[@]}"; do
    seconds_left
    rc=0
    kube_within_budget wait --for=condition=established \
      --timeout="$((REPLY < CRD_ESTABLISHED_SECONDS ? REPLY : CRD_ESTABLISHED_SECONDS))s" \
      "customresourcedefinition/$crd" --request-timeout="$request_timeout" || rc=$?
    if ((rc != 0)); then
      fail_reason="CustomResourceDefinition $crd was not established"
      return 1
    fi
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

# Prints the pods of workload $1 that this deploy created and that wait for a reason that will
# not clear by itself, as "POD REASON" lines.
stuck_new_pods() {
  local i=$1 listing pod owner_kind owner_name created revision readiness restarts reasons
  local reason reason_list restart_list max_restarts count
  workload_ns_args "$i"
  listing=$(kube get pods "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath=$POD_LIST_TEMPLATE" 2>/dev/null) || return 0
  while IFS='|' read -r pod owner_kind owner_name created revision readiness restarts reasons; do
    if ! owned_by "$i" "$owner_kind" "$owner_name" || [[ "$created" < "$rollout_started_at" ]]; then
      continue
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
  done <<<"$listing"
  return 0
}

owned_by() {
  local i=$1 owner_kind=$2 owner_name=$3
  if [[ "${wl_kind[i]}" == statefulset ]]; then
    [[ "$owner_kind" == StatefulSet && "$owner_name" == "${wl_name[i]}" ]]
  else
    # A Deployment's pods belong to its ReplicaSets, named NAME-<pod-template-hash>.
    [[ "$owner_kind" == ReplicaSet && "$owner_name" =~ ^"${wl_name[i]}"-[a-z0-9]+$ ]]
  fi
}

# Waits for workload $1 until the epoch second $2. Returns 0 when rolled out, 1 when it failed
# (fail_reason says why), 2 when the time ran out.
wait_for_rollout() {
  local i=$1 until=$2 target left slice output rc stuck previous_stuck="" line last_line=""
  target="${wl_kind[i]}/${wl_name[i]}"
  workload_ns_args "$i"
  log "==> waiting for $target${wl_ns[i]:+ in ${wl_ns[i]}}"
  while :; do
    left=$((until - $(date +%s)))
    if ((left <= 0)); then
      fail_reason="$target${wl_ns[i]:+ in ${wl_ns[i]}} was not ready in time ($(rollout_summary "$i"))"
      return 2
    fi
    slice=$((left < FAIL_FAST_CHECK_SECONDS ? left : FAIL_FAST_CHECK_SECONDS))
    rc=0
    output=$(kube rollout status "$target" "${ns_args[@]}" --timeout="${slice}s" 2>&1) || rc=$?
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
    if [[ "$output" == *"exceeded its progress deadline"* || "$output" == *"(NotFound)"* ]]; then
      fail_reason="$target${wl_ns[i]:+ in ${wl_ns[i]}}: $line"
      return 1
    fi
    if [[ "$output" != *"timed out waiting for the condition"* ]]; then
      # Most likely the API hiccuped (a small master under load): retry within the budget.
      log "rollout status failed, retrying: $line"
      sleep 1
      continue
    fi
    stuck=$(stuck_new_pods "$i") || stuck=""
    if [[ -n "$stuck" && "$stuck" == "$previous_stuck" ]]; then
      # Seen on two checks in a row: it is not a blip.
      line=${stuck%%$'\n'*}
      fail_reason="$target${wl_ns[i]:+ in ${wl_ns[i]}}: pod ${line% *} is waiting with ${line##* }, which does not clear by itself"
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
    if ! is_ready "$i"; then
      # rollout status said done but the counts disagree (scaled down mid-way, ...).
      wl_outcome[i]=failed
      fail_reason="${wl_kind[i]}/${wl_name[i]}: ${wl_ready[i]:-0} of ${wl_desired[i]:-0} ready after its rollout"
      return 1
    fi
    log "${wl_kind[i]}/${wl_name[i]}: ready ${wl_ready[i]:-0}/${wl_desired[i]:-0}, revision ${wl_before[i]:-(new)} -> ${wl_after[i]}"
  done
}

# -- rollback ---------------------------------------------------------------------------------

# A StatefulSet does not replace a pod that never became ready, even once its template is
# reverted (Kubernetes' "forced rollback" note): delete such pods so the old revision returns.
release_stuck_statefulset_pods() {
  local i=$1 listing pod owner_kind owner_name created revision readiness restarts reasons update
  workload_ns_args "$i"
  read_workload "$i" || return 0
  update=$REPLY
  listing=$(kube get pods "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath=$POD_LIST_TEMPLATE" 2>/dev/null) || return 0
  while IFS='|' read -r pod owner_kind owner_name created revision readiness restarts reasons; do
    if owned_by "$i" "$owner_kind" "$owner_name" && [[ "$revision" != "$update" ]] &&
      [[ " $readiness " == *" false "* ]]; then
      log "deleting pod $pod: it runs revision $revision, never became ready, and the StatefulSet will not replace it by itself"
      kube delete pod "$pod" "${ns_args[@]}" --wait=false --request-timeout="$request_timeout" || true
    fi
  done <<<"$listing"
}

# Undoes the workloads whose revision differs from the one recorded before the deploy.
# Sets rollback_status to done, failed or nothing-changed.
roll_back_changed() {
  local until=$1 i output current undone=() failed=0 done_count=0
  local undone_file="$state_dir/undone.tsv" line
  local -A already_undone=()
  # Pods the undo creates are the new ones the fail-fast check looks at.
  rollout_started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  if [[ -f "$undone_file" ]]; then
    # A rollback interrupted earlier: its undos created new revisions; undoing those again
    # would bring the failed template back.
    while IFS=$'\t' read -r line current; do
      already_undone[$line]=$current
    done <"$undone_file"
  fi
  log "==> rolling back what this deploy changed"
  for i in "${!wl_name[@]}"; do
    if ! read_workload "$i"; then
      wl_undo[i]=failed
      failed=$((failed + 1))
      continue
    fi
    current=$REPLY
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
    if [[ "${already_undone[${wl_kind[i]}/${wl_ns[i]}/${wl_name[i]}]:-}" == "$current" ]]; then
      log "${wl_kind[i]}/${wl_name[i]}: already rolled back (revision $current)"
      wl_undo[i]="done"
      undone+=("$i")
      continue
    fi
    workload_ns_args "$i"
    if output=$(kube rollout undo "${wl_kind[i]}/${wl_name[i]}" "${ns_args[@]}" \
      --request-timeout="$request_timeout" 2>&1); then
      log "$output"
      wl_undo[i]="done"
      undone+=("$i")
      if read_workload "$i"; then
        printf '%s\t%s\n' "${wl_kind[i]}/${wl_ns[i]}/${wl_name[i]}" "$REPLY" >>"$undone_file"
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
  for i in "${undone[@]}"; do
    if [[ "${wl_kind[i]}" == statefulset ]]; then
      release_stuck_statefulset_pods "$i"
    fi
  done
  for i in "${undone[@]}"; do
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
    output=$(kube get events -n "$ns" --field-selector type=Warning \
      --sort-by=.metadata.creationTimestamp --request-timeout="$request_timeout" 2>&1) || true
    log "$output"
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
  log "k3s-deploy: deploy $deploy_id${commit:+ (commit $commit)}${run_url:+ from $run_url}"
  check_tools
  acquire_lock
  check_api
  unpack_bundle
  check_bundle
  record_revisions
  rc=0
  apply_bundle || rc=$?
  if ((rc == 0)); then
    wait_for_workloads || rc=$?
  fi
  if ((rc == 0)); then
    if ((${#wl_name[@]} == 0)); then
      message="applied ${#bundle_phase_files[@]} manifest file(s); no workloads to wait for"
    else
      message="all ${#wl_name[@]} workload(s) ready"
    fi
    log "$message"
    finish_after_changes success
  fi
  if ((rc == 2)); then
    handle_failure timed-out
  fi
  handle_failure failed
}

run_rollback() {
  deadline=$(($(date +%s) + rollback_timeout_seconds))
  log "k3s-deploy: rollback of deploy $deploy_id"
  result=timed-out
  check_tools
  acquire_lock
  step=rollback
  if [[ ! -d "$state_dir" ]]; then
    rollback_status=nothing-changed
    message="no unfinished deploy $deploy_id in $state_root (it finished, or never started applying); nothing undone"
    log "$message"
    finish 12
  fi
  check_api
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
  if [[ "$command" == deploy ]]; then
    run_deploy
  else
    run_rollback
  fi
}

main "$@"
