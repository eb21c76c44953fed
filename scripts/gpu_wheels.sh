#!/usr/bin/env bash
# On a machine with network: download the cp312 manylinux x86_64 wheels of everything splitinfer
# and its tests need beyond what a GPU machine's image has (torch, triton, transformers,
# safetensors, tokenizers, msgpack, jinja2, prometheus-client, httpx, pytest), so that
# scripts/gpu_check.sh can install them there without network. Run with --help for the flags.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'USAGE'
Usage: scripts/gpu_wheels.sh [DIR]

Downloads into DIR (default: $GPU_WHEELS or gpu-wheels/) the wheels of pyzmq, msgspec,
starlette, uvicorn, sse-starlette, openai, hypothesis, setuptools, llguidance and jsonschema, with every
dependency they need,
for CPython 3.12 on manylinux x86_64 (whatever this machine runs). Copy DIR beside the
repository on the GPU machine (or pass --wheels DIR to gpu_check.sh), which installs from it
with `pip install --no-index --find-links DIR` whatever is missing there.
Environment: PYTHON (the pip to use; default: python3), GPU_PYTHON_VERSION (default: 3.12).
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

DIR=${1:-${GPU_WHEELS:-gpu-wheels}}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && ! "$PYTHON" -m pip --version >/dev/null 2>&1 && PYTHON=.venv/bin/python
VERSION=${GPU_PYTHON_VERSION:-3.12}
PACKAGES=(pyzmq msgspec starlette uvicorn sse-starlette openai hypothesis setuptools "llguidance>=1.9,<2" jsonschema)
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$DIR"
echo "downloading wheels of ${PACKAGES[*]} and their dependencies for CPython $VERSION into $DIR"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$VERSION" \
    --implementation cp "${platforms[@]}" -d "$DIR" "${PACKAGES[@]}"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR:"
ls "$DIR"
