# shellcheck shell=bash
# shellcheck disable=SC2034 # globals shared across the parts; the joined script is checked without this
# -- arguments --------------------------------------------------------------------------------
# The command line and the bundle's options file. Sets the options (command ... run_url),
# kubectl_cmd and state_dir.

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
  prune) prune_mode=$2 ;;
  release) release_id=$2 ;;
  release-name) release_name=$2 ;;
  progress-to) progress_to=$2 ;;
  progress-region) progress_region=$2 ;;
  progress-owner) progress_owner=$2 ;;
  progress-url-?*) progress_urls[${1#progress-url-}]=$2 ;;
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
  if [[ "$prune_mode" != false && "$prune_mode" != true && "$prune_mode" != all ]]; then
    usage_error "--prune must be false, true or all, got '$prune_mode'"
  fi
  if [[ "$prune_mode" != false ]] && [[ ! "$release_id" =~ $RELEASE_ID_PATTERN || ! "$release_name" =~ $RELEASE_NAME_PATTERN ]]; then
    usage_error "--prune needs --release (20 hex digits) and --release-name (1 to 200 letters, digits and . _ / : @ + -)"
  fi
  check_progress_options
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
