# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # globals shared across the parts; the joined script is checked without this
# -- live progress ----------------------------------------------------------------------------
# The step lines of the log (the `==> ...` lines and the one-line results, is_progress_line)
# also go to a small file, and a background uploader in this process group (like the lock's
# heartbeat) puts that file to S3 as one object while the deploy runs: only when it changed, at
# most every PROGRESS_EVERY_SECONDS, and once more at the end. The action reads the object while
# it waits for the command and prints the new lines (SSM returns the output only at the end).
# Its own globals: progress_*. Nothing here may fail or slow the deploy: an upload that is
# refused a few times turns live progress off (said once in the log), and every upload is
# bounded by PROGRESS_PUT_SECONDS.
#
# Where to: options progress-to (s3://BUCKET/PREFIX/, with progress-region and progress-owner:
# the master puts with the AWS CLI and its instance role) or progress-url-INSTANCE (a presigned
# PUT URL per instance, for delivery presigned: curl, with progress-owner as the header the URL
# was signed with). The object is PREFIX/INSTANCE.log, the
# instance being the one the SSM agent names in AWS_SSM_INSTANCE_ID: one bundle serves a fleet.

PROGRESS_EVERY_SECONDS=${K3S_DEPLOY_PROGRESS_SECONDS:-5}
readonly PROGRESS_PUT_SECONDS=10
readonly PROGRESS_TRIES=3
readonly PROGRESS_MAX_LINES=400
readonly PROGRESS_LINE_MAX=300
readonly INSTANCE_ID_PATTERN='^m?i-[0-9a-f]{8,17}$'
readonly PROGRESS_TO_PATTERN='^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([A-Za-z0-9._/-]*/)?$'
# A presigned URL: https only (plain http to the loopback address alone: the development
# rig's S3), and nothing a shell, curl's config or a log would take apart (no quote or space).
readonly PROGRESS_URL_PATTERN='^(https://|http://127\.0\.0\.1[:/])[A-Za-z0-9._~:/?#@!&()*+,;=%-]+$'

progress_to=""
progress_region=""
progress_owner=""
declare -A progress_urls=() # instance id -> presigned PUT URL
progress_file="" # set while live progress is on
progress_count=0
progress_pid=""
progress_via="" # s3 | curl
progress_bucket=""
progress_key=""
progress_url=""
progress_put_pid=""

# Validates the progress options (from validate_arguments).
check_progress_options() {
  local id
  if [[ -n "$progress_to" ]]; then
    if [[ ! "$progress_to" =~ $PROGRESS_TO_PATTERN ]]; then
      usage_error "--progress-to must be s3://BUCKET/ or s3://BUCKET/PREFIX/, got '$progress_to'"
    fi
    if [[ ! "$progress_region" =~ ^[a-z0-9-]{1,30}$ || ! "$progress_owner" =~ ^[0-9]{12}$ ]]; then
      usage_error "--progress-to needs --progress-region (an AWS region) and --progress-owner (a 12-digit account id)"
    fi
  fi
  if ((${#progress_urls[@]} > 0)) && [[ ! "$progress_owner" =~ ^[0-9]{12}$ ]]; then
    usage_error "--progress-url-INSTANCE needs --progress-owner (a 12-digit account id)"
  fi
  for id in "${!progress_urls[@]}"; do
    if [[ ! "$id" =~ $INSTANCE_ID_PATTERN || ! "${progress_urls[$id]}" =~ $PROGRESS_URL_PATTERN ]]; then
      usage_error "--progress-url-INSTANCE must name an instance id and be an https:// URL without quotes or white space"
    fi
  done
}

# The lines the action shows while the deploy runs: steps and one-line results, not every
# line kubectl prints.
is_progress_line() {
  case "$1" in
  "==> "* | "k3s-deploy: "* | "error: "* | "interrupted by SIG"* | "rollback: "* | "pod "*", container "*) return 0 ;;
  *": rolled out, ready "* | *": rolled back, ready "* | *": healthy, "*" ready, "* | *": undo failed") return 0 ;;
  *": completed in "* | *": completed with this spec before; not run again" | *": not ready after the undo: "*) return 0 ;;
  esac
  # The run's own summary (`log "$message"`).
  [[ -n "$message" && "$1" == "$message" ]]
}

# Appends a step line to the progress file (from log). Never fails.
note_progress() {
  if ((progress_count >= PROGRESS_MAX_LINES)); then
    return 0
  fi
  progress_count=$((progress_count + 1))
  if ((progress_count == PROGRESS_MAX_LINES)); then
    printf '%s\n' "(live progress: more than $PROGRESS_MAX_LINES lines; the rest is in the output)" >>"$progress_file" 2>/dev/null || true
    return 0
  fi
  printf '%s\n' "$(date -u +%H:%M:%S) ${1:0:$PROGRESS_LINE_MAX}" >>"$progress_file" 2>/dev/null || true
}

# Live progress off: says so once, with why (never the URL).
progress_off() {
  local why=${1%%https://*}
  progress_file=""
  log "live progress is off: ${why:0:300}; the deploy goes on (the whole log follows at the end)"
}

# Starts the uploader, once the bundle's options are read (from unpack_bundle). Only with a
# target in the options: the action gives none with `progress: false` or `transport: local`.
start_progress() {
  local id=${AWS_SSM_INSTANCE_ID:-}
  if [[ -z "$progress_to" && ${#progress_urls[@]} -eq 0 ]] || [[ -n "$progress_pid" ]]; then
    return 0
  fi
  if [[ ! "$id" =~ $INSTANCE_ID_PATTERN ]]; then
    progress_off "the SSM agent gave no instance id (AWS_SSM_INSTANCE_ID) to name the progress object"
    return 0
  fi
  if [[ -n "$progress_to" ]]; then
    if [[ ! "$progress_to" =~ $PROGRESS_TO_PATTERN ]]; then
      progress_off "bad --progress-to"
      return 0
    fi
    progress_via=s3
    progress_bucket=${BASH_REMATCH[1]}
    progress_key="${BASH_REMATCH[2]}$id.log"
    if ! command -v aws >/dev/null 2>&1; then
      progress_off "no aws command on this machine"
      return 0
    fi
  else
    progress_via=curl
    progress_url=${progress_urls[$id]:-}
    if [[ -z "$progress_url" ]]; then
      progress_off "no upload URL for instance $id"
      return 0
    fi
    if ! command -v curl >/dev/null 2>&1; then
      progress_off "no curl command on this machine"
      return 0
    fi
  fi
  progress_file="$work_dir/progress.log"
  if ! : >"$progress_file" 2>/dev/null; then
    progress_off "cannot write $progress_file"
    return 0
  fi
  rm -f -- "$work_dir/progress.stop" "$work_dir/progress.off"
  local main_pid=$$
  (
    trap - EXIT INT HUP
    # Stopped (stop_progress): the upload in flight goes too, so that no older copy lands
    # after the last one.
    trap 'kill "$progress_put_pid" 2>/dev/null; exit 0' TERM
    local size sent=0 failures=0 tick
    while :; do
      for ((tick = 0; tick < PROGRESS_EVERY_SECONDS; tick++)); do
        sleep 1
        if [[ -e "$work_dir/progress.stop" ]] || ! kill -0 "$main_pid" 2>/dev/null; then
          exit 0
        fi
      done
      size=$(wc -c <"$progress_file" 2>/dev/null) || size=0
      if [[ "$size" == "$sent" ]]; then
        continue
      fi
      if put_progress; then
        sent=$size
        failures=0
        continue
      fi
      failures=$((failures + 1))
      if ((failures >= PROGRESS_TRIES)); then
        : >"$work_dir/progress.off" 2>/dev/null || true
        progress_off "the upload failed $failures times: $REPLY"
        exit 0
      fi
    done
  ) &
  progress_pid=$!
}

# Puts a snapshot of the progress file. REPLY: why it failed.
put_progress() {
  local copy="$work_dir/progress.put.$BASHPID" err="$work_dir/progress.err.$BASHPID" rc=0
  REPLY=""
  if ! cp -f -- "$progress_file" "$copy" 2>/dev/null; then
    REPLY="cannot copy $progress_file"
    return 1
  fi
  # In the background and waited for, so that a TERM to the uploader (a trap) ends it at once.
  if [[ "$progress_via" == s3 ]]; then
    timeout "$PROGRESS_PUT_SECONDS" aws s3api put-object --region "$progress_region" \
      --bucket "$progress_bucket" --key "$progress_key" --body "$copy" \
      --expected-bucket-owner "$progress_owner" --content-type 'text/plain; charset=utf-8' \
      --output text >/dev/null 2>"$err" </dev/null &
  else
    # The content type is said: curl's default for --data-binary (a form) would have the
    # object stored as form data, or, behind some servers, as nothing at all.
    timeout "$PROGRESS_PUT_SECONDS" curl -fsS -X PUT --max-time "$((PROGRESS_PUT_SECONDS - 1))" \
      -H "x-amz-expected-bucket-owner: $progress_owner" -H 'Content-Type: text/plain; charset=utf-8' \
      --data-binary "@$copy" "$progress_url" >/dev/null 2>"$err" </dev/null &
  fi
  progress_put_pid=$!
  wait "$progress_put_pid" || rc=$?
  progress_put_pid=""
  if ((rc != 0)); then
    REPLY=$(head -c 300 -- "$err" 2>/dev/null | tr -s '\n\r' '  ') || REPLY=""
    REPLY=${REPLY:-exit $rc}
    if ((rc == 124)); then
      REPLY="no answer within ${PROGRESS_PUT_SECONDS}s"
    fi
  fi
  rm -f -- "$copy" "$err" 2>/dev/null || true
  return "$rc"
}

# Stops the uploader and puts the file a last time, unless live progress was turned off or the
# run was stopped by a signal (then time is short). From the EXIT trap: never fails.
# shellcheck disable=SC2329 # called by cleanup (the EXIT trap) and on_signal
stop_progress() {
  if [[ -z "$progress_pid" ]]; then
    return 0
  fi
  : >"$work_dir/progress.stop" 2>/dev/null || true
  # Mid-upload, its TERM trap ends the upload too; asleep, it goes within a second.
  kill "$progress_pid" 2>/dev/null || true
  wait "$progress_pid" 2>/dev/null || true
  progress_pid=""
  if [[ -n "$progress_file" && "$interrupted" != true && ! -e "$work_dir/progress.off" ]]; then
    put_progress || true
  fi
  progress_file=""
}
