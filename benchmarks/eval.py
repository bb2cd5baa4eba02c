#!/usr/bin/env python
"""Evaluate CoSteer and its baselines; see docs/eval.md and `--help`.

    python benchmarks/eval.py --quick                  # tiny models, seconds (CI)
    python benchmarks/eval.py                          # the real Qwen pair (default run)

Results go to benchmarks/results/ next to this script unless --out says otherwise.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, when the package is not installed

from costeer_processor.eval.run import main  # noqa: E402

if __name__ == "__main__":
    main(default_out=HERE / "results")
