# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- entry points -----------------------------------------------------------------------------
# deploy, dry-run, rollback, and main. Sets deadline, lock_duration, kube_err_file, and
# result/step/message as the run ends.

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
  prepare_prune
  # From here bash runs apply_bundle, wait_for_workloads and verify_health with errexit off
  # (a function called in an `||` list). That is the decision, not an accident: once the
  # cluster has changed, no unexpected failure may end the script before the rollback and the
  # report, so each of these checks every command whose failure matters and returns 1 (failed)
  # or 2 (timed out); the rest (log lines, annotations) may fail without changing the outcome.
  rc=0
  if ((${#job_name[@]} == 0)); then
    apply_bundle all || rc=$?
    if ((rc == 0)); then
      after_apply all
      wait_for_workloads all || rc=$?
    fi
  else
    deploy_in_stages || rc=$?
  fi
  if [[ "$apply_timed_out" != true ]]; then
    note_wide_changes
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
    jobs_summary
    message+=$REPLY
    prune_objects || prune_note="prune stopped unexpectedly (exit $?); see the log"
    if ((${#prune_pruned[@]} > 0)); then
      message+="; pruned ${#prune_pruned[@]} object(s)"
    fi
    if ((${#prune_failed[@]} > 0)); then
      message+="; ${#prune_failed[@]} object(s) could not be pruned"
    elif [[ -n "$prune_note" ]]; then
      message+="; prune skipped"
    fi
    log "$message"
    finish_after_changes success
  fi
  if ((rc == 2)); then
    handle_failure timed-out
  fi
  handle_failure failed
}

# With Jobs (migrations): the phases up to the StatefulSets, which are waited for; then the Jobs,
# one after the other; only when every Job completed, the Deployments and DaemonSets. A Job that
# fails leaves them as they were: fail_reason says so.
deploy_in_stages() {
  local rc=0
  apply_bundle first || rc=$?
  if ((rc == 0)); then
    after_apply first
    wait_for_workloads first || rc=$?
  fi
  if ((rc != 0)); then
    fail_reason+="; no Job was run, and the Deployments and DaemonSets were not applied"
    return "$rc"
  fi
  run_jobs || rc=$?
  if ((rc != 0)); then
    stage_workloads rest
    if ((${#REPLY_ARRAY[@]} > 0)); then
      fail_reason+="; the Deployments and DaemonSets were not applied (they run what they ran before)"
    fi
    fail_reason+="; the phases before the Jobs (config, services, StatefulSets) were applied"
    return "$rc"
  fi
  apply_bundle rest || return $?
  after_apply rest
  wait_for_workloads rest
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
  plan_jobs
  print_diff
  list_prunable
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
  if ((${#prune_would[@]} > 0)); then
    message+="; a deploy would prune ${#prune_would[@]} object(s)"
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
