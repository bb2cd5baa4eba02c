"""The ``costeer`` command: generate, demo, serve, models.

    costeer demo                                   # the default real pair, 3 personas, 4 systems
    costeer generate --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \\
        --context "I am vegan and love spicy food." --prompt "Suggest a dinner."
    costeer generate --large L --small S --input rows.jsonl --output out.jsonl
    costeer serve --large L --small S --port 8000 [--dry-run]
    costeer models [list | install NAME]

One module per command (:mod:`.generate`, :mod:`.demo`, :mod:`.serve`, :mod:`.models`), the
arguments in :mod:`.parser`. Every user error is one line on stderr (``costeer: error: ...``)
with exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from ..loading import CoSteerModelError, fast_dtype
from ..prompts import ContextTooLongError
from .common import MODE_TITLES, MODES, PROG, UsageError
from .parser import build_parser

__all__ = ["main", "build_parser", "UsageError", "MODES", "MODE_TITLES"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``costeer ARGV``; returns the exit code (0 ok, 2 a user error, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "dtype", None) == "auto":  # the commands print it with the models (dtype_label)
            device = getattr(args, "device", None)
            args.dtype, args.dtype_why = fast_dtype(None if device in (None, "auto") else device)
        command = importlib.import_module(f".{args.command}", __name__)
        return int(command.run(args) or 0)
    except (UsageError, CoSteerModelError, ContextTooLongError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # always one line
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2
