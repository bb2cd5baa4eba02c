#!/usr/bin/env bash
# The test command: sets everything up from scratch, then runs the suite (tiny models only).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k hf`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The proxy page test drives a real headless Chromium (Debian's package); install it where we can.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser test will say so" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": that is a failure here, never a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
