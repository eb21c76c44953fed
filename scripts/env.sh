# Sourced by the repository's commands (test.sh, start_distributed.sh): makes sure a Python
# with splitinfer and its dependencies is ready, creating .venv on a fresh clone, and sets
# PYTHON to it. $1: the pip extra to install besides the package ("test" or empty).
#
# torch==2.13.0 resolves to a CPU wheel from this environment's local cache; an unpinned
# torch would pull a multi-GB CUDA build. Override with SPLITINFER_TORCH="torch==X".
splitinfer_env() {
    local extra="${1:-}"
    local check="import splitinfer.protocol, torch, zmq, msgspec, safetensors, tokenizers, jinja2, starlette, uvicorn, sse_starlette, prometheus_client, llguidance"
    [ "$extra" = "test" ] && check="$check, pytest, xdist, ruff, transformers, openai, httpx, hypothesis, msgpack, jsonschema, selenium"
    local torch_spec="${SPLITINFER_TORCH:-torch==2.13.0}"
    PYTHON="${PYTHON:-python3}"
    ready() { "$1" -c "$check" 2>/dev/null; }
    if ready "$PYTHON"; then return 0; fi
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv" >&2
        "$PYTHON" -m venv .venv
    fi
    PYTHON=.venv/bin/python
    if ! ready "$PYTHON"; then
        echo "installing $torch_spec and splitinfer${extra:+[$extra]} into .venv" >&2
        "$PYTHON" -m pip install --quiet --upgrade pip
        "$PYTHON" -m pip install --quiet "$torch_spec"
        "$PYTHON" -m pip install --quiet -e ".${extra:+[$extra]}"
    fi
}
