"""The small-model runner at scale: long vs short personal contexts, earlier runners vs today's.

Side by side in one run, for N users whose with-context prompts hold ``--long-tokens`` (LongLaMP
profile length) or ``--short-tokens`` context tokens:

* ``admit s``: registering the N requests and prefilling both branches (tokenising included);
* ``prefill s``: the prefill alone (the first ``step``, tokenising excluded);
* ``step ms``: one decode step over all 2N branch rows (median);
* ``KV MiB`` and ``KV / needed``: bytes the cache holds vs the sum of row lengths x bytes per token;
* ``reuse``: a second request of each user with the same context and another prompt (context cache
  hit): its prefill time over the first request's prefill time.

Runners (``--runners``): ``first`` (the first release's runner, commit ``f005533``: one padded axis,
``torch.cat`` per step), ``padded`` (commit ``0b03b48``: the same padded axis, grown in place, with
the context cache) and ``packed`` (today: :mod:`costeer_processor.packed_kv`). Earlier runners are
read from git, so all are measured on the same machine in the same process. Random weights of real
shapes (``--shape qwen0.5b``: Qwen2.5-0.5B-Instruct) or a scaled-down shape for CPUs (``--shape mini``).

Usage::

    python benchmarks/bench_small_runner.py --shape mini --users 16           # CPU, a few minutes
    python benchmarks/bench_small_runner.py --shape qwen0.5b --users 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from costeer_processor import SmallModelRunner  # noqa: E402
from costeer_processor.testing import build_tiny_tokenizer  # noqa: E402

from benchmarks.workload import REVISIONS, legacy_runner_class  # noqa: E402

SHAPES = {
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "mini": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
WORDS = "I am vegan and I love very spicy food. I hate crowds and love mountains and science fiction.".split()


def context_of(n_tokens: int, tok, seed: int) -> str:
    words = [f"user{seed}"]
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words.extend(WORDS)
    return " ".join(words)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_bytes(runner) -> int:
    if hasattr(runner, "stats"):
        return runner.stats()["kv_bytes"]
    cache = getattr(runner, "_cache", None)  # the first runner: plain DynamicCache layers
    return 0 if cache is None else sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def measure(runner, tok, contexts: list[str], device: str, steps: int, bytes_per_token: int) -> dict:
    chats = [[{"role": "user", "content": f"Question {i}: suggest a dinner recipe."}] for i in range(len(contexts))]
    keys = list(range(len(contexts)))
    t0 = time.perf_counter()
    rows = [runner.encode_branches(c, ctx) for c, ctx in zip(chats, contexts)]
    for k, (w, wo) in zip(keys, rows):
        runner.add(k, w, wo)
    t1 = time.perf_counter()
    runner.step([(k, []) for k in keys])
    sync(device)
    admit, prefill = time.perf_counter() - t0, time.perf_counter() - t1
    times, fed = [], []
    for t in range(steps):
        fed.append(100 + t)
        t0 = time.perf_counter()
        runner.step([(k, list(fed)) for k in keys])
        sync(device)
        times.append(time.perf_counter() - t0)
    needed = sum(len(w) + len(wo) + 2 * steps for w, wo in rows) * bytes_per_token
    held = cache_bytes(runner)
    for k in keys:
        runner.remove(k)
    out = {"admit_s": admit, "prefill_s": prefill, "step_ms": statistics.median(times[1:]) * 1e3,
           "kv_mib": held / 2**20, "kv_over_needed": held / needed}
    if hasattr(runner, "context_cache") and runner.context_cache.enabled:  # a second request per user
        chats2 = [[{"role": "user", "content": f"Another question {i}: plan my weekend."}] for i in keys]
        for k, c, ctx in zip(keys, chats2, contexts):
            runner.add(("again", k), *runner.encode_branches(c, ctx))
        t0 = time.perf_counter()
        runner.step([(("again", k), []) for k in keys])
        sync(device)
        out["reuse_prefill_s"] = time.perf_counter() - t0
        out["reuse_over_first"] = out["reuse_prefill_s"] / prefill
        for k in keys:
            runner.remove(("again", k))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--short-tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runners", nargs="+", choices=["first", "padded", "packed"], default=["first", "padded", "packed"])
    p.add_argument("--baseline-file", default=None,
                   help="the first runner's small_model.py (where git is not at hand; the padded one needs git)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=32768, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    def maker(cls, **kwargs):
        return lambda: cls(model, tok, **kwargs)

    makers = {"packed": maker(SmallModelRunner, context_cache_mb=4096)}
    if "first" in args.runners:
        makers["first"] = maker(legacy_runner_class(REVISIONS["first"], args.baseline_file))
    if "padded" in args.runners:
        makers["padded"] = maker(legacy_runner_class(REVISIONS["padded"]), context_cache_mb=4096)
    results = []
    for label, n in (("short", args.short_tokens), ("long", args.long_tokens)):
        contexts = [context_of(n, tok, i) for i in range(args.users)]
        for name in args.runners:
            make = makers[name]
            row = {"contexts": label, "context_tokens": n, "runner": name}
            row.update(measure(make(), tok, contexts, args.device, args.steps, bytes_per_token))
            results.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["contexts"], r["runner"]): r for r in results}
    summary = {name: by[("long", name)]["step_ms"] / by[("short", name)]["step_ms"] for name in args.runners}
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    meta = {"device": card, "shape": args.shape, "users": args.users, "dtype": args.dtype,
            "command": "python benchmarks/bench_small_runner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "long_step_over_short_step": summary}
    lines = [f"{card}; shape {args.shape}, {args.users} users, {args.dtype}; load {meta['load_average'][0]:.2f}", "",
             "| contexts | runner | admit s | prefill s | step ms | KV MiB | KV / needed | reuse prefill / first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        reuse = f"{r['reuse_over_first']:.3f}" if "reuse_over_first" in r else "-"
        lines.append(f"| {r['contexts']} ({r['context_tokens']}) | {r['runner']} | {r['admit_s']:.2f} | "
                     f"{r['prefill_s']:.2f} | {r['step_ms']:.1f} | {r['kv_mib']:.1f} | {r['kv_over_needed']:.2f} | {reuse} |")
    lines.append("")
    lines.append("long-context step / short-context step: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
