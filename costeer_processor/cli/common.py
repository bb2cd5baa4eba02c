"""What every ``costeer`` command shares: the one-line user error, the runs it can make, and small helpers."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROG = "costeer"


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Mode:
    """One run ``--mode`` names: which model writes, and what it reads (see :mod:`costeer_processor.pipeline`)."""

    title: str
    role: str  # "large" or "small"
    with_context: bool = False  # the context in that model's own prompt
    steered: bool = False  # CoSteer: the small model steers the large one

    @property
    def uses_context(self) -> bool:
        return self.with_context or self.steered

    @property
    def needs_small(self) -> bool:
        return self.role == "small" or self.steered


MODES = {
    "costeer": Mode("CoSteer (large model steered by the small one)", "large", steered=True),
    "large": Mode("large model alone (no context)", "large"),
    "small-context": Mode("small model with the context", "small", with_context=True),
    "large-context": Mode("large model with the context (breaks privacy: upper bound)", "large", with_context=True),
    "small": Mode("small model alone (no context)", "small"),
}
MODE_TITLES = {name: mode.title for name, mode in MODES.items()}


def dtype_label(args) -> str:
    """The weights dtype, with why it was chosen when the user left ``--dtype auto``."""
    why = getattr(args, "dtype_why", None)
    return args.dtype if why is None else f"{args.dtype}, chosen because {why}"


def say(args, message: str) -> None:
    """A progress line on stderr (stdout carries only answers); silent with ``-q``."""
    if not getattr(args, "quiet", False):
        print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def config_from_args(args):
    """The :class:`~costeer_processor.core.CoSteerConfig` of the flags, with the serving limit on the gain."""
    from ..core import CoSteerConfig

    try:
        config = CoSteerConfig(T=args.T, alpha=args.alpha, beta=args.beta, lam=args.lam, eta=args.eta,
                               strength=args.strength)
        config.served_gain("the CoSteer flags")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


def variants_from_args(args):
    from ..core import Variants

    return Variants(args.gate_threshold, args.gate_patience, args.eos_guard)


def read_context(args) -> Optional[str]:
    """``--context`` or the text of ``--context-file`` (refused when empty or unreadable)."""
    if args.context is not None:
        if not args.context.strip():
            raise UsageError("--context is empty; give the personal context text")
        return args.context
    if args.context_file is not None:
        try:
            text = args.context_file.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot read --context-file {args.context_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--context-file {args.context_file} is not UTF-8 text") from None
        if not text.strip():
            raise UsageError(f"--context-file {args.context_file} is empty; put the personal context in it")
        return text.strip()
    return None


def read_rows(path: Path, default_context: Optional[str], needs_context: bool) -> list[dict]:
    """The rows of a JSONL ``--input`` (fields prompt, context), each kept whole for the output."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read --input {path}: {e.strerror or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{n}: each line must be a JSON object with fields prompt, context")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{path}:{n}: missing or empty 'prompt'")
        context = row.get("context", default_context)
        if needs_context and (not isinstance(context, str) or not context.strip()):
            raise UsageError(f"{path}:{n}: missing or empty 'context' (or give --context/--context-file for all rows)")
        rows.append({"prompt": prompt, "context": context, "fields": row})
    if not rows:
        raise UsageError(f"--input {path} holds no rows")
    return rows


def device(args) -> str:
    """``--device``: ``auto`` is CUDA when torch sees a GPU, else the CPU."""
    import torch

    name = getattr(args, "device", "auto") or "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    return name


def quiet_transformers() -> None:
    """No transformers warnings or progress bars between the answers."""
    import warnings

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


def resolve(args, name: str) -> Path:
    from ..models import resolve_model

    return resolve_model(name, args.dtype, progress=not getattr(args, "quiet", False))


def note_tokenizers(args, large_tokenizer, small_tokenizer) -> None:
    """Says when the two models tokenize differently (CoSteer then steers on the tokens they share)."""
    from ..vocab import VocabularyMap

    vmap = VocabularyMap.if_needed(large_tokenizer, small_tokenizer)
    if vmap is not None:
        say(args, f"different tokenizers ({len(large_tokenizer)} vs {len(small_tokenizer)} tokens): CoSteer "
                  f"steers on the {vmap.size} tokens both vocabularies share")


def vllm_processor() -> str:
    """The ``module:Class`` of the CoSteer processor for the model runner vLLM will use."""
    from ..vllm import processor_fqcn  # lazily: importing vLLM is slow and optional

    return processor_fqcn()
