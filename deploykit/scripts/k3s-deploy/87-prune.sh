# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- prune (option prune: true or all) -------------------------------------------------------
# Deletes what the release's previous deploys applied and this bundle no longer holds, once the
# release is healthy; never on a failed deploy, never in a dry run (that lists what would go).
#
# Ownership is explicit, ApplySet-style: each object the action applies for a release carries
# the label RELEASE_LABEL=ID, and the release's inventory (ConfigMap
# kube-system/k3s-deploy-release-ID, data.objects: one "KIND[.GROUP]<TAB>NAMESPACE<TAB>NAME" line
# per object) says what it applied. Before the apply the inventory becomes the old one plus this
# bundle, so that a deploy that fails half-way leaves nothing untracked; after a healthy deploy
# an object of the inventory that this bundle lacks is deleted only while it still carries the
# release's label and not the annotation PRUNE_ANNOTATION=false. PersistentVolumeClaims,
# PersistentVolumes, Namespaces and cluster-scoped objects are deleted only with prune=all.
# Then the inventory becomes this bundle plus what stays to be pruned (kept kinds, failures).
# Sets prune_ready, prune_previous, prune_pruned, prune_failed, prune_kept, prune_would.

readonly RELEASE_LABEL=$ANNOTATION_PREFIX/release
readonly PRUNE_ANNOTATION=$ANNOTATION_PREFIX/prune
readonly INVENTORY_NAMESPACE=kube-system
readonly INVENTORY_PREFIX=k3s-deploy-release-
readonly RELEASE_ID_PATTERN='^[0-9a-f]{20}$'
readonly RELEASE_NAME_PATTERN='^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,199}$'
# An inventory line: the cluster's copy is read back, so it is checked before kubectl sees it.
readonly INVENTORY_LINE_PATTERN=$'^[A-Za-z][A-Za-z0-9]{0,62}(\\.[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?\t([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?\t[A-Za-z0-9]([-A-Za-z0-9._:@]{0,251}[A-Za-z0-9])?$'
readonly PROTECTED_KINDS=" PersistentVolumeClaim PersistentVolume Namespace "
# Entries of each list in the report (the log has them all).
readonly PRUNE_REPORT_ITEMS=20

prune_mode=false
release_id=""
release_name=""
prune_ready=false   # the inventory was read and updated before the apply
prune_previous=()   # inventory lines of the previous deploys
prune_pruned=()     # "KIND[.GROUP] NAMESPACE/NAME" deleted
prune_failed=()     # "... (why)" that could not be deleted: still in the cluster
prune_kept=()       # "... (why)" left alone on purpose
prune_would=()      # dry run: what a deploy would delete
prune_note=""       # why prune did not run, when it did not
REPLY_STATE=""      # prune_verdict: present, gone or unknown
REPLY_TRACKED=false # prune_verdict: the object is kept for now but stays in the inventory
declare -A prune_bundle_ns=() # the namespaces this bundle's objects are in

inventory_name() {
  REPLY="$INVENTORY_PREFIX$release_id"
}

# "KIND[.GROUP] NAMESPACE/NAME" (or "KIND[.GROUP] NAME" for an object without a namespace).
inventory_text() {
  local kind=${1%%$'\t'*} rest=${1#*$'\t'}
  local ns=${rest%%$'\t'*} name=${rest#*$'\t'}
  REPLY="$kind ${ns:+$ns/}$name"
}

# Reads the release's inventory into prune_previous; returns 1 when it could not be read.
read_inventory() {
  local line
  prune_previous=()
  inventory_name
  if ! kube_capture get configmap -n "$INVENTORY_NAMESPACE" "$REPLY" --ignore-not-found \
    -o 'jsonpath={.data.objects}' --request-timeout="$request_timeout"; then
    prune_note="could not read the inventory ConfigMap $INVENTORY_NAMESPACE/$INVENTORY_PREFIX$release_id: $(first_line "$KUBE_ERR")"
    return 1
  fi
  while IFS= read -r line; do
    if [[ -z "$line" ]]; then
      continue
    fi
    if [[ ! "$line" =~ $INVENTORY_LINE_PATTERN ]]; then
      log "warning: skipping an inventory line that is not KIND, NAMESPACE, NAME: '${line:0:200}'"
      continue
    fi
    prune_previous+=("$line")
  done <<<"$REPLY"
}

# Writes the inventory: the lines given, sorted, once each.
write_inventory() {
  local file="$work_dir/inventory.json" text name
  text=$(printf '%s\n' "$@" | sort -u)
  json_string "$text"
  text=$REPLY
  json_string "$release_name"
  name=$REPLY
  inventory_name
  printf '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"%s","namespace":"%s","labels":{"app.kubernetes.io/managed-by":"k3s-deploy-action"},"annotations":{"%s/release-name":%s}},"data":{"objects":%s}}\n' \
    "$REPLY" "$INVENTORY_NAMESPACE" "$ANNOTATION_PREFIX" "$name" "$text" >"$file"
  # replace, or create the first time: not apply, whose copy of the whole list in an annotation
  # would hit the API's 256 KiB limit on annotations long before a ConfigMap's 1 MiB. The deploy
  # lock keeps other deploys from writing it meanwhile. KUBE_ERR gets kubectl's error.
  if KUBE_ERR=$(kube_within_budget replace -f "$file" --request-timeout="$request_timeout" 2>&1 >/dev/null); then
    return 0
  fi
  if [[ "$KUBE_ERR" != *"(NotFound)"* ]]; then
    return 1
  fi
  KUBE_ERR=$(kube_within_budget create -f "$file" --request-timeout="$request_timeout" 2>&1 >/dev/null)
}

# Before anything changed: a bundle made without prune has no inventory.tsv to compare with.
check_prune_bundle() {
  if [[ "$prune_mode" != false && ! -f "$work_dir/bundle/inventory.tsv" ]]; then
    fail_early 5 check "--prune $prune_mode needs bundle/inventory.tsv, which this bundle lacks: it was made without prune"
  fi
}

bundle_inventory() {
  local line
  MAPFILE=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ -n "$line" ]]; then
      MAPFILE+=("$line")
    fi
  done <"$work_dir/bundle/inventory.tsv"
}

# Before the apply: the inventory becomes the previous one plus this bundle. Prune is skipped
# (with a warning in the report) when the inventory cannot be read or written: the deploy goes on.
prepare_prune() {
  if [[ "$prune_mode" == false ]]; then
    return 0
  fi
  check_prune_bundle
  log "==> prune: reading the inventory of release $release_name"
  if ! read_inventory; then
    log "warning: prune skipped: $prune_note"
    return 0
  fi
  bundle_inventory
  if ! write_inventory "${prune_previous[@]}" "${MAPFILE[@]}"; then
    prune_note="could not update the inventory ConfigMap $INVENTORY_NAMESPACE/$INVENTORY_PREFIX$release_id: $(first_line "$KUBE_ERR")"
    log "warning: prune skipped: $prune_note"
    return 0
  fi
  log "${#prune_previous[@]} object(s) in the inventory of the previous deploys; ${#MAPFILE[@]} in this one"
  log ""
  prune_ready=true
}

# Sets REPLY to why the object of inventory line $1 must stay, or "" when it may be deleted,
# REPLY_STATE to present, gone or unknown, and REPLY_TRACKED. Reads the live object's
# namespace, label and annotation.
prune_verdict() {
  local kind=${1%%$'\t'*} rest=${1#*$'\t'} where=() live_ns label opt_out
  local ns=${rest%%$'\t'*} name=${rest#*$'\t'}
  REPLY_STATE=present
  REPLY_TRACKED=false
  if [[ -n "$ns" ]]; then
    where=(-n "$ns")
  fi
  if ! kube_capture get "$kind" "$name" "${where[@]}" --ignore-not-found \
    -o "jsonpath={.metadata.uid}{\"\\t\"}{.metadata.namespace}{\"\\t\"}{.metadata.labels.$ANNOTATION_PREFIX/release}{\"\\t\"}{.metadata.annotations.$ANNOTATION_PREFIX/prune}" \
    --request-timeout="$request_timeout"; then
    if [[ "$KUBE_ERR" == *"doesn't have a resource type"* ]]; then
      REPLY_STATE=gone # its kind is no longer served (its CustomResourceDefinition went), nor is it
      REPLY=""
      return 0
    fi
    REPLY="could not read it: $(first_line "$KUBE_ERR")"
    REPLY_STATE=unknown
    return 0
  fi
  if [[ -z "$REPLY" ]]; then
    REPLY_STATE=gone
    REPLY=""
    return 0
  fi
  rest=${REPLY#*$'\t'}
  live_ns=${rest%%$'\t'*} rest=${rest#*$'\t'}
  label=${rest%%$'\t'*} opt_out=${rest#*$'\t'}
  if [[ "$label" != "$release_id" ]]; then
    REPLY="not labelled $RELEASE_LABEL=$release_id: not this release's"
  elif [[ "$opt_out" == false ]]; then
    REPLY="annotated $PRUNE_ANNOTATION=false"
  elif [[ "${kind%%.*}" == Namespace && -n "${prune_bundle_ns[$name]:-}" ]]; then
    # Its document left the manifests, but objects of this deploy are in it: deleting it would
    # delete them.
    REPLY="this deploy's objects are in it"
    REPLY_TRACKED=true
  elif [[ "$prune_mode" != all && "$PROTECTED_KINDS" == *" ${kind%%.*} "* ]]; then
    REPLY="a ${kind%%.*} is pruned only with prune: all"
    REPLY_TRACKED=true
  elif [[ "$prune_mode" != all && -z "$live_ns" ]]; then
    REPLY="cluster-scoped: pruned only with prune: all"
    REPLY_TRACKED=true
  else
    REPLY=""
  fi
}

# The inventory lines that this bundle does not hold, in MAPFILE.
prune_candidates() {
  local line
  declare -A current=()
  bundle_inventory
  for line in "${MAPFILE[@]}"; do
    current["$line"]=1
    line=${line#*$'\t'}
    line=${line%%$'\t'*}
    if [[ -n "$line" ]]; then
      prune_bundle_ns["$line"]=1
    fi
  done
  MAPFILE=()
  for line in "${prune_previous[@]}"; do
    if [[ -z "${current[$line]:-}" ]]; then
      MAPFILE+=("$line")
    fi
  done
}

# After a healthy deploy. Never fails the deploy: what could not be deleted is reported, and
# run_deploy calls it in an `||` list, so no unexpected failure here ends the script (errexit
# is off inside) and turns a healthy release into a failed one.
prune_objects() {
  local line why retained=() candidates=() where kind rest ns name where_args=()
  if [[ "$prune_mode" == false || "$prune_ready" != true ]]; then
    return 0
  fi
  step=prune
  prune_candidates
  candidates=("${MAPFILE[@]}")
  log "==> prune: ${#candidates[@]} object(s) of release $release_name that this deploy no longer has"
  for line in "${candidates[@]}"; do
    inventory_text "$line"
    where=$REPLY
    prune_verdict "$line"
    why=$REPLY
    if [[ "$REPLY_STATE" == gone ]]; then
      log "already gone: $where"
    elif [[ "$REPLY_STATE" == unknown ]]; then
      prune_failed+=("$where ($why)")
      retained+=("$line")
    elif [[ -n "$why" ]]; then
      log "kept: $where ($why)"
      prune_kept+=("$where ($why)")
      # Kinds kept until prune: all, and namespaces still in use, stay tracked; an object
      # someone else owns now, or one opted out, leaves the release.
      if [[ "$REPLY_TRACKED" == true ]]; then
        retained+=("$line")
      fi
    else
      kind=${line%%$'\t'*} rest=${line#*$'\t'}
      ns=${rest%%$'\t'*} name=${rest#*$'\t'}
      where_args=()
      if [[ -n "$ns" ]]; then
        where_args=(-n "$ns")
      fi
      if kube_capture delete "$kind" "$name" "${where_args[@]}" --ignore-not-found --wait=false \
        --request-timeout="$request_timeout"; then
        log "pruned: $where"
        prune_pruned+=("$where")
      else
        why=$(first_line "$KUBE_ERR")
        log "warning: could not prune $where: $why"
        prune_failed+=("$where (${why:-kubectl delete failed})")
        retained+=("$line")
      fi
    fi
  done
  bundle_inventory
  if ! write_inventory "${MAPFILE[@]}" "${retained[@]}"; then
    prune_note="could not update the inventory ConfigMap $INVENTORY_NAMESPACE/$INVENTORY_PREFIX$release_id after pruning: $(first_line "$KUBE_ERR")"
    log "warning: $prune_note"
  fi
  log ""
}

# Dry run: what a deploy of this bundle would prune (nothing is written or deleted).
list_prunable() {
  local line
  if [[ "$prune_mode" == false ]]; then
    return 0
  fi
  check_prune_bundle
  if ! read_inventory; then
    log "warning: $prune_note"
    return 0
  fi
  prune_candidates
  for line in "${MAPFILE[@]}"; do
    inventory_text "$line"
    local where=$REPLY
    prune_verdict "$line"
    if [[ "$REPLY_STATE" == present && -z "$REPLY" ]]; then
      prune_would+=("$where")
      log "would prune: $where"
    elif [[ "$REPLY_STATE" == present ]]; then
      prune_kept+=("$where ($REPLY)")
      log "would keep: $where ($REPLY)"
    fi
  done
}

# Sets REPLY to the report's "prune" object ("" when prune is off), with at most $1 entries of
# each list (the counts say how many there are).
prune_json() {
  local most=$1 name item out="" items
  if [[ "$prune_mode" == false ]]; then
    REPLY=""
    return 0
  fi
  json_string "$release_name"
  out='"release":'"$REPLY"
  truncate_text "$REPORT_LINE_MAX" "$prune_note"
  json_string "$REPLY"
  out+=',"note":'"$REPLY"
  for name in pruned failed kept would; do
    local -n list="prune_$name"
    items=""
    for item in "${list[@]:0:most}"; do
      truncate_text "$REPORT_LINE_MAX" "$item"
      json_string "$REPLY"
      items+="${items:+,}$REPLY"
    done
    out+=',"'"$name"'":['"$items"'],"'"$name"'_count":'"${#list[@]}"
    unset -n list
  done
  REPLY="{$out}"
}
