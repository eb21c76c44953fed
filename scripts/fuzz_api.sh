#!/usr/bin/env bash
# The API fuzz tests (tests/test_fuzz_api.py) at length, with fresh randomness each run:
# hostile OpenAI requests against a real engine and server, and hostile sampling values
# straight into the engine's socket. CI runs a fixed 300 examples of each.
#
#   scripts/fuzz_api.sh            # 5000 examples per test (about 5 minutes on 2 cores)
#   scripts/fuzz_api.sh 20000      # more
#
# A failure prints the shrunk request that caused it; the server and engine logs are kept
# under pytest's temporary directory (the path is in the output).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
splitinfer_env test
export SPLITINFER_FUZZ_EXAMPLES="${1:-5000}" SPLITINFER_FUZZ_RANDOM=1
exec "$PYTHON" -m pytest tests/test_fuzz_api.py -p no:cacheprovider -s -q "${@:2}"
