#!/usr/bin/env bash
# The one test command (README, CI): on a fresh clone it creates .venv, installs torch
# (CPU wheel) and the project with its test extra, then runs pytest with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch==2.13.0 resolves to a CPU wheel from this environment's local cache; an unpinned
# torch would pull a multi-GB CUDA build. Override with SPLITINFER_TORCH="torch==X".
TORCH_SPEC="${SPLITINFER_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

ready() { "$1" -c "import splitinfer.engine, torch, pytest, transformers, openai, httpx, hypothesis" 2>/dev/null; }

if ! ready "$PYTHON"; then
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv" >&2
        "$PYTHON" -m venv .venv
    fi
    PYTHON=.venv/bin/python
    if ! ready "$PYTHON"; then
        "$PYTHON" -m pip install --quiet --upgrade pip
        "$PYTHON" -m pip install --quiet "$TORCH_SPEC"
        "$PYTHON" -m pip install --quiet -e ".[test]"
    fi
fi
exec "$PYTHON" -m pytest "$@"
