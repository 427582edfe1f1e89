#!/usr/bin/env bash
# Nightly rebuild for cron: `grove rebuild` for today, its output appended to a dated log file, and
# its exit code returned so cron (and whatever watches cron) sees a failure.
#   0 all rebuilt and promoted (or nothing to do); 1 a task failed; 7 an index failed its quality gate
#   (the previous version keeps serving); see `grove --help` for the others.
# Extra arguments go to `grove rebuild`, e.g. --scheduler-host 127.0.0.1 to run under the luigid that
# tasks/cron/grove-luigid.sh starts (on loopback; crontab.example starts it at boot).
set -u
cd "$(dirname "$0")/../.." || exit 2
log_dir=${GROVE_LOG_DIR:-artifacts/logs}
mkdir -p "$log_dir"
log="$log_dir/rebuild-$(date +%F).log"
echo "$(date -u +%FT%TZ) grove rebuild starting (pid $$)" >> "$log"
.venv/bin/grove rebuild --log "$log" "$@" >> "$log" 2>&1
status=$?
echo "$(date -u +%FT%TZ) grove rebuild exited with $status" >> "$log"
exit "$status"
