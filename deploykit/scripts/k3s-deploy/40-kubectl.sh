# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- tools, budget ----------------------------------------------------------------------------
# Also running kubectl (kube, kube_capture: sets KUBE_ERR) and the API check.

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
