# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- rollback ---------------------------------------------------------------------------------
# Sets rollback_status, wl_undo, wl_after, wl_since, rollout_started_at (failure_* are
# saved and put back around the waits for the undone rollouts).

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
    # would be). A Deployment's revision is its number. A StatefulSet's or a DaemonSet's is
    # the name of a ControllerRevision, whose number is read now: going back to a template
    # renumbers its ControllerRevision, so a number recorded earlier could name nothing by now.
    workload_ns_args "$i"
    to_revision=()
    if [[ "${wl_kind[i]}" == deployment && "${wl_before[i]}" =~ ^[0-9]+$ ]]; then
      to_revision=(--to-revision="${wl_before[i]}")
    elif [[ "${wl_kind[i]}" == statefulset || "${wl_kind[i]}" == daemonset ]] &&
      [[ -n "${wl_before[i]}" ]]; then
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
