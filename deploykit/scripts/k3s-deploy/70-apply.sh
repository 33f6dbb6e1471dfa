# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- workloads --------------------------------------------------------------------------------
# Before and after the apply: revisions in the state folder, the apply, the wide objects
# (wide_*), the traceability annotations. Its own global: REPLY_ARRAY. Sets ns_args,
# wl_before/after/trace/since, rollout_started_at, annotate_failures, fail_reason.

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
# A DaemonSet counts nodes, not replicas (desiredNumberScheduled, numberReady,
# updatedNumberScheduled, numberAvailable), and its status names no revision: see
# daemonset_revision.
read_workload() {
  local i=$1 fields output desired ready updated generation observed revision available="" try
  if [[ "${wl_kind[i]}" == deployment ]]; then
    fields='{.spec.replicas}|{.status.readyReplicas}|{.status.updatedReplicas}|{.metadata.generation}|{.status.observedGeneration}|{.metadata.annotations.deployment\.kubernetes\.io/revision}'
  elif [[ "${wl_kind[i]}" == daemonset ]]; then
    fields='{.status.desiredNumberScheduled}|{.status.numberReady}|{.status.updatedNumberScheduled}|{.metadata.generation}|{.status.observedGeneration}|{.metadata.uid}|{.status.numberAvailable}'
  else
    fields='{.spec.replicas}|{.status.readyReplicas}|{.status.updatedReplicas}|{.metadata.generation}|{.status.observedGeneration}|{.status.updateRevision}'
  fi
  workload_ns_args "$i"
  for ((try = 1; try <= CONTROLLER_SETTLE_TRIES; try++)); do
    if ! output=$(kube get "${wl_kind[i]}" "${wl_name[i]}" "${ns_args[@]}" --ignore-not-found \
      --request-timeout="$request_timeout" -o "jsonpath=$fields"); then
      log "$output"
      return 1
    fi
    IFS='|' read -r desired ready updated generation observed revision available <<<"$output"
    if [[ -z "$output" || "$generation" == "$observed" ]]; then
      break
    fi
    sleep 1
  done
  if [[ "${wl_kind[i]}" == daemonset && -n "$output" ]]; then
    daemonset_revision "$i" "$revision" || return 1
    revision=$REPLY
  fi
  wl_desired[i]=$desired
  wl_ready[i]=$ready
  wl_updated[i]=$updated
  wl_available[i]=$available
  REPLY=$revision
}

# Sets REPLY to the revision of DaemonSet $1 (UID $2): the name of its ControllerRevision with
# the highest number. The DaemonSet controller writes it before it reports the generation
# observed, and gives the template in use the highest number, also when a template returns.
# Its own pods' controller-revision-hash is only the hash: the name is what `rollout undo`'s
# history and the StatefulSet's updateRevision also use. Returns 1 when it cannot be listed.
daemonset_revision() {
  local i=$1 uid=$2 listing name number best=-1
  REPLY=""
  if [[ ! "$uid" =~ $UID_PATTERN ]]; then
    return 0 # not a UID the API server makes: no revision of its own to name
  fi
  workload_ns_args "$i"
  if ! kube_capture get controllerrevisions "${ns_args[@]}" --request-timeout="$request_timeout" \
    -o "jsonpath={range .items[?(@.metadata.ownerReferences[0].uid==\"$uid\")]}{.metadata.name}|{.revision}{\"\\n\"}{end}"; then
    log "could not list the ControllerRevisions of ${wl_kind[i]}/${wl_name[i]}: $(first_line "$KUBE_ERR")"
    return 1
  fi
  listing=$REPLY
  while IFS='|' read -r name number; do
    if [[ "$name" =~ $DNS_NAME_PATTERN && "$number" =~ ^[0-9]{1,18}$ ]] && ((10#$number > best)); then
      best=$((10#$number))
      REPLY=$name
    fi
  done <<<"$listing"
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

# Sets REPLY_ARRAY to the workloads of stage $1: all; first (the StatefulSets, applied before
# the Jobs run); rest (the Deployments and DaemonSets, applied after them).
stage_workloads() {
  local i
  REPLY_ARRAY=()
  for i in "${!wl_name[@]}"; do
    if [[ "$1" == all ]] || [[ "$1" == first && "${wl_kind[i]}" == statefulset ]] ||
      [[ "$1" == rest && "${wl_kind[i]}" != statefulset ]]; then
      REPLY_ARRAY+=("$i")
    fi
  done
}

# Applies the phase files of stage $1 (all; first: those before the Jobs' phase; rest: those
# after it). The Jobs' own file is never applied here: run_jobs applies each Job.
apply_bundle() {
  local stage=$1 name rc output
  step=apply
  rollout_started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for name in "${bundle_phase_files[@]}"; do
    if [[ "$name" == "$JOBS_PHASE_FILE" || ("$stage" == first && "$name" > "$JOBS_PHASE_FILE") ||
      ("$stage" == rest && "$name" < "$JOBS_PHASE_FILE") ]]; then
      continue
    fi
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
      apply_timed_out=true
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

# After the apply of stage $1 (see stage_workloads): its workloads' revisions and annotations;
# applied.tsv covers every stage applied so far.
after_apply() {
  local i lines="" selected
  stage_workloads "$1"
  selected=("${REPLY_ARRAY[@]}")
  for i in "${selected[@]}"; do
    if read_workload "$i"; then
      wl_after[i]=$REPLY
    fi
    if [[ "${wl_after[i]}" != "${wl_before[i]}" ]]; then
      wl_since[i]=$rollout_started_at
    else
      wl_since[i]=""
    fi
  done
  for i in "${!wl_name[@]}"; do
    if [[ -n "${wl_after[i]}" && "${wl_after[i]}" != "${wl_before[i]}" ]]; then
      lines+="${wl_kind[i]}/${wl_ns[i]}/${wl_name[i]}"$'\t'"${wl_after[i]}"$'\n'
    fi
  done
  # Written whole then renamed. Without it (a kill before this line) a rollback undoes every
  # workload whose revision moved, as it did before this file existed.
  if ! { printf '%s' "$lines" >"$state_dir/applied.tsv.tmp" &&
    mv -- "$state_dir/applied.tsv.tmp" "$state_dir/applied.tsv"; }; then
    log "warning: could not write $state_dir/applied.tsv: a rollback will undo every workload whose revision moved"
  fi
  if lock_still_ours; then
    annotate_workloads "${selected[@]}"
  fi
}

# Writes commit, run URL, time and deploy id to the own metadata of each workload named by
# index. Not to its pod template: that would make a new revision and roll the pods.
annotate_workloads() {
  local i output updates=() now update
  if (($# == 0)); then
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
  for i in "$@"; do
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
