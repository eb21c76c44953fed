#!/usr/bin/env bash
# Start one splitinfer engine and N OpenAI-compatible HTTP servers in front of it; stop them
# all on Ctrl-C or SIGTERM. Run with --help for the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

usage() {
    cat <<'EOF'
Usage: scripts/start_distributed.sh [options] [engine flags...]

Starts the engine (which loads the model once), waits until it is ready, then starts N
stateless HTTP servers on consecutive ports, prints their URLs, and keeps running until
Ctrl-C or SIGTERM, when it stops everything it started. On a fresh clone it first creates
.venv and installs splitinfer (as scripts/test.sh does).

Options:
  --model DIR            Hugging Face Llama checkpoint directory. Without it, a small random
                         demo checkpoint is built on first use under .cache/demo-model (it
                         speaks gibberish, but exercises every path).
  --servers N            Number of HTTP servers (default: 1).
  --host HOST            Interface the servers listen on (default: 127.0.0.1).
  --port PORT            Port of the first server; the others count up from it (default: 8000).
  --api-key KEY          Require 'Authorization: Bearer KEY' on the servers' /v1 routes.
  --served-model-name N  Model name the servers report and require (default: the checkpoint's
                         directory name).
  --tool-call-parser P   How the model writes tool calls, for the servers: auto (from the
                         checkpoint; the default), hermes, llama3_json, mistral or none.
  --engine-address ADDR  Engine socket (default: ipc://RUN_DIR/engine.sock).
  --run-dir DIR          Where logs and the socket go (default: runs/<date-time>).
  -h, --help             Show this help.

Any other flag goes to the engine, with its value: its settings are listed below, from the
engine's own --help, which also has --lease and --max-frame-bytes. Everything after `--`
goes to the engine as is.

Logs: RUN_DIR/engine.log and RUN_DIR/server-PORT.log.
EOF
    # The engine's flags are generated from its EngineConfig: printed from there, never copied.
    local python=python3
    [ -x .venv/bin/python ] && python=.venv/bin/python
    echo
    if ! "$python" -m splitinfer.engine --help 2>/dev/null | sed -n '/^model and memory:/,/^serving:/p' \
            | grep -v '^serving:' | grep .; then
        echo "Engine flags: run 'python -m splitinfer.engine --help' once splitinfer is installed."
    fi
}

MODEL="" SERVERS=1 HOST=127.0.0.1 PORT=8000 API_KEY="" SERVED_NAME="" TOOL_PARSER="" ADDRESS="" RUN_DIR=""
ENGINE_ARGS=()
need_value() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --servers) need_value "$@"; SERVERS=$2; shift 2 ;;
        --host) need_value "$@"; HOST=$2; shift 2 ;;
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --api-key) need_value "$@"; API_KEY=$2; shift 2 ;;
        --served-model-name) need_value "$@"; SERVED_NAME=$2; shift 2 ;;
        --tool-call-parser) need_value "$@"; TOOL_PARSER=$2; shift 2 ;;
        --engine-address) need_value "$@"; ADDRESS=$2; shift 2 ;;
        --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
        --) shift; ENGINE_ARGS+=("$@"); break ;;
        --*=*) ENGINE_ARGS+=("$1"); shift ;;
        --*)  # an engine flag: with its value unless the next word is another flag
            ENGINE_ARGS+=("$1"); shift
            if [ $# -gt 0 ] && [[ "$1" != --* ]]; then ENGINE_ARGS+=("$1"); shift; fi ;;
        *) echo "error: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$SERVERS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --servers must be a positive integer" >&2; exit 2; }
[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "error: --port must be a number" >&2; exit 2; }

. scripts/env.sh
splitinfer_env ""

RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
ADDRESS=${ADDRESS:-ipc://$RUN_DIR/engine.sock}

if [ -z "$MODEL" ]; then
    MODEL=$REPO/.cache/demo-model
    if [ ! -f "$MODEL/config.json" ]; then
        echo "building the demo checkpoint in $MODEL"
        "$PYTHON" scripts/make_tiny_model.py "$MODEL" >/dev/null
    fi
fi

PIDS=()
stop_all() {
    trap - INT TERM EXIT
    [ ${#PIDS[@]} -eq 0 ] && return
    echo "stopping ${#PIDS[@]} process(es)"
    # Servers first (reverse start order), then the engine, which finishes in-flight requests.
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
    for _ in $(seq 100); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

echo "engine: loading $MODEL (log: $RUN_DIR/engine.log)"
"$PYTHON" -m splitinfer.engine --model "$MODEL" --address "$ADDRESS" \
    ${SERVED_NAME:+--served-model-name "$SERVED_NAME"} ${ENGINE_ARGS[@]+"${ENGINE_ARGS[@]}"} \
    >"$RUN_DIR/engine.log" 2>&1 &
PIDS+=($!)
ENGINE_PID=$!
until grep -q "ready on" "$RUN_DIR/engine.log" 2>/dev/null; do
    if ! kill -0 "$ENGINE_PID" 2>/dev/null; then
        echo "error: the engine exited before it was ready:" >&2
        tail -n 20 "$RUN_DIR/engine.log" >&2
        exit 1
    fi
    sleep 0.2
done
grep "ready on" "$RUN_DIR/engine.log" | tail -n 1

for ((i=0; i<SERVERS; i++)); do
    port=$((PORT + i))
    "$PYTHON" -m splitinfer.server --engine "$ADDRESS" --host "$HOST" --port "$port" \
        ${API_KEY:+--api-key "$API_KEY"} ${SERVED_NAME:+--served-model-name "$SERVED_NAME"} \
        ${TOOL_PARSER:+--tool-call-parser "$TOOL_PARSER"} >"$RUN_DIR/server-$port.log" 2>&1 &
    PIDS+=($!)
done

healthy() {
    "$PYTHON" - "$1" <<'PY'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}
for ((i=0; i<SERVERS; i++)); do
    port=$((PORT + i))
    for _ in $(seq 300); do
        healthy "http://$HOST:$port/health" && break
        if ! kill -0 "${PIDS[i+1]}" 2>/dev/null; then
            echo "error: the server on port $port exited:" >&2
            tail -n 20 "$RUN_DIR/server-$port.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    healthy "http://$HOST:$port/health" || { echo "error: the server on port $port is not healthy" >&2; exit 1; }
done

NAME=${SERVED_NAME:-$(basename "$MODEL")}
echo
echo "splitinfer is up: 1 engine (pid $ENGINE_PID), $SERVERS server(s); logs in $RUN_DIR"
for ((i=0; i<SERVERS; i++)); do echo "  http://$HOST:$((PORT + i))/v1"; done
echo
echo "Try:"
echo "  curl http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\"
[ -n "$API_KEY" ] && echo "    -H 'Authorization: Bearer $API_KEY' \\"
echo "    -d '{\"model\": \"$NAME\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 32}'"
echo
echo "Ctrl-C stops everything."

# Run until a signal arrives or any process dies (then stop the rest).
while true; do
    for pid in "${PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: process $pid exited; stopping the others (see $RUN_DIR)" >&2
            exit 1
        fi
    done
    sleep 1
done
