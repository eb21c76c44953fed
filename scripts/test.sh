#!/usr/bin/env bash
# The one test command (README, CI): on a fresh clone it creates .venv, installs torch
# (CPU wheel) and the project with its test extra, then runs pytest with any arguments,
# on two worker processes (pytest-xdist; a file's tests stay on one worker, so its module
# fixtures are built once). SPLITINFER_TEST_WORKERS=0 runs them in this process. First
# the lint and the formatter's check (ruff, configured in pyproject.toml), so the tree stays clean.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
splitinfer_env test
"$PYTHON" -m ruff check --quiet .
"$PYTHON" -m ruff format --check --quiet .
exec "$PYTHON" -m pytest -n "${SPLITINFER_TEST_WORKERS:-2}" --dist loadfile "$@"
