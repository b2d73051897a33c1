#!/usr/bin/env bash
# A real multi-process stack on this machine, to try cluster commands before a cluster exists:
# a Ray head (GCS + dashboard with the Jobs API), a second Ray node joined to it, and an MLflow
# server on SQLite. Their addresses and process ids go to an env file that stop-stack.sh reads.
# Not a production setup, and it touches nothing it did not start (no `ray stop`).
#
#   infra/local/start-stack.sh [ENV_FILE]       # default: $VAEPIPE_STACK_ENV or infra/local/.stack.env
#   set -a; . infra/local/.stack.env; set +a
#   vaepipe submit train --address "$RAY_DASHBOARD_ADDRESS" --config configs/train-shapes.yaml \
#       --set tracking.tracking_uri="$MLFLOW_TRACKING_URI"
#   infra/local/stop-stack.sh [ENV_FILE]
#
# The env file holds RAY_ADDRESS (GCS host:port, for ray.init / `ray status --address`),
# RAY_DASHBOARD_ADDRESS (http://127.0.0.1:PORT, for `vaepipe submit --address`),
# MLFLOW_TRACKING_URI, RAY_AUTH_MODE, and the process ids. No secret: Ray's token stays in
# ~/.ray/auth_token (created here with `ray get-auth-token --generate` when missing; clients such
# as pipelines/submit.py and ray.init read it there).
#
# Settings (environment variables):
#   VAEPIPE_STACK_DIR      logs, Ray temp dirs, mlflow.db and artifacts. Default: a new
#                          /tmp/vaepipe-stack.XXXXXX that stop-stack.sh deletes; a folder you name
#                          is kept (MLflow runs survive a restart). At most 35 characters: Ray's
#                          unix socket paths live under it.
#   VAEPIPE_STACK_CPUS     CPUs each Ray node offers (default 1)
#   VAEPIPE_STACK_GCS_PORT, VAEPIPE_STACK_DASHBOARD_PORT, VAEPIPE_STACK_MLFLOW_PORT
#                          fixed ports; default: free ones (8265/6379 may belong to someone else)
#   VAEPIPE_STACK_TIMEOUT  seconds to wait for the stack to be ready (default 180)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/infra/local"
ENV_FILE=${1:-${VAEPIPE_STACK_ENV:-$HERE/.stack.env}}
CPUS=${VAEPIPE_STACK_CPUS:-1}
TIMEOUT=${VAEPIPE_STACK_TIMEOUT:-180}
WORKER_PORTS=100  # ports per node for Ray worker processes (one each); the two nodes get disjoint ranges

die() { echo "start-stack: error: $*" >&2; exit 1; }
log() { echo "[start-stack] $*" >&2; }

# The venv's tools when present (same Ray as the project), else whatever PATH has.
tool() {
    if [ -x "$ROOT/.venv/bin/$1" ]; then echo "$ROOT/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
    else die "'$1' not found in $ROOT/.venv/bin or on PATH (make venv)"; fi
}
PY=$(tool python)
RAY=$(tool ray)
MLFLOW=$(tool mlflow)
# Jobs run `python -m jobs.X` with the PATH of the Ray node: make that the Ray install's python.
export PATH="$(dirname "$RAY"):$PATH"
command -v setsid >/dev/null || die "setsid (util-linux) is needed to give each service its own session"

[ -e "$ENV_FILE" ] && die "$ENV_FILE exists: a stack may be running. Stop it first: infra/local/stop-stack.sh $ENV_FILE"
mkdir -p "$(dirname "$ENV_FILE")"
ENV_FILE=$(cd "$(dirname "$ENV_FILE")" && pwd)/$(basename "$ENV_FILE")

if [ -n "${VAEPIPE_STACK_DIR:-}" ]; then
    mkdir -p "$VAEPIPE_STACK_DIR"
    STACK_DIR=$(cd "$VAEPIPE_STACK_DIR" && pwd)
    OWNS_DIR=0
else
    STACK_DIR=$(mktemp -d /tmp/vaepipe-stack.XXXXXX)
    OWNS_DIR=1
fi
# Ray puts unix sockets at STACK_DIR/nodeN/session_<date>_<pid>/sockets/plasma_store: 107 bytes max.
[ ${#STACK_DIR} -le 35 ] || die "VAEPIPE_STACK_DIR=$STACK_DIR is ${#STACK_DIR} characters; Ray's socket paths need <= 35"
case "$STACK_DIR$ENV_FILE" in *[[:space:]]*) die "paths with spaces are not supported: $STACK_DIR, $ENV_FILE";; esac
mkdir -p "$STACK_DIR/logs" "$STACK_DIR/mlflow"

# Ports: Ray's defaults are fixed numbers (6379, 8265, 52365, 10001, ...), so two nodes on one
# host, or a second Ray on a shared machine, collide. Every port is chosen here: the head's GCS,
# dashboard and client server, and for each node its node manager, object manager, dashboard
# agent (http + grpc), metrics exporter, runtime-env agent and a range for worker processes.
read -r GCS_PORT DASH_PORT MLFLOW_PORT H_NM H_OM H_AGENT H_AGENT_GRPC H_METRICS H_RTENV H_CLIENT \
        N_NM N_OM N_AGENT N_AGENT_GRPC N_METRICS N_RTENV H_WORKERS N_WORKERS < <(
    "$PY" - "${VAEPIPE_STACK_GCS_PORT:-0}" "${VAEPIPE_STACK_DASHBOARD_PORT:-0}" \
            "${VAEPIPE_STACK_MLFLOW_PORT:-0}" "$WORKER_PORTS" <<'EOF'
import random, socket, sys

held = []  # every socket stays bound until all ports are chosen, so no port is picked twice
def bind(port):
    s = socket.socket()
    try:
        s.bind(("", port))  # all interfaces: Ray's GCS and workers listen beyond loopback
    except OSError:
        s.close()
        return None
    held.append(s)
    return s.getsockname()[1]

def free_range(size):  # below Linux's ephemeral range (32768+), where bind(0) never lands
    for _ in range(200):
        base, mark = random.randrange(20000, 32000 - size), len(held)
        if all(bind(p) for p in range(base, base + size)):
            return f"{base}-{base + size - 1}"
        for s in held[mark:]:
            s.close()
        del held[mark:]
    sys.exit(f"no {size} consecutive free ports in 20000-32000")

fixed, size = [int(p) for p in sys.argv[1:4]], int(sys.argv[4])
ports = [bind(p) for p in fixed]
if None in ports:
    sys.exit(f"port {fixed[ports.index(None)]} is in use")
ports += [bind(0) for _ in range(13)] + [free_range(size), free_range(size)]
print(*ports)
EOF
) || die "could not pick free ports"
[ -n "${N_WORKERS:-}" ] || die "could not pick free ports"

# Token authentication, on unless RAY_AUTH_MODE says otherwise: the GCS listens on every interface,
# not only loopback. Ray 2.60's `ray start --head` uses a token only when one exists, and a joining
# node sends it only with RAY_AUTH_MODE=token; so make sure one exists and set the mode for both.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ]; then
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
        "$RAY" get-auth-token --generate >/dev/null 2>&1 || die "no Ray auth token and none could be generated"
        chmod 600 "$token_file" 2>/dev/null || true  # Ray writes it world-readable
    fi
fi
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# On SIGTERM a Ray 2.60 node first drains for up to 30 s (for Serve replicas); nothing here needs
# that, and stop-stack.sh would wait it out after any job ran on the node.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
unset RAY_ADDRESS  # the caller's cluster is not ours; set again below, to this stack's GCS

# The env file is written before anything starts and grows as services start, so that
# stop-stack.sh can always clean up, even after this script died halfway.
{
    echo "# vaepipe local stack, started $(date -u +%Y-%m-%dT%H:%M:%SZ) by infra/local/start-stack.sh"
    echo "# stop it with: infra/local/stop-stack.sh $ENV_FILE"
    echo "VAEPIPE_STACK_DIR=$STACK_DIR"
    echo "VAEPIPE_STACK_OWNS_DIR=$OWNS_DIR"
} >"$ENV_FILE"

started_ok=0
on_exit() {
    if [ "$started_ok" != 1 ]; then
        echo "start-stack: failed; stopping what was started (logs: $STACK_DIR/logs)" >&2
        VAEPIPE_STACK_KEEP_DIR=1 "$HERE/stop-stack.sh" "$ENV_FILE" >&2 || true
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Each service runs in a session of its own (setsid), so stop-stack.sh can find every process it
# spawned by session id, and nothing else.
start_service() {  # NAME VAR -- command...
    local name=$1 var=$2
    shift 3
    setsid "$@" >"$STACK_DIR/logs/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$var=$pid" >>"$ENV_FILE"
    printf -v "$var" '%s' "$pid"
    log "$name: pid $pid, log $STACK_DIR/logs/$name.log"
}

deadline=$((SECONDS + TIMEOUT))
wait_until() {  # DESCRIPTION PID LOGNAME -- check command...
    local what=$1 pid=$2 name=$3
    shift 4
    until "$@" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$STACK_DIR/logs/$name.log" >&2 || true
            die "$name exited before $what"
        fi
        if [ $SECONDS -ge $deadline ]; then
            tail -n 30 "$STACK_DIR/logs/$name.log" >&2 || true
            die "timed out after ${TIMEOUT}s waiting for $what"
        fi
        sleep 0.5
    done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# HTTP status of a GET (0 when nothing answers); with a token when Ray wants one.
http_status() {
    "$PY" - "$@" <<'EOF'
import sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    request.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    print(urllib.request.urlopen(request, timeout=3).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print(0)
EOF
}
answers() { case "$(http_status "$@")" in 200|401|403) return 0;; *) return 1;; esac; }
healthy() { [ "$(http_status "$@")" = 200 ]; }
ray_token() {
    [ "$RAY_AUTH_MODE" = token ] || return 0
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then printf '%s' "$RAY_AUTH_TOKEN"
    else tr -d '[:space:]' <"${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; fi
}
alive_nodes() {  # DASHBOARD_URL TOKEN -> number of ALIVE nodes (state API)
    "$PY" - "$@" <<'EOF'
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/v0/nodes?limit=100&detail=false")
if len(sys.argv) > 2 and sys.argv[2]:
    request.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    body = json.load(urllib.request.urlopen(request, timeout=5))
    print(sum(node.get("state") == "ALIVE" for node in body["data"]["result"]["result"]))
except Exception:
    print(0)
EOF
}

# Every process the nodes start inherits RAY_ADDRESS: Ray internals that look the cluster up
# without an address (e.g. Ray Train's placement group cleaner) then find this one, not the most
# recent other Ray on a shared machine.
export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
RAY_COMMON=(--block --node-ip-address 127.0.0.1 --num-cpus "$CPUS" --disable-usage-stats)
start_service ray-head RAY_HEAD_PID -- "$RAY" start --head "${RAY_COMMON[@]}" \
    --port "$GCS_PORT" --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --ray-client-server-port "$H_CLIENT" --node-manager-port "$H_NM" --object-manager-port "$H_OM" \
    --dashboard-agent-listen-port "$H_AGENT" --dashboard-agent-grpc-port "$H_AGENT_GRPC" \
    --metrics-export-port "$H_METRICS" --runtime-env-agent-port "$H_RTENV" \
    --min-worker-port "${H_WORKERS%-*}" --max-worker-port "${H_WORKERS#*-}" --temp-dir "$STACK_DIR/node0"
start_service mlflow MLFLOW_PID -- "$MLFLOW" server \
    --backend-store-uri "sqlite:///$STACK_DIR/mlflow/mlflow.db" \
    --artifacts-destination "$STACK_DIR/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1

wait_until "the Ray GCS on port $GCS_PORT" "$RAY_HEAD_PID" ray-head -- port_open "$GCS_PORT"
start_node1() {
    start_service ray-node1 RAY_NODE1_PID -- "$RAY" start --address "127.0.0.1:$GCS_PORT" "${RAY_COMMON[@]}" \
        --node-manager-port "$N_NM" --object-manager-port "$N_OM" \
        --dashboard-agent-listen-port "$N_AGENT" --dashboard-agent-grpc-port "$N_AGENT_GRPC" \
        --metrics-export-port "$N_METRICS" --runtime-env-agent-port "$N_RTENV" \
        --min-worker-port "${N_WORKERS%-*}" --max-worker-port "${N_WORKERS#*-}" --temp-dir "$STACK_DIR/node1"
}
start_node1
DASHBOARD="http://127.0.0.1:$DASH_PORT"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
wait_until "the Ray dashboard at $DASHBOARD" "$RAY_HEAD_PID" ray-head -- answers "$DASHBOARD/api/version"
TOKEN=$(ray_token) || die "RAY_AUTH_MODE=token but no token in ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
two_nodes() { [ "$(alive_nodes "$DASHBOARD" "$TOKEN")" = 2 ]; }
# `ray start` gives a joining node a fixed 30 s to register with the GCS (Ray's own constant); on a
# loaded machine the raylet can miss it and the node exits ("timed out during startup"). That
# case, and only that one, is retried: every process left in the failed node's session is stopped first.
for try in 1 2 3; do
    until two_nodes; do
        kill -0 "$RAY_NODE1_PID" 2>/dev/null || break
        [ $SECONDS -lt $deadline ] || break
        sleep 0.5
    done
    two_nodes && break
    kill -0 "$RAY_NODE1_PID" 2>/dev/null && break  # still running: the deadline passed, fail below
    grep -q "timed out during startup" "$STACK_DIR/logs/ray-node1.log" 2>/dev/null || break
    [ "$try" -lt 3 ] || break
    log "ray-node1 missed Ray's 30-s registration window (try $try of 3); starting it again"
    failed_session=$(ps -eo pid=,sid= | awk -v sid="$RAY_NODE1_PID" '$2 == sid { print $1 }')
    [ -z "$failed_session" ] || kill -KILL $failed_session 2>/dev/null || true
    mv "$STACK_DIR/logs/ray-node1.log" "$STACK_DIR/logs/ray-node1.try$try.log"
    start_node1
done
wait_until "2 alive Ray nodes" "$RAY_NODE1_PID" ray-node1 -- two_nodes
wait_until "MLflow at $MLFLOW_URI/health" "$MLFLOW_PID" mlflow -- healthy "$MLFLOW_URI/health"

{
    echo "RAY_ADDRESS=127.0.0.1:$GCS_PORT"
    echo "RAY_DASHBOARD_ADDRESS=$DASHBOARD"
    echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"
    echo "MLFLOW_TRACKING_URI=$MLFLOW_URI"
} >>"$ENV_FILE"
started_ok=1
log "ready in ${SECONDS}s: 2 Ray nodes ($CPUS CPU each), dashboard $DASHBOARD, MLflow $MLFLOW_URI"
log "env file: $ENV_FILE"
cat "$ENV_FILE"
