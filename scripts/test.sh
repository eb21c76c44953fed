#!/usr/bin/env bash
# The one test command (README, CI): on a fresh clone it creates .venv, installs torch
# (CPU wheel) and the project with its test extra, then runs pytest with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
splitinfer_env test
exec "$PYTHON" -m pytest "$@"
