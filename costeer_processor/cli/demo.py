"""``costeer demo``: CoSteer next to its baselines on 3 built-in personas, with tokens/s."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

from .common import MODES, config_from_args, device, dtype_label, note_tokenizers, quiet_transformers, resolve, say, variants_from_args

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
    where = f"GPU {torch.cuda.get_device_name(0)}" if (device_used or "cpu").startswith("cuda") else \
        f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}; {dtype}"


def _models(args) -> tuple[Path, Path, str]:
    if args.quick:
        from ..testing import save_tiny_pair

        root = Path(os.environ.get("COSTEER_CACHE") or Path.home() / ".cache" / "costeer_processor") / "tiny-pair"
        large_dir, small_dir = save_tiny_pair(root)
        say(args, f"--quick: tiny random-weight models in {root} (the text is gibberish; this checks the pipeline)")
        return large_dir, small_dir, "float32"
    say(args, f"models: large {args.large}, small {args.small} ({dtype_label(args)}); installing on first use ...")
    t0 = time.perf_counter()
    large_dir, small_dir = resolve(args, args.large), resolve(args, args.small)
    say(args, f"models ready in {time.perf_counter() - t0:.0f} s: {large_dir} | {small_dir}")
    return large_dir, small_dir, args.dtype


def run(args) -> int:
    from ..pipeline import Pair, Sampling

    config = config_from_args(args)
    quiet_transformers()
    large_dir, small_dir, dtype = _models(args)
    t0 = time.perf_counter()
    pair = Pair.load(large_dir, small_dir, dtype, device=device(args))
    load_s = time.perf_counter() - t0
    note_tokenizers(args, pair.tokenizers["large"], pair.tokenizers["small"])
    prompts = [c["prompt"] for c in DEMO_CASES]
    contexts = [c["context"] for c in DEMO_CASES]
    pair.check_contexts(prompts, contexts, position=args.context_position)

    def run_mode(name: str, **kw):
        mode = MODES[name]
        return pair.run(mode.role, prompts, contexts, with_context=mode.with_context, position=args.context_position,
                        config=config if mode.steered else None, **kw)

    # One-time costs (first kernels, weights paged in) must not be billed to the first system timed.
    say(args, "warming up ...")
    for name in ("large", "small-context", "costeer"):
        run_mode(name, max_new_tokens=2)
    load_before = _load_average()
    results = {}
    for name in DEMO_MODES:
        say(args, f"running: {MODES[name].title} ({len(prompts)} prompts in one batch, "
                  f"max {args.max_new_tokens} new tokens) ...")
        results[name] = run_mode(name, max_new_tokens=args.max_new_tokens, variants=variants_from_args(args),
                                 sampling=Sampling(args.temperature, args.top_p, args.seed))
    _print(args, results, (large_dir, small_dir, dtype, load_s), config, (load_before, _load_average()))
    return 0


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _print(args, results, setup, config, loads=(None, None)) -> None:
    large_dir, small_dir, dtype, load_s = setup
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
        for name in DEMO_MODES:
            print("-" * width, file=out)
            print(f"  [{MODES[name].title}]", file=out)
            text = results[name].texts[i] or "(empty)"
            for para in text.splitlines() or [""]:
                print(wrap.fill(para) if para.strip() else "", file=out)
    print(rule, file=out)
    print(f"Speed ({len(DEMO_CASES)} prompts batched per system, greedy, at most {args.max_new_tokens} new tokens, "
          f"hf backend, CoSteer gain g = {config.gain:.3f}):", file=out)
    for name in DEMO_MODES:
        r = results[name]
        print(f"  {MODES[name].title:<60} {r.tokens:5d} tokens {r.seconds:7.1f} s {r.tokens_per_s:7.2f} tok/s",
              file=out)
    print(f"Measured on this machine: {machine_description(dtype, device(args))}.", file=out)
    cores = os.cpu_count() or 1
    if all(x is not None for x in loads):
        busy = max(loads) > cores + 0.5
        print(f"Load average {loads[0]:.1f} -> {loads[1]:.1f} on {cores} cores"
              + (": other processes shared the CPU, so these speeds are low and noisy." if busy else "."), file=out)
    print(f"Models: large {large_dir}, small {small_dir} (loaded in {load_s:.1f} s).", file=out)
    print("Only CoSteer and the large model alone keep the context private; 'large model with the context' "
          "sends it to the cloud and is shown as the upper bound.", file=out)
    out.flush()
