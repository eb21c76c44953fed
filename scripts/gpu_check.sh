#!/usr/bin/env bash
# Does every GPU path of splitinfer work, and how fast is it? One command for a bare GPU
# machine (no network needed), within a budget of 9 minutes (--budget). Run with --help for the flags.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
COMMAND_LINE="scripts/gpu_check.sh${*:+ $*}"

usage() {
    cat <<'EOF'
Usage: scripts/gpu_check.sh [--dry-run] [--model DIR] [--wheels DIR] [--only STEP,...] [--budget S]

Runs, in order, each step under its own time box (one failure cannot eat the budget),
printing progress as it goes and writing everything under $OUT (default: gpu-check/):

  install     what is missing of pyzmq, msgspec, starlette, uvicorn, sse-starlette, openai, hypothesis,
              llguidance, jsonschema
              (from the wheel folder, `pip install --no-index`, when there is one; else from
              the network), then splitinfer itself (`pip install --no-deps
              --no-build-isolation -e .`) unless it is already importable
  checkpoint  a random checkpoint of Llama-3.2-1B's shapes in bf16 (make_tiny_model.py
              --preset llama-3.2-1b; built once into .cache/), unless --model is given
  device      nvidia-smi, torch/triton/transformers versions, measured copy bandwidth and
              bf16 matmul peak                                          -> device.json
  tests       every test marked `gpu` (bf16 kernels compiled, CUDA-graph replay equal to
              eager, no allocation and no host sync in steady decode, KV sizing, no compile
              while serving, bf16 against transformers, the sampler's one sync, KV past
              2^31 elements, ...)                                       -> pytest.log
  kernels     python -m splitinfer.kernels.bench --quick: Llama-3.2-1B and Llama-3.1-8B
              shapes, correct, time, % of peak, vs torch                -> kernels.csv
  engine      scripts/bench_engine.py on the checkpoint: batch-1 decode with and without
              CUDA graphs (% of the bandwidth roofline), prefill 128/512/2048, 64
              concurrent mixed requests, and transformers (bf16, sdpa) in the same run
                                                                        -> engine.json
  http        scripts/start_distributed.sh (1 engine, 2 servers) and 32 concurrent streams
              for 30 s through both servers; any failed request fails the step -> http.json
  tp          scripts/bench_tp.py at tensor-parallel sizes 1 and 2 (NCCL, rank i on GPU i): the
              step split into compute, broadcast, all-reduce and gather (only with 2+ GPUs)
                                                                        -> tp.log
  sanitizer   compute-sanitizer memcheck over the bf16 paged attention kernel tests, torch's
              caching allocator off (only where compute-sanitizer is installed) -> sanitizer.log
and then writes summary.md: a table per step. Exit status 0 when every step passed.

Options:
  --dry-run      Without a GPU: run every step's plumbing on CPU at toy sizes (the tiny test
                 checkpoint, a few requests). Says clearly that no GPU numbers were taken.
  --model DIR    Measure this checkpoint instead of the random Llama-3.2-1B-shaped one.
  --wheels DIR   Where scripts/gpu_wheels.sh put the wheels (default: $GPU_WHEELS or gpu-wheels/).
  --only STEPS   Run only these steps (comma-separated names from the list above).
  --budget S     Seconds for the whole check (default: 540, under a 10-minute command limit):
                 a step gets at most what is left, and steps that find none left are not run.
  -h, --help     Show this help.

Environment: OUT (output folder), PYTHON (the interpreter; default: the first of python3 and
.venv/bin/python whose torch sees a GPU, or on a dry run that imports torch),
TRITON_CACHE_DIR (default: .cache/triton, so that a second run skips the compiles).
EOF
}

DRY_RUN=0 MODEL="" ONLY="" WHEELS=${GPU_WHEELS:-gpu-wheels} BUDGET=540
need_value() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --wheels) need_value "$@"; WHEELS=$2; shift 2 ;;
        --only) need_value "$@"; ONLY=",$2,"; shift 2 ;;
        --budget) need_value "$@"; BUDGET=$2; shift 2 ;;
        *) echo "error: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# A full run starts from an empty record; with --only, the other steps' rows and files stay.
if [ -z "$ONLY" ] || [ ! -f "$OUT/steps.csv" ]; then
    echo "step,status,seconds,box" >"$OUT/steps.csv"
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$REPO/.cache/triton}
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # a dry run measures nothing, even on a GPU machine
fi

log() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }

pick_python() {
    local want='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
    [ "$DRY_RUN" = 1 ] && want='import torch'
    for candidate in ${PYTHON:-python3 .venv/bin/python}; do
        if "$candidate" -c "$want" 2>/dev/null; then echo "$candidate"; return 0; fi
    done
    return 1
}
if ! PYTHON=$(pick_python); then
    if [ "$DRY_RUN" = 1 ]; then
        echo "error: no Python with torch found (set PYTHON)" >&2
    else
        echo "error: no Python whose torch sees a CUDA device; on a machine without a GPU run" \
             "scripts/gpu_check.sh --dry-run" >&2
    fi
    exit 2
fi
export PYTHON

FAILED=0
declare -A STEP_FILES=([device]="device.json device.log" [tests]="pytest.log" [kernels]="kernels.csv kernels.log"
                       [engine]="engine.json engine.log" [http]="http.json http.log serve.log serve"
                       [sanitizer]="sanitizer.log")
write_summary() {
    "$PYTHON" scripts/gpu_check.py summary "$OUT" --command "$COMMAND_LINE" $([ "$DRY_RUN" = 1 ] && echo --dry-run) \
        >/dev/null || log "could not write the summary"
}

# run_step NAME BOX FUNCTION: the function, killed with everything it started after BOX seconds
# (or when the whole check's --budget runs out, whichever comes first); the summary is
# rewritten after every step, so that a check stopped from outside still leaves one.
run_step() {
    local name=$1 box=$2 fn=$3 status start=$SECONDS
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    sed -i "/^$name,/d" "$OUT/steps.csv"
    for file in ${STEP_FILES[$name]:-}; do rm -rf "${OUT:?}/$file"; done
    local left=$((BUDGET - (SECONDS - CHECK_START)))
    if [ "$left" -lt 20 ]; then
        log "step $name: not run, the ${BUDGET}s budget is spent"
        echo "$name,not run (budget spent),0,$box" >>"$OUT/steps.csv"
        FAILED=1
        write_summary
        return 0
    fi
    [ "$box" -gt "$left" ] && box=$left
    log "step $name: starting (time box ${box}s)"
    export -f "$fn"
    # A fresh bash does not inherit pipefail: without it, `cmd | tee log` would report tee's status.
    timeout --kill-after=15 "$box" bash -o pipefail -c "$fn"
    local rc=$?
    case $rc in
        0) status=ok ;;
        3) status=skipped ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    case $status in ok|skipped) ;; *) FAILED=1 ;; esac
    echo "$name,$status,$((SECONDS - start)),$box" >>"$OUT/steps.csv"
    log "step $name: $status in $((SECONDS - start))s"
    write_summary
}

step_install() {
    local missing
    missing=$("$PYTHON" - <<'PY'
import importlib.util
wanted = {"zmq": "pyzmq", "msgspec": "msgspec", "starlette": "starlette", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
          "openai": "openai", "hypothesis": "hypothesis", "msgpack": "msgpack", "safetensors": "safetensors",
          "tokenizers": "tokenizers", "jinja2": "jinja2", "prometheus_client": "prometheus-client",
          "httpx": "httpx", "pytest": "pytest", "transformers": "transformers", "triton": "triton",
          "llguidance": "llguidance", "jsonschema": "jsonschema"}
print(" ".join(pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None))
PY
)
    local pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check) rc=0
    if [ -n "$missing" ]; then
        if [ -d "$WHEELS" ]; then
            echo "installing from $WHEELS: $missing"
            "${pip[@]}" --no-index --find-links "$WHEELS" $missing || rc=1
        else
            echo "installing from the network: $missing (no wheel folder at $WHEELS)"
            "${pip[@]}" $missing || rc=1
        fi
    fi
    # splitinfer itself in any case: the GPU tests and benchmarks need only torch, triton and
    # transformers beside it, so they can run even where a server dependency failed to install.
    if ! "$PYTHON" -c "import splitinfer.engine" 2>/dev/null; then
        echo "installing splitinfer from $REPO"
        "${pip[@]}" --no-deps --no-build-isolation -e "$REPO" || rc=1
    elif [ -z "$missing" ]; then
        return 3
    fi
    return "$rc"
}

step_checkpoint() {
    [ -f "$MODEL/config.json" ] && { echo "using $MODEL"; return 3; }
    local preset=llama-3.2-1b
    [ "$DRY_RUN" = 1 ] && preset=tiny
    echo "building the random $preset checkpoint in $MODEL"
    # Built aside and moved into place whole: a build stopped halfway is never taken for a checkpoint.
    rm -rf "$MODEL.partial"
    "$PYTHON" scripts/make_tiny_model.py "$MODEL.partial" --preset "$preset" && mv "$MODEL.partial" "$MODEL"
}

step_device() {
    "$PYTHON" scripts/gpu_check.py device "$OUT" 2>&1 | tee "$OUT/device.log"
}

step_tests() {
    # The files that hold the gpu-marked tests (no server dependency is imported by them).
    local files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
    [ "$DRY_RUN" = 1 ] && files="tests/test_gpu_engine.py tests/test_gpu_kernels.py"  # the plumbing only
    SPLITINFER_GPU_MODEL="$MODEL" "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs -m gpu $files \
        2>&1 | tee "$OUT/pytest.log"
}

step_kernels() {
    local args=(--quick --no-compile --csv "$OUT/kernels.csv")
    [ "$DRY_RUN" = 1 ] && args+=(--kernel rms_norm --kernel paged_decode)
    "$PYTHON" -m splitinfer.kernels.bench "${args[@]}" 2>&1 | tee "$OUT/kernels.log"
}

step_engine() {
    local args=(--model "$MODEL" --device cuda --dtype bfloat16 --decode-tokens 256 --prefill 128,512,2048
                --concurrency 64 --skip-sequential --repeats 2)
    [ "$DRY_RUN" = 1 ] && args=(--model "$MODEL" --device cpu --dtype float32 --decode-tokens 8 --prefill 16,40
                                --concurrency 1,3 --prompt-tokens 8-32 --output-tokens 4-8 --repeats 1)
    "$PYTHON" scripts/bench_engine.py "${args[@]}" --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.log"
}

step_http() {
    local port engine_args load_args vocab
    port=$("$PYTHON" -c '
import socket
for port in range(18000, 19000, 2):
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", port)); b.bind(("127.0.0.1", port + 1))
        print(port); break
    except OSError:
        pass')
    vocab=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$MODEL/config.json")
    engine_args=(--device cuda --dtype bfloat16 --max-num-seqs 64)
    load_args=(--concurrency 32 --duration 30 --prompt-tokens 32-512 --output-tokens 16-256)
    if [ "$DRY_RUN" = 1 ]; then
        engine_args=(--device cpu --dtype float32 --kv-cache-gb 0.2 --max-num-seqs 8)
        load_args=(--concurrency 4 --duration 2 --prompt-tokens 8-32 --output-tokens 4-16 --warmup 0)
    fi
    rm -rf "$OUT/serve"
    : >"$OUT/serve.log"  # emptied here, not by the background launch, which the wait below could outrun
    scripts/start_distributed.sh --model "$MODEL" --servers 2 --port "$port" --run-dir "$OUT/serve" \
        "${engine_args[@]}" >"$OUT/serve.log" 2>&1 &
    SERVE_PID=$!  # not local: the EXIT trap runs after the function has returned
    trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID' EXIT
    until grep -q "splitinfer is up" "$OUT/serve.log"; do
        kill -0 "$SERVE_PID" 2>/dev/null || { echo "start_distributed.sh exited:"; tail -n 20 "$OUT/serve.log"; return 1; }
        sleep 0.5
    done
    echo "engine and 2 servers up on ports $port, $((port + 1))"
    "$PYTHON" scripts/bench_serving.py --base-url "http://127.0.0.1:$port/v1" \
        --base-url "http://127.0.0.1:$((port + 1))/v1" "${load_args[@]}" --vocab-limit "$vocab" --no-progress \
        --json "$OUT/http.json" 2>&1 | tee "$OUT/http.log"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    "$PYTHON" -c '
import json, sys
failed = sum(level["failed"] for level in json.load(open(sys.argv[1])))
print(f"{failed} failed requests")
sys.exit(1 if failed else 0)' "$OUT/http.json"
}

step_tp() {
    local args=(--model "$MODEL" --device cuda --dtype bfloat16 --sizes 1,2 --requests 32 --output-tokens 64)
    if [ "$DRY_RUN" = 1 ]; then
        args=(--model "$MODEL" --device cpu --dtype float32 --sizes 1,2 --requests 2 --output-tokens 4 --kv-cache-gb 0.05)
    elif [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
        echo "skipped: tensor parallelism needs 2 GPUs; this machine shows fewer"
        return 3
    fi
    "$PYTHON" scripts/bench_tp.py "${args[@]}" 2>&1 | tee "$OUT/tp.log"
    return "${PIPESTATUS[0]}"
}

step_sanitizer() {
    if [ "$DRY_RUN" = 1 ]; then echo "skipped on a dry run"; return 3; fi
    if ! command -v compute-sanitizer >/dev/null; then echo "skipped: compute-sanitizer is not installed"; return 3; fi
    # Without torch's caching allocator, so that an access past a tensor is past an allocation.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels_triton.py \
        -k "bf16 and (paged_decode or paged_prefill)" 2>&1 | tee "$OUT/sanitizer.log"
}

export OUT REPO DRY_RUN WHEELS
if [ -z "$MODEL" ]; then
    MODEL=$REPO/.cache/llama-3.2-1b-random
    [ "$DRY_RUN" = 1 ] && MODEL=$REPO/.cache/gpu-check-tiny
fi
export MODEL

if [ "$DRY_RUN" = 1 ]; then
    log "DRY RUN on CPU at toy sizes: checks the plumbing of every step; no GPU numbers are taken"
fi
log "python: $PYTHON; writing to $OUT"
# Boxes are what a step may take before it is stopped, and --budget caps them all together. The
# first run on a machine also builds the checkpoint (~30 s) and compiles every kernel variant
# (Triton's cache, TRITON_CACHE_DIR, makes a second run quicker).
CHECK_START=$SECONDS
run_step install 120 step_install
run_step checkpoint 150 step_checkpoint
run_step device 45 step_device
run_step tests 300 step_tests
run_step kernels 90 step_kernels
run_step engine 150 step_engine
run_step http 100 step_http
run_step tp 120 step_tp
run_step sanitizer 150 step_sanitizer

log "summary: $OUT/summary.md"
if [ "$FAILED" = 1 ]; then
    log "FAILED: $(grep -v ',ok,\|,skipped,' "$OUT/steps.csv" | tail -n +2 | cut -d, -f1 | tr '\n' ' ')"
    exit 1
fi
log "every step passed"
