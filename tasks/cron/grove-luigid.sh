#!/usr/bin/env bash
# Start luigid, grove's central scheduler, as the README does: listening on loopback only, with its
# state and task history outside the artifact root, in a directory created here if it is missing.
#   tasks/cron/grove-luigid.sh                # in the foreground (Ctrl-C stops it and saves its state)
#   tasks/cron/grove-luigid.sh --background   # as a daemon (crontab.example starts it @reboot)
# Settings, from the environment:
#   GROVE_LUIGID_ADDRESS  the interface it listens on (default 127.0.0.1). Its API has no
#                         authentication: listen elsewhere only on a network you trust.
#   GROVE_LUIGID_PORT     its port (default 8082, luigi.cfg [core] scheduler_port)
#   GROVE_LUIGID_STATE    its directory: state.pickle (the scheduler's state, saved when it stops),
#                         task-history.sqlite (luigi.cfg [task_history]), logs/ and luigid.pid of
#                         --background (default ${XDG_STATE_HOME:-~/.local/state}/grove/luigid)
# Other arguments go to luigid. It runs from the checkout, so it reads the checkout's luigi.cfg.
set -eu
state=${GROVE_LUIGID_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/grove/luigid}
mkdir -p "$state"
# luigi.cfg names the SQLite file as sqlite:///${GROVE_LUIGID_STATE}/...: the path must be absolute.
GROVE_LUIGID_STATE=$(cd "$state" && pwd -P)
export GROVE_LUIGID_STATE
cd "$(dirname "$0")/../.."
luigid=.venv/bin/luigid
[ -x "$luigid" ] || luigid=luigid
# In the foreground luigid logs to the terminal; --logdir would send that to a file instead.
daemon=()
for arg in "$@"; do
    if [ "$arg" = --background ]; then
        daemon=(--logdir "$GROVE_LUIGID_STATE/logs" --pidfile "$GROVE_LUIGID_STATE/luigid.pid")
    fi
done
exec "$luigid" --address "${GROVE_LUIGID_ADDRESS:-127.0.0.1}" --port "${GROVE_LUIGID_PORT:-8082}" \
    --state-path "$GROVE_LUIGID_STATE/state.pickle" ${daemon[@]+"${daemon[@]}"} "$@"
