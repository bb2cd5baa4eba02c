#!/usr/bin/env python
"""Evaluate CoSteer and its baselines; see docs/eval.md and `--help`.

    python benchmarks/eval.py --quick                  # tiny models, seconds (CI)
    python benchmarks/eval.py                          # the real Qwen pair (default run)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from costeer_processor.eval.run import main  # noqa: E402

if __name__ == "__main__":
    main()
