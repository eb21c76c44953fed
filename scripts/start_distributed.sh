#!/usr/bin/env bash
# Start splitinfer engines and N OpenAI-compatible HTTP servers in front of all of them; stop
# them all on Ctrl-C or SIGTERM. One engine from flags, or several from a TOML file
# (--config). Run with --help for the flags; scripts/launch.py does the work.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        # Help needs no environment: the engine's flags are listed if splitinfer is installed.
        python=python3
        [ -x .venv/bin/python ] && python=.venv/bin/python
        exec "$python" scripts/launch.py --help
    fi
    [ "$arg" = "--" ] && break
done

. scripts/env.sh
splitinfer_env ""
exec "$PYTHON" scripts/launch.py "$@"
