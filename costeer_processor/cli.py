"""The ``costeer`` command: generate, demo, serve, models.

    costeer demo                                   # the default real pair, 3 personas, 4 systems
    costeer generate --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \\
        --context "I am vegan and love spicy food." --prompt "Suggest a dinner."
    costeer generate --large L --small S --input rows.jsonl --output out.jsonl
    costeer serve --large L --small S --port 8000 [--dry-run]
    costeer models [list | install NAME]

Every user error is one line on stderr (``costeer: error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .models import (
    DEFAULT_LARGE,
    DEFAULT_SMALL,
    DTYPES,
    PRESETS,
    CoSteerModelError,
    check_same_tokenizer,
    describe_presets,
    is_installed,
    preset_model_dir,
    resolve_model,
)

PROG = "costeer"
VLLM_PROCESSOR = "costeer_processor.vllm:CoSteerLogitsProcessor"
MODES = ("costeer", "large", "small-context", "large-context", "small")
MODE_TITLES = {
    "large": "large model alone (no context)",
    "small-context": "small model with the context",
    "large-context": "large model with the context (breaks privacy: upper bound)",
    "costeer": "CoSteer (large model steered by the small one)",
    "small": "small model alone (no context)",
}


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


# --------------------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value
    parse.__name__ = name
    return parse


def _float(name: str, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {value:g}")
        return value
    parse.__name__ = name
    return parse


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    help_model = "a preset (see 'costeer models list'), a local transformers folder or a hub id"
    p.add_argument("--large", required=required, default=None if required else DEFAULT_LARGE,
                   help=f"the large (cloud) model: {help_model}" + ("" if required else f" (default {DEFAULT_LARGE})"))
    p.add_argument("--small", required=required, default=None if required else DEFAULT_SMALL,
                   help="the small (on-device) model holding the context" + ("" if required else f" (default {DEFAULT_SMALL})"))
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default bfloat16)")


def _add_steering_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CoSteer hyper-parameters (official defaults)")
    g.add_argument("--T", type=_positive_int("--T"), default=20, help="FTRL inner steps per token (default 20)")
    g.add_argument("--alpha", type=_float("--alpha"), default=2.0, help="default 2")
    g.add_argument("--beta", type=_float("--beta"), default=1.0, help="default 1")
    g.add_argument("--lam", type=_float("--lam", 0.0, low_open=True), default=2.0, help="default 2 (> 0)")
    g.add_argument("--eta", type=_float("--eta", 0.0, low_open=True), default=10.0, help="default 10 (> 0)")
    g.add_argument("--strength", type=_float("--strength"), default=None,
                   help="the closed-form gain g itself, overriding the five above (1 = proxy-tuning, 0 = off)")
    g.add_argument("--eos-guard", type=_float("--eos-guard", 0.0, 1.0, low_open=True), default=None,
                   help="stop a row when the large model's EOS probability exceeds this (e.g. 0.5)")
    g.add_argument("--gate-threshold", type=_float("--gate-threshold", 0.0, 1.0, low_open=True, high_open=True),
                   default=None, help="AdaCoSteer gating: stop steering a row after --gate-patience steps in a row "
                                      "with 1 - max p < this (the release uses 0.1; off by default)")
    g.add_argument("--gate-patience", type=_positive_int("--gate-patience"), default=3, help="default 3")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=256)
    d.add_argument("--temperature", type=_float("--temperature", 0.0), default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=_float("--top-p", 0.0, 1.0, low_open=True), default=1.0)
    d.add_argument("--context-position", choices=("before", "after"), default="before",
                   help="where the small model sees the context in the user turn (default before)")
    d.add_argument("--device", default="auto", help="hf backend: cpu, cuda, cuda:1 ... (default: cuda if available)")
    d.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CoSteer: a small local model that holds your private context "
                                            "steers a large model's decoding.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="steered generation for one prompt or a JSONL file",
                       description="Prints the steered answer (streamed), or writes a JSONL file in batch mode.")
    g.add_argument("--large", help="the large (cloud) model: a preset (see 'costeer models list'), a local "
                                   "transformers folder or a hub id (with --server: optional, only its tokenizer is read, for a "
                                   "served model of another family than the small one)")
    g.add_argument("--small", help="the small (on-device) model holding the context (same kinds of names)")
    g.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default bfloat16)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--context", help="the personal context (stays with the small model)")
    src.add_argument("--context-file", type=Path, help="read the personal context from this file")
    g.add_argument("--prompt", help="the public prompt (the large model sees only this)")
    g.add_argument("--input", type=Path, help="JSONL with fields prompt, context (batch mode)")
    g.add_argument("--output", type=Path, help="JSONL to write in batch mode (input fields + output)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    g.add_argument("--mode", choices=MODES, default="costeer",
                   help="what to run: costeer (default) or a baseline: " + ", ".join(MODES[1:]))
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (transformers generate) or vllm")
    g.add_argument("--server", metavar="URL",
                   help="split mode: URL of a plain vLLM server holding the large model (see 'costeer serve "
                        "--split'); the small model and the context stay on this machine")
    g.add_argument("--top-logprobs", type=_positive_int("--top-logprobs"), default=None,
                   help="split mode: steer over the server's top-K tokens only (default: the full vocabulary, "
                        "which needs the server's --max-logprobs -1)")
    g.add_argument("--lookahead", type=_positive_int("--lookahead"), default=4,
                   help="split mode: tokens the server proposes per round trip (default 4)")
    g.add_argument("--retries", type=int, default=8,
                   help="split mode: retries of a failed request to the server (default 8, with back-off)")
    g.add_argument("--max-model-len", type=_positive_int("--max-model-len"), default=4096, help="vllm backend only")
    g.add_argument("--enforce-eager", action="store_true",
                   help="vllm backend: skip graph compilation (starts faster, decodes slower)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or timing lines")
    _add_steering_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="side-by-side demo of CoSteer and its baselines on 3 personas",
                       description="Installs the default real pair if needed, then shows the large model alone, "
                                   "the small model with the context, the large model with the context and "
                                   "CoSteer for 3 built-in personas, with tokens/s.")
    _add_model_args(d, required=False)
    d.add_argument("--quick", action="store_true", help="tiny random-weight models (seconds; output is gibberish)")
    _add_steering_args(d)
    d.set_defaults(func=cmd_demo, max_new_tokens=80)

    s = sub.add_parser("serve", help="start the OpenAI-compatible vLLM server with CoSteer",
                       description="Starts 'python -m vllm.entrypoints.openai.api_server' on the large model with "
                                   "the CoSteer logits processor and the small model. Requests pass the context "
                                   'as extra_body={"vllm_xargs": {"costeer_context": "..."}}.')
    s.add_argument("--large", required=True, help="the large model served: a preset, a local folder or a hub id")
    s.add_argument("--small", help="the small model the CoSteer processor loads in the server (not with --split)")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default bfloat16)")
    s.add_argument("--split", action="store_true",
                   help="split mode: serve the large model alone (plain vLLM, full log-probs, prefix caching); "
                        "clients run 'costeer generate --server URL' with the small model and context locally")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_positive_int("--port"), default=8000)
    s.add_argument("--max-model-len", type=_positive_int("--max-model-len"), default=4096)
    s.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    s.add_argument("extra", nargs=argparse.REMAINDER, help="after '--': more arguments for the vLLM server")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list or pre-install the model presets")
    m.add_argument("action", nargs="?", choices=("list", "install", "path"), default="list")
    m.add_argument("names", nargs="*", help="preset names for install/path ('all' for every preset)")
    m.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    m.set_defaults(func=cmd_models)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as e:
        return _fail(str(e))
    except CoSteerModelError as e:
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


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _config(args):
    from .core import CoSteerConfig

    try:
        return CoSteerConfig(T=args.T, alpha=args.alpha, beta=args.beta, lam=args.lam, eta=args.eta,
                             strength=args.strength)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _read_context(args) -> Optional[str]:
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


def _read_rows(path: Path, default_context: Optional[str], needs_context: bool) -> list[dict]:
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
        rows.append({"_prompt": prompt, "_context": context, "fields": row})
    if not rows:
        raise UsageError(f"--input {path} holds no rows")
    return rows


# --------------------------------------------------------------------------- the HF engine
@dataclass
class RunResult:
    texts: list[str]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class HFEngine:
    """A loaded pair with everything needed to run CoSteer and its baselines through ``generate``."""

    def __init__(self, large_dir: Path, small_dir: Path, dtype: str, context_position: str = "before",
                 load_large: bool = True, load_small: bool = True, device: str = "cpu"):
        from .models import load_tokenizer
        from .small_model import ContextSplicer, SmallModelRunner

        self.dtype = dtype
        self.device = device
        self.large_dir, self.small_dir = large_dir, small_dir
        self.small_model = self._load(small_dir) if load_small else None
        self.small_tok = load_tokenizer(small_dir)
        self.runner = SmallModelRunner(self.small_model, self.small_tok, context_position=context_position) \
            if load_small else None
        self.small_splicer = ContextSplicer(self.small_tok, context_position)
        self.large_tok = load_tokenizer(large_dir)
        self.large_splicer = ContextSplicer(self.large_tok, context_position)
        self.large_model = self._load(large_dir) if load_large else None
        # Different families: steer on the tokens both vocabularies share (the release's "map" variant).
        from .vocab import VocabularyMap

        self.vocab_map = VocabularyMap.if_needed(self.large_tok, self.small_tok)

    def _load(self, path: Path):
        from .models import load_model

        return load_model(path, self.dtype, device=self.device)

    def validate(self, prompts: Sequence[str], contexts: Sequence[Optional[str]]) -> None:
        """Every context fits the small model's window (before the large model is loaded)."""
        for i, (p, c) in enumerate(zip(prompts, contexts)):
            if c is None:
                continue
            try:
                ids = self.small_tok(self.small_splicer.splice(self.small_splicer.render(p), c),
                                     add_special_tokens=False)["input_ids"]
            except Exception as e:  # a broken template, ...
                raise UsageError(f"cannot build the small model's prompt for row {i + 1}: {e}") from None
            window = int(getattr(self.small_config, "max_position_embeddings", 0) or 1 << 30)
            if len(ids) >= window:
                raise CoSteerModelError(
                    f"context + prompt of row {i + 1} is {len(ids)} tokens but the small model's window is "
                    f"{window} tokens; shorten the context") from None

    @property
    def small_config(self):
        if self.small_model is not None:
            return self.small_model.config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.small_dir))

    def load_large(self) -> None:
        if self.large_model is None:
            self.large_model = self._load(self.large_dir)

    def run(self, mode: str, prompts: Sequence[str], contexts: Sequence[Optional[str]], config, *,
            max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, eos_guard: Optional[float] = None,
            gate_threshold: Optional[float] = None, gate_patience: int = 3,
            stream: bool = False, seed: int = 0) -> RunResult:
        import torch
        from transformers import LogitsProcessorList, TextStreamer

        from .hf import CoSteerLogitsProcessor
        from .small_model import ContextTooLongError

        if mode in ("large", "costeer"):
            model, tok, texts = self.large_model, self.large_tok, [self.large_splicer.render(p) for p in prompts]
        elif mode == "large-context":
            model, tok = self.large_model, self.large_tok
            texts = [self.large_splicer.splice(self.large_splicer.render(p), c) for p, c in zip(prompts, contexts)]
        elif mode == "small-context":
            model, tok = self.small_model, self.small_tok
            texts = [self.small_splicer.splice(self.small_splicer.render(p), c) for p, c in zip(prompts, contexts)]
        elif mode == "small":
            model, tok, texts = self.small_model, self.small_tok, [self.small_splicer.render(p) for p in prompts]
        else:
            raise UsageError(f"unknown mode {mode!r}")
        processors = LogitsProcessorList()
        if mode == "costeer":
            try:
                processors.append(CoSteerLogitsProcessor(self.runner, list(prompts), list(contexts), config,
                                                         eos_guard=eos_guard, vocab_map=self.vocab_map,
                                                         gate_threshold=gate_threshold, gate_patience=gate_patience))
            except ContextTooLongError as e:
                raise CoSteerModelError(str(e)) from None
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(
            model.device)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        kwargs = dict(max_new_tokens=max_new_tokens, logits_processor=processors, pad_token_id=tok.pad_token_id,
                      eos_token_id=eos)
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stream and len(texts) == 1:
            kwargs["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        _sync(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        _sync(model.device)
        seconds = time.perf_counter() - start
        gen = out[:, enc["input_ids"].shape[1]:]
        eos_ids = set([eos] if isinstance(eos, int) else list(eos or [])) | {tok.pad_token_id}
        tokens, results = 0, []
        for row in gen.tolist():
            n = len(row)
            for i, t in enumerate(row):
                if t in eos_ids:
                    n = i + 1
                    break
            tokens += n
            results.append(tok.decode(row[:n], skip_special_tokens=True).strip())
        return RunResult(results, tokens, seconds)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _device(args) -> str:
    import torch

    device = getattr(args, "device", "auto") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    return device


def _no_transformers_noise() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)


# --------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    missing = [flag for flag, value in (("--large", args.large), ("--small", args.small))
               if not value and not (flag == "--large" and args.server)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see 'costeer generate --help')")
    config = _config(args)
    context = _read_context(args)
    needs_context = args.mode in ("costeer", "large-context", "small-context")
    if args.input is None:
        if args.output is not None:
            raise UsageError("--output needs --input (batch mode); for one prompt the answer goes to stdout")
        if not args.prompt or not args.prompt.strip():
            raise UsageError("give --prompt TEXT (or --input FILE.jsonl for batch mode)")
        if needs_context and context is None:
            raise UsageError("give the personal context with --context TEXT or --context-file FILE")
        rows = [{"_prompt": args.prompt, "_context": context, "fields": {}}]
    else:
        if args.prompt:
            raise UsageError("--prompt and --input cannot be used together")
        if args.output is None:
            raise UsageError("--input needs --output FILE.jsonl")
        rows = _read_rows(args.input, context, needs_context)
    if args.server:
        return _generate_split(args, rows, config)
    if args.backend == "vllm":
        return _generate_vllm(args, rows, config)
    return _generate_hf(args, rows, config)


def _resolve_pair(args, need_small: bool = True) -> tuple[Path, Path]:
    progress = not getattr(args, "quiet", False)
    large_dir = resolve_model(args.large, args.dtype, progress=progress)
    small_dir = resolve_model(args.small, args.dtype, progress=progress)
    _note_tokenizers(args, large_dir, small_dir)
    return large_dir, small_dir


def _note_tokenizers(args, large_dir: Path, small_dir: Path) -> None:
    """Says when the two models tokenize differently (CoSteer then steers on the shared tokens)."""
    try:
        check_same_tokenizer(large_dir, small_dir)
    except CoSteerModelError:
        from .models import load_tokenizer
        from .vocab import VocabularyMap

        large_tok, small_tok = load_tokenizer(large_dir), load_tokenizer(small_dir)
        vmap = VocabularyMap.for_pair(large_tok, small_tok)
        _say(args, f"different tokenizers ({len(large_tok)} vs {len(small_tok)} tokens): CoSteer steers on the "
                   f"{vmap.size} tokens both vocabularies share")


def _generate_hf(args, rows: list[dict], config) -> int:
    from tqdm.auto import tqdm

    _no_transformers_noise()
    large_dir, small_dir = _resolve_pair(args)
    t0 = time.perf_counter()
    needs_small = args.mode in ("costeer", "small", "small-context")
    engine = HFEngine(large_dir, small_dir, args.dtype, args.context_position, load_large=False,
                      load_small=needs_small, device=_device(args))
    prompts = [r["_prompt"] for r in rows]
    contexts = [r["_context"] for r in rows]
    if args.mode in ("costeer", "small-context", "large-context"):
        engine.validate(prompts, contexts)
    if args.mode in ("costeer", "large", "large-context"):
        engine.load_large()
    _say(args, f"models loaded in {time.perf_counter() - t0:.1f} s (large {large_dir}, small {small_dir}, {args.dtype})")
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  eos_guard=args.eos_guard, gate_threshold=args.gate_threshold, gate_patience=args.gate_patience,
                  seed=args.seed)

    if args.input is None:
        res = engine.run(args.mode, prompts, contexts, config, stream=True, **common)
        sys.stdout.write("\n")
        sys.stdout.flush()
        _say(args, f"{res.tokens} tokens in {res.seconds:.1f} s ({res.tokens_per_s:.2f} tok/s, {args.mode}, hf backend)")
        return 0

    args.output.parent.mkdir(parents=True, exist_ok=True)
    total_tokens, total_s = 0, 0.0
    with open(args.output, "w", encoding="utf-8") as out, \
            tqdm(total=len(rows), desc="generate", unit="row", disable=args.quiet, file=sys.stderr) as bar:
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i:i + args.batch_size]
            res = engine.run(args.mode, [r["_prompt"] for r in chunk], [r["_context"] for r in chunk], config,
                             **common)
            for r, text in zip(chunk, res.texts):
                out.write(json.dumps({**r["fields"], "output": text}, ensure_ascii=False) + "\n")
            out.flush()
            total_tokens += res.tokens
            total_s += res.seconds
            bar.update(len(chunk))
            bar.set_postfix_str(f"{total_tokens / max(total_s, 1e-9):.1f} tok/s")
    _say(args, f"wrote {len(rows)} rows to {args.output}: {total_tokens} tokens in {total_s:.1f} s "
               f"({total_tokens / max(total_s, 1e-9):.2f} tok/s)")
    return 0


def _cpu_vllm_env(quiet: bool = False) -> None:
    from .vllm_server import server_env

    for k, v in server_env().items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the answer
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _generate_vllm(args, rows: list[dict], config) -> int:
    from .core import costeer_gain
    from .models import load_tokenizer
    from .small_model import ContextSplicer

    _no_transformers_noise()
    large_dir, small_dir = _resolve_pair(args)
    _cpu_vllm_env(args.quiet)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UsageError("--backend vllm needs vLLM: pip install 'costeer_processor[vllm]'") from None
    tok = load_tokenizer(large_dir)
    splicer = ContextSplicer(tok, args.context_position)
    small_splicer = ContextSplicer(load_tokenizer(small_dir), args.context_position)
    gain = costeer_gain(config)
    texts, params = [], []
    for r in rows:
        extra = None
        if args.mode == "costeer":
            extra = {"costeer_context": r["_context"], "costeer_strength": gain}
            if args.eos_guard is not None:
                extra["costeer_eos_guard"] = args.eos_guard
            if args.gate_threshold is not None:
                extra.update(costeer_gate_threshold=args.gate_threshold, costeer_gate_patience=args.gate_patience)
        if args.mode in ("large", "costeer"):
            text = splicer.render(r["_prompt"])
        elif args.mode == "large-context":
            text = splicer.splice(splicer.render(r["_prompt"]), r["_context"])
        else:
            raise UsageError(f"--mode {args.mode} runs the small model alone: use --backend hf")
        texts.append(text)
        params.append(SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed if args.temperature > 0 else None,
                                     extra_args=extra))
    if args.mode == "costeer":
        for r in rows:  # the same window check the hf backend makes, before the engine starts
            n = len(small_splicer.tokenizer(small_splicer.splice(small_splicer.render(r["_prompt"]), r["_context"]),
                                            add_special_tokens=False)["input_ids"])
            if n >= args.max_model_len:
                raise CoSteerModelError(f"context + prompt is {n} tokens, over --max-model-len {args.max_model_len}; "
                                        "shorten the context")
    kwargs = dict(model=str(large_dir), dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                  enforce_eager=args.enforce_eager)
    if args.mode == "costeer":
        costeer_cfg = {"small_model": str(small_dir), "dtype": args.dtype, "context_position": args.context_position}
        kwargs.update(logits_processors=[VLLM_PROCESSOR], additional_config={"costeer": costeer_cfg})
    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except ImportError as e:
        raise UsageError(f"the vLLM CoSteer processor is not available ({e})") from None
    _say(args, f"vLLM engine ready in {time.perf_counter() - t0:.1f} s")
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=not args.quiet)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    answers = [o.outputs[0].text.strip() for o in outputs]
    if args.input is None:
        print(answers[0], flush=True)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as out:
            for r, text in zip(rows, answers):
                out.write(json.dumps({**r["fields"], "output": text}, ensure_ascii=False) + "\n")
    _say(args, f"{tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.2f} tok/s, {args.mode}, vllm backend)")
    return 0


def _generate_split(args, rows: list[dict], config) -> int:
    """Split mode: the large model is a plain vLLM server at --server; the context stays here."""
    try:
        from . import split
    except ImportError:
        split = None
    if split is None or not hasattr(split, "SplitCoSteerClient"):
        raise UsageError("split mode (--server) is not available in this version of costeer_processor")
    if args.mode != "costeer":
        raise UsageError("--server runs CoSteer only; drop --mode")
    if args.backend != "hf":
        raise UsageError("--server and --backend vllm cannot be combined (the server is the vLLM side)")
    _no_transformers_noise()
    small_dir = resolve_model(args.small, args.dtype, progress=not args.quiet)
    t0 = time.perf_counter()
    runner = split.load_runner(small_dir, dtype=args.dtype, context_position=args.context_position)
    large_tokenizer = None
    if args.large:  # the served model's tokenizer, for a pair of different families
        from .models import load_tokenizer

        large_tokenizer = load_tokenizer(resolve_model(args.large, args.dtype, progress=not args.quiet))
    _say(args, f"small model loaded in {time.perf_counter() - t0:.1f} s ({small_dir}); large model: {args.server}")
    if args.retries < 0:
        raise UsageError("--retries must be >= 0")
    client_kw = dict(top_logprobs=args.top_logprobs, lookahead=args.lookahead, eos_guard=args.eos_guard,
                     max_retries=args.retries, large_tokenizer=large_tokenizer,
                     gate_threshold=args.gate_threshold, gate_patience=args.gate_patience)
    sampling = dict(temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed if args.temperature > 0 else None)
    try:
        with split.SplitCoSteerClient(args.server, runner, None, config, **client_kw) as client:
            if args.input is None:
                start = time.perf_counter()
                for piece in client.stream(rows[0]["_prompt"], rows[0]["_context"], args.max_new_tokens, **sampling):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                seconds = time.perf_counter() - start
                res = client.last_result
                n = len(res.token_ids) if res is not None else 0
                trips = res.round_trips if res is not None else 0
                _say(args, f"{n} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):.2f} tok/s, split mode, "
                           f"{trips} round trips)")
                return 0
            args.output.parent.mkdir(parents=True, exist_ok=True)
            from tqdm.auto import tqdm

            tokens, start = 0, time.perf_counter()
            with open(args.output, "w", encoding="utf-8") as out, \
                    tqdm(total=len(rows), desc="generate (split)", unit="row", disable=args.quiet,
                         file=sys.stderr) as bar:
                for i in range(0, len(rows), args.batch_size):
                    chunk = rows[i:i + args.batch_size]
                    results = client.generate_batch([r["_prompt"] for r in chunk], [r["_context"] for r in chunk],
                                                    args.max_new_tokens, **sampling)
                    for r, res in zip(chunk, results):
                        out.write(json.dumps({**r["fields"], "output": res.text}, ensure_ascii=False) + "\n")
                        tokens += len(res.token_ids)
                    out.flush()
                    bar.update(len(chunk))
            seconds = time.perf_counter() - start
            _say(args, f"wrote {len(rows)} rows to {args.output}: {tokens} tokens in {seconds:.1f} s "
                       f"({tokens / max(seconds, 1e-9):.2f} tok/s, split mode)")
            return 0
    except split.SplitModeError as e:
        raise UsageError(f"split mode: {e}") from None


# --------------------------------------------------------------------------- demo
DEMO_CASES = [
    {
        "persona": "vegan, loves spicy food",
        "context": "I am vegan and I love very spicy food, the hotter the better. I live in Mexico City.",
        "prompt": "Suggest a dinner idea for tonight.",
    },
    {
        "persona": "wants concise answers",
        "context": "Your answer should be as concise as possible: one or two short sentences, no lists.",
        "prompt": "How do rainbows form?",
    },
    {
        "persona": "a nurse with two cats",
        "context": "My name is Maya. I am a night-shift nurse and I have two cats, Pixel and Miso, "
                   "who wait for me at home.",
        "prompt": "Write a short poem to cheer me up after work.",
    },
]
DEMO_MODES = ("large", "small-context", "large-context", "costeer")


def machine_description(dtype: str, device_used: str = "cpu") -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = f"GPU {torch.cuda.get_device_name(0)}" if (device_used or "cpu").startswith("cuda") else \
        f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{device}; torch {torch.__version__}; {dtype}"


def cmd_demo(args) -> int:
    config = _config(args)
    _no_transformers_noise()
    if args.quick:
        from .testing import save_tiny_pair

        root = Path(os.environ.get("COSTEER_CACHE") or Path.home() / ".cache" / "costeer_processor") / "tiny-pair"
        large_dir, small_dir = save_tiny_pair(root)
        dtype = "float32"
        _say(args, f"--quick: tiny random-weight models in {root} (the text is gibberish; this checks the pipeline)")
    else:
        dtype = args.dtype
        _say(args, f"models: large {args.large}, small {args.small} ({dtype}); installing on first use ...")
        t0 = time.perf_counter()
        large_dir = resolve_model(args.large, dtype)
        small_dir = resolve_model(args.small, dtype)
        _note_tokenizers(args, large_dir, small_dir)
        _say(args, f"models ready in {time.perf_counter() - t0:.0f} s: {large_dir} | {small_dir}")
    t0 = time.perf_counter()
    engine = HFEngine(large_dir, small_dir, dtype, args.context_position, device=_device(args))
    load_s = time.perf_counter() - t0
    prompts = [c["prompt"] for c in DEMO_CASES]
    contexts = [c["context"] for c in DEMO_CASES]
    engine.validate(prompts, contexts)
    # One-time costs (first kernels, weights paged in) must not be billed to the first system timed.
    _say(args, "warming up ...")
    for mode in ("large", "small-context", "costeer"):
        engine.run(mode, prompts, contexts, config, max_new_tokens=2)
    load_before = _load_average()
    results = {}
    for mode in DEMO_MODES:
        _say(args, f"running: {MODE_TITLES[mode]} ({len(prompts)} prompts in one batch, "
                   f"max {args.max_new_tokens} new tokens) ...")
        results[mode] = engine.run(mode, prompts, contexts, config, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, eos_guard=args.eos_guard,
                                   gate_threshold=args.gate_threshold, gate_patience=args.gate_patience,
                                   seed=args.seed)
    _print_demo(args, results, large_dir, small_dir, dtype, load_s, config, (load_before, _load_average()))
    return 0


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _print_demo(args, results, large_dir, small_dir, dtype, load_s, config, loads=(None, None)) -> None:
    from .core import costeer_gain

    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    wrap = textwrap.TextWrapper(width=width - 4, initial_indent="    ", subsequent_indent="    ",
                                replace_whitespace=False)
    out = sys.stdout
    rule = "=" * width
    for i, case in enumerate(DEMO_CASES):
        print(rule, file=out)
        print(f"Persona {i + 1}: {case['persona']}", file=out)
        print(f"  private context (small model only): {case['context']}", file=out)
        print(f"  public prompt (both models):        {case['prompt']}", file=out)
        for mode in DEMO_MODES:
            print("-" * width, file=out)
            print(f"  [{MODE_TITLES[mode]}]", file=out)
            text = results[mode].texts[i] or "(empty)"
            for para in text.splitlines() or [""]:
                print(wrap.fill(para) if para.strip() else "", file=out)
    print(rule, file=out)
    print(f"Speed ({len(DEMO_CASES)} prompts batched per system, greedy, at most {args.max_new_tokens} new tokens, "
          f"hf backend, CoSteer gain g = {costeer_gain(config):.3f}):", file=out)
    for mode in DEMO_MODES:
        r = results[mode]
        print(f"  {MODE_TITLES[mode]:<60} {r.tokens:5d} tokens {r.seconds:7.1f} s {r.tokens_per_s:7.2f} tok/s",
              file=out)
    print(f"Measured on this machine: {machine_description(dtype, _device(args))}.", file=out)
    cores = os.cpu_count() or 1
    if all(x is not None for x in loads):
        busy = max(loads) > cores + 0.5
        print(f"Load average {loads[0]:.1f} -> {loads[1]:.1f} on {cores} cores"
              + (": other processes shared the CPU, so these speeds are low and noisy." if busy else "."), file=out)
    print(f"Models: large {large_dir}, small {small_dir} (loaded in {load_s:.1f} s).", file=out)
    print("Only CoSteer and the large model alone keep the context private; 'large model with the context' "
          "sends it to the cloud and is shown as the upper bound.", file=out)
    out.flush()


# --------------------------------------------------------------------------- serve
def serve_command(args) -> tuple[list[str], dict]:
    from .vllm_server import CPU_DEFAULTS, server_command

    def where(name: str) -> Path:
        if not args.dry_run:
            return resolve_model(name, args.dtype)
        if name.strip().lower() in PRESETS:
            return preset_model_dir(name, args.dtype)
        return resolve_model(name, args.dtype, progress=False)

    if args.split and args.small:
        raise UsageError("--split serves the large model alone: drop --small (the small model runs on the client)")
    if not args.split and not args.small:
        raise UsageError("give --small MODEL (the CoSteer processor runs it inside the server), or use --split")
    large_dir = where(args.large)
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    if args.split:
        cmd = server_command(str(large_dir), [*common, "--max-logprobs", "-1", "--enable-prefix-caching", *extra],
                             host=args.host, port=args.port)
    else:
        small_dir = where(args.small)
        if not args.dry_run:
            _note_tokenizers(args, large_dir, small_dir)
        costeer = {"small_model": str(small_dir), "dtype": args.dtype}
        cmd = server_command(str(large_dir), [*common, "--logits-processors", VLLM_PROCESSOR,
                                              "--additional-config", json.dumps({"costeer": costeer}), *extra],
                             host=args.host, port=args.port)
    env = {}
    try:
        import torch

        if not torch.cuda.is_available():
            env = {k: os.environ.get(k, v) for k, v in CPU_DEFAULTS.items()}
    except ImportError:
        pass
    return cmd, env


def cmd_serve(args) -> int:
    cmd, env = serve_command(args)
    if args.dry_run:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print((prefix + " " if prefix else "") + shlex.join(cmd))
        for name in (args.large, args.small):
            if name and name.strip().lower() in PRESETS and not is_installed(name, args.dtype):
                print(f"# {name} is not installed yet: run 'costeer models install {name} --dtype {args.dtype}'",
                      file=sys.stderr)
        return 0
    from .vllm_server import server_env

    print(f"[{PROG}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        os.execve(cmd[0], cmd, server_env(env))
    except OSError as e:
        raise UsageError(f"cannot start the vLLM server: {e}") from None
    return 0  # not reached


# --------------------------------------------------------------------------- models
def cmd_models(args) -> int:
    if args.action == "list":
        if args.names:
            raise UsageError("'costeer models list' takes no names")
        rows = describe_presets()
        print(f"{'preset':<30} {'role':<6} {'GGUF':>9}  {'installed':<28} model")
        for r in rows:
            installed = ", ".join(r["installed"]) or "-"
            print(f"{r['name']:<30} {r['role']:<6} {r['gguf_mib']:>6.0f} MiB  {installed:<28} {r['title']}")
        from .models import cache_root

        print(f"cache: {cache_root()} (set COSTEER_CACHE to move it)")
        return 0
    if not args.names:
        raise UsageError(f"name a preset to {args.action} ({', '.join(PRESETS)} or 'all')")
    names = list(PRESETS) if args.names == ["all"] else args.names
    for name in names:
        if name.strip().lower() not in PRESETS:
            raise CoSteerModelError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    for name in names:
        if args.action == "path":
            print(preset_model_dir(name, args.dtype))
            continue
        t0 = time.perf_counter()
        path = resolve_model(name, args.dtype)
        print(f"{name}: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
