#!/usr/bin/env bash
# The test command: sets everything up from scratch, then runs the suite (tiny models only).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k hf`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": that is a failure here, never a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
