# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# shellcheck disable=SC2004 # its maps are associative (declare -A in 10-common.sh), not indexed
# -- bundle -----------------------------------------------------------------------------------
# Work folder, unpacking, checks (client and server dry run), the dry run's diff. Sets
# work_dir, bundle_*, new_namespace_objects, diff_changes, and adds the workloads (wl_*).

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
  # The options came from the verified bundle: the live progress uploader may start.
  start_progress
  bundle_phase_files=()
  for name in "${PHASE_FILES[@]}"; do
    if [[ -f "$work_dir/bundle/$name" ]]; then
      bundle_phase_files+=("$name")
    fi
  done
  if ((${#bundle_phase_files[@]} == 0)); then
    fail_early 5 check "bundle has no manifests (expected bundle/1-namespaces.yaml ... bundle/6-workloads.yaml)"
  fi
  load_jobs
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
      [[ "$kind" != deployment && "$kind" != statefulset && "$kind" != daemonset ]] ||
      [[ -n "$ns" && ! "$ns" =~ $DNS_LABEL_PATTERN ]] || [[ ! "$name" =~ $DNS_NAME_PATTERN ]]; then
      fail_early 5 check "bundle/workloads.tsv: bad line '$line' (expected KIND<TAB>NAMESPACE<TAB>NAME, KIND deployment, statefulset or daemonset)"
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
  wl_available+=("")
  wl_since+=("")
  wl_outcome+=("")
  wl_undo+=("")
}

# Waits follow the apply order: StatefulSets (phase 4) first, then the Deployments and
# DaemonSets of phase 6 as that file lists them (workloads.tsv keeps the manifests' order).
order_workloads() {
  local kinds=("${wl_kind[@]}") nss=("${wl_ns[@]}") names=("${wl_name[@]}") befores=("${wl_before[@]}")
  local traces=("${wl_trace[@]}") wanted i
  wl_kind=() wl_ns=() wl_name=() wl_before=() wl_trace=() wl_after=() wl_desired=() wl_ready=()
  wl_updated=() wl_available=() wl_since=() wl_outcome=() wl_undo=() wl_uid=()
  for wanted in statefulset phase-6; do
    for i in "${!kinds[@]}"; do
      if [[ "${kinds[i]}" == "$wanted" || ("$wanted" == phase-6 && "${kinds[i]}" != statefulset) ]]; then
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
    if [[ "$name" == "$JOBS_PHASE_FILE" ]]; then
      server_dry_run_jobs
      continue
    fi
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
    if [[ "$name" == "$JOBS_PHASE_FILE" ]]; then
      continue # a Job is replaced, not patched: plan_jobs says what would happen to each
    fi
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
