#!/usr/bin/env bash
# Stop the local stack that start-stack.sh recorded in ENV_FILE: exactly its processes (each
# service is a session of its own; every process in those sessions is stopped), then remove the
# env file and, when start-stack.sh created it, the stack folder. Never `ray stop`, which would
# also stop every other Ray instance of this user on the machine.
#
#   infra/local/stop-stack.sh [ENV_FILE]     # default: $VAEPIPE_STACK_ENV or infra/local/.stack.env
#
# SIGTERM first, SIGKILL for whatever is left after VAEPIPE_STACK_STOP_TIMEOUT seconds (default
# 45). Exit status 1 if anything survives. Who gets SIGTERM differs, as measured with Ray 2.60 and
# MLflow 3.17: a Ray node stops in ~5 s when only its `ray start --block` process gets it (it stops
# its children in order; start-stack.sh turns the 30 s drain off) but took ~35 s when all its
# processes got it at once; MLflow's server left its huey job consumers running (40 s and more)
# when only the `mlflow` process got it, so its whole session gets SIGTERM.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENV_FILE=${1:-${VAEPIPE_STACK_ENV:-$ROOT/infra/local/.stack.env}}
TIMEOUT=${VAEPIPE_STACK_STOP_TIMEOUT:-45}

die() { echo "stop-stack: error: $*" >&2; exit 1; }
log() { echo "[stop-stack] $*" >&2; }

[ -f "$ENV_FILE" ] || die "no env file $ENV_FILE (nothing recorded to stop)"

# Read the file as data (KEY=value lines), not as a script.
value() { sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1; }
STACK_DIR=$(value VAEPIPE_STACK_DIR)
OWNS_DIR=$(value VAEPIPE_STACK_OWNS_DIR)

# service name, pid variable, who gets SIGTERM (leader | session), what the leader's command line contains
SERVICES=("ray-node1 RAY_NODE1_PID leader ray start" "ray-head RAY_HEAD_PID leader ray start"
          "mlflow MLFLOW_PID session mlflow server")

# Every live process whose session id is SID. Linux does not hand out a pid that is still some
# session's id, so while any member lives, SID names our session and nobody else's. Zombies are
# skipped: already dead, and reaped by whoever adopted them (not always promptly in containers).
members() { ps -eo pid=,sid=,stat= | awk -v sid="$1" '$2 == sid && $3 !~ /^Z/ { print $1 }'; }

SESSIONS=() NAMES=()
for entry in "${SERVICES[@]}"; do
    read -r name var mode marker <<<"$entry"
    pid=$(value "$var")
    [ -n "$pid" ] || continue
    [[ "$pid" =~ ^[0-9]+$ ]] || die "$var=$pid in $ENV_FILE is not a process id"
    # A leader that is alive must still be ours: a reused pid would be some other program.
    if kill -0 "$pid" 2>/dev/null && ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$marker"; then
        log "$name: pid $pid now runs something else; not touching it"
        continue
    fi
    if [ -z "$(members "$pid")" ]; then
        log "$name: pid $pid already gone"
        continue
    fi
    log "$name: stopping session $pid ($(members "$pid" | wc -l) processes)"
    if [ "$mode" = leader ] && kill -TERM "$pid" 2>/dev/null; then :
    else kill -TERM $(members "$pid") 2>/dev/null || true; fi
    SESSIONS+=("$pid") NAMES+=("$name")
done

left() { for sid in "${SESSIONS[@]}"; do members "$sid"; done; }
declare -A REPORTED=()
wait_empty() {  # SECONDS: wait until no session has a process left, saying when each one ends
    local until=$((SECONDS + $1)) i
    while :; do
        for i in "${!SESSIONS[@]}"; do
            if [ -z "${REPORTED[$i]:-}" ] && [ -z "$(members "${SESSIONS[$i]}")" ]; then
                REPORTED[$i]=1
                log "${NAMES[$i]}: stopped after ${SECONDS}s"
            fi
        done
        [ -z "$(left)" ] && return 0
        [ $SECONDS -lt $until ] || return 1
        sleep 0.2
    done
}

if [ ${#SESSIONS[@]} -gt 0 ] && ! wait_empty "$TIMEOUT"; then
    log "still running after ${TIMEOUT}s: $(left | tr '\n' ' ')- sending SIGKILL"
    kill -KILL $(left) 2>/dev/null || true
    wait_empty 10 || die "processes survive SIGKILL: $(left | tr '\n' ' ')(env file kept: $ENV_FILE)"
fi

rm -f "$ENV_FILE"
if [ "$OWNS_DIR" = 1 ] && [ -n "$STACK_DIR" ] && [ -z "${VAEPIPE_STACK_KEEP_DIR:-}" ]; then
    case "$STACK_DIR" in
        /tmp/vaepipe-stack.*) rm -rf "$STACK_DIR" ;;
        *) log "not removing unexpected stack folder $STACK_DIR" ;;
    esac
elif [ -n "$STACK_DIR" ]; then
    log "kept $STACK_DIR (logs, MLflow store)"
fi
log "stopped ${#SESSIONS[@]} service(s); removed $ENV_FILE"
