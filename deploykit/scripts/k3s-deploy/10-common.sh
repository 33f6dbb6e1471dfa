# shellcheck shell=bash
# shellcheck disable=SC2034 # declares the globals the other parts use; the joined script is checked without this
# Common to every part: settings, the globals the parts share (options, run state, report),
# the log, the exit and signal traps, usage. A global only one part uses is declared in that
# part. Each later part's heading names the shared globals it sets; `step` (the report's step)
# is set by each part as the run reaches it.
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
  5-jobs.yaml 6-workloads.yaml)
# The Jobs' phase: checked with the others, but run by run_jobs (75-jobs.sh), one Job at a time.
readonly JOBS_PHASE_FILE=5-jobs.yaml
# While a rollout is waited for, its new pods are checked this often for a container that will
# not start by itself (bad image, crash loop): no point waiting out the whole timeout then.
readonly FAIL_FAST_CHECK_SECONDS=3
# A running Job is read this often; the report lists this many Jobs.
readonly JOB_POLL_SECONDS=2
readonly JOBS_REPORT_MAX=20
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
# What `kubectl rollout undo` says of a workload with no earlier revision: a Deployment; a
# StatefulSet or a DaemonSet (the DaemonSet's seen from kubectl 1.37 on the real API).
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
readonly JOB_TEMPLATE='{.metadata.uid}|{.metadata.annotations.k3s-deploy-action/job-hash}|{.status.active}|{.status.succeeded}|{.status.failed}|{range .status.conditions[*]}{.type}={.status}={.reason};{end}'
readonly JOB_CONTAINER_TEMPLATE='{range .status.containerStatuses[*]}{.name}|{.restartCount}|{.state.waiting.reason}|{.state.terminated.reason}|{.state.terminated.exitCode}|{.lastState.terminated.exitCode}{"\n"}{end}'
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
wl_available=() # a DaemonSet's numberAvailable (its rollout is done only when all are available)
wl_uid=()     # the workload's metadata.uid, once read (its pods are selected by it)
wl_since=()   # pods created since then are this deploy's ("" when it did not change the workload)
wl_trace=()   # the workload's traceability annotations before this deploy, tab-separated
wl_outcome=() # ready | failed | timed-out | "" (not waited for)
wl_undo=()    # done | no-history | superseded | failed | "" (not undone)
apply_timed_out=false # an apply ran out of budget: the API is too slow to ask anything more
job_ns=()
job_name=()
job_hash=()    # the hash the action stamped on the Job (annotation k3s-deploy-action/job-hash)
job_outcome=() # completed | unchanged | failed | timed-out | "" (not run)
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
  # Step lines also go to the live progress file (55-progress.sh), while it is on.
  if [[ -n "$progress_file" ]] && is_progress_line "$*"; then
    note_progress "$*"
  fi
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
  # Last: the final put of the progress file waits for nothing the deploy needs.
  stop_progress || true
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
  # Live progress stops first, with no last put: the action has stopped reading (a cancel) or
  # reads the whole output next, and an upload landing after it deleted the staging area
  # would be left behind.
  stop_progress || true
  if [[ "$command" == deploy && "$rollback_enabled" == true && -n "$state_dir" &&
    -f "$state_dir/revisions.tsv" ]]; then
    lock_keep=true
    rollback_wait=false
    if roll_back_changed 0 && [[ "$rollback_status" != failed ]]; then
      # What is left for `rollback --deploy-id` (the action sends it after a cancel through
      # SSM, and it runs this copy of the script): the word that this rollback is done, so it
      # neither undoes again nor says "nothing undone".
      # The word goes in first, renamed into place, and the rest is deleted after it: a kill
      # (the runner's SIGKILL follows its SIGTERM within seconds) between the two then leaves
      # either the full state (undoing.tsv marks the undos as sent) or the word, never a state
      # dir emptied of its revisions, which would read as "stopped before applying anything".
      if printf '%s\n' "$(rollback_summary)" >"$state_dir/$ROLLED_BACK_FILE.tmp" 2>/dev/null &&
        mv -f -- "$state_dir/$ROLLED_BACK_FILE.tmp" "$state_dir/$ROLLED_BACK_FILE" 2>/dev/null; then
        find "$state_dir" -mindepth 1 ! -name k3s-deploy.sh ! -name "$ROLLED_BACK_FILE" -delete 2>/dev/null || true
        lock_keep=false
      else
        log "the action can finish this rollback with: rollback --deploy-id $deploy_id"
      fi
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
  log "         --prune false|true|all --release ID --release-name NAME"
  log "         --progress-to s3://BUCKET/PREFIX/ --progress-region R --progress-owner ACCOUNT"
  log "         --progress-url-INSTANCE URL"
}
