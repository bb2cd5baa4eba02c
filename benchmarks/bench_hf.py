"""Steered vs plain Hugging Face ``generate``, and vs the research-style per-row loop.

For each batch size it measures, side by side in one run:

* ``plain``: the large model's ``generate`` alone (tokens/s, time per step);
* ``small``: one batched small-model decode step over the 2B branch rows (time per step);
* ``steered``: ``generate`` with :class:`CoSteerLogitsProcessor` (tokens/s, time per step);
* ``overhead = steered step / (plain step + small step)`` (1.0 = steering costs nothing
  beyond running the two models);
* ``loop``: the release's way (one prompt at a time, three batch-1 KV caches, the 20-step
  FTRL loop per token) over the same prompts; ``speed-up = steered tok/s / loop tok/s``.

Usage::

    python benchmarks/bench_hf.py                      # tiny models built on the spot
    python benchmarks/bench_hf.py --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \
        --batch-sizes 1 8 --new-tokens 32

Writes ``benchmarks/results/bench_hf_<tag>.json`` and prints a markdown table.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from costeer_processor import CoSteerConfig, SmallModelRunner, ftrl_reference  # noqa: E402
from costeer_processor.hf import CoSteerLogitsProcessor  # noqa: E402
from costeer_processor.prompts import with_system_prompt  # noqa: E402

from benchmarks.workload import CONTEXTS, PROMPTS, REVISIONS, legacy_runner_class, long_context  # noqa: E402



def load(name, dtype):
    if name == "tiny":
        return None
    path = name
    if not Path(name).exists():
        from costeer_processor.models import resolve_model  # presets installed offline
        path = resolve_model(name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, tok


def tiny_pair():
    from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    tok = build_tiny_tokenizer()
    return (build_tiny_model(tok, hidden_size=256, layers=4, heads=4, kv_heads=2, seed=1), tok,
            build_tiny_model(tok, hidden_size=128, layers=2, heads=2, kv_heads=1, seed=2))


def rows(b, tok=None, context_tokens=0):
    """``b`` prompts and contexts; with ``context_tokens``, each context is a user profile of about that
    many tokens (LongLaMP-length personal contexts: the user's preference repeated as history)."""
    contexts = [CONTEXTS[i % len(CONTEXTS)] for i in range(b)]
    if context_tokens:
        contexts = [long_context(c, i, tok, context_tokens) for i, c in enumerate(contexts)]
    return [PROMPTS[i % len(PROMPTS)] for i in range(b)], contexts


def large_inputs(tok, prompts):
    texts = [tok.apply_chat_template(with_system_prompt(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def research_loop(large, small, tok, prompt, context, n, cfg):
    """One prompt, three batch-1 KV caches, the literal FTRL loop each token (the release's way)."""
    runner_like = SmallModelRunner(small, tok)
    w, wo = runner_like.encode_branches(with_system_prompt(prompt), context)  # the large model's conversation
    lids = large_inputs(tok, [prompt])["input_ids"]
    seqs = [lids, torch.tensor([w]), torch.tensor([wo])]
    models = [large, small, small]
    caches = [DynamicCache(), DynamicCache(), DynamicCache()]
    feed = seqs
    for _ in range(n):
        logits = [m(input_ids=x, past_key_values=c, use_cache=True).logits[:, -1].float()
                  for m, x, c in zip(models, feed, caches)]
        p = ftrl_reference(logits[0], logits[1], logits[2], cfg, dtype=torch.float32)
        tok_id = p.argmax(-1, keepdim=True)
        feed = [tok_id, tok_id, tok_id]


def bench(large, tok, small, batch_sizes, n, repeats, loop_rows, context_tokens=0, compare=None):
    """``compare``: an earlier runner class; steered generation is then also timed with it (same run)."""
    cfg = CoSteerConfig()
    runner = SmallModelRunner(small, tok)
    other = compare(small, tok) if compare is not None else None
    results = []
    for b in batch_sizes:
        prompts, contexts = rows(b, tok, context_tokens)
        inputs = large_inputs(tok, prompts)
        gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        t_plain = timed(lambda: large.generate(**inputs, **gen), repeats)
        proc = CoSteerLogitsProcessor(runner, contexts, cfg)  # reads each row's prompt from input_ids
        t_steer = timed(lambda: large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), **gen), repeats)
        if other is not None:
            before = CoSteerLogitsProcessor(other, contexts, cfg)
            t_before = timed(lambda: large.generate(**inputs, logits_processor=LogitsProcessorList([before]), **gen),
                             repeats)

        def small_only():
            for i, (p, c) in enumerate(zip(prompts, contexts)):
                runner.add(("s", i), *runner.encode_branches(p, c))
            hist = [[] for _ in range(b)]
            runner.step([(("s", i), hist[i]) for i in range(b)])
            for t in range(n - 1):
                for h in hist:
                    h.append(100 + t)
                runner.step([(("s", i), hist[i]) for i in range(b)])
            for i in range(b):
                runner.remove(("s", i))
        t_small = timed(small_only, repeats)
        del proc
        row = dict(batch=b, new_tokens=n, context_tokens=context_tokens, plain_tok_s=b * n / t_plain, steered_tok_s=b * n / t_steer,
                   plain_step_ms=1e3 * t_plain / n, small_step_ms=1e3 * t_small / n,
                   steered_step_ms=1e3 * t_steer / n)
        row["overhead"] = row["steered_step_ms"] / (row["plain_step_ms"] + row["small_step_ms"])
        row["steered_vs_plain"] = row["steered_tok_s"] / row["plain_tok_s"]
        if other is not None:
            row["earlier_runner_steered_step_ms"] = 1e3 * t_before / n
            row["earlier_runner_steered_vs_plain"] = t_plain / t_before
        if loop_rows and b in loop_rows:
            t_loop = timed(lambda: [research_loop(large, small, tok, p, c, n, cfg) for p, c in zip(prompts, contexts)], 1)
            row["loop_tok_s"] = b * n / t_loop
            row["speedup_vs_loop"] = row["steered_tok_s"] / row["loop_tok_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def table(results):
    earlier = any("earlier_runner_steered_step_ms" in r for r in results)
    lines = ["| batch | plain tok/s | steered tok/s | steered/plain | plain step ms | small step ms (2B rows) | steered step ms | overhead | per-row loop tok/s | speed-up vs loop |"
             + (" steered step ms, earlier runner | steered/plain, earlier runner |" if earlier else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if earlier else "")]
    for r in results:
        line = (f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['steered_tok_s']:.1f} | {r['steered_vs_plain']:.2f} | "
                f"{r['plain_step_ms']:.1f} | {r['small_step_ms']:.1f} | {r['steered_step_ms']:.1f} | {r['overhead']:.2f} | "
                f"{r.get('loop_tok_s', float('nan')):.2f} | {r.get('speedup_vs_loop', float('nan')):.1f}x |")
        if earlier:
            line += f" {r['earlier_runner_steered_step_ms']:.1f} | {r['earlier_runner_steered_vs_plain']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="tiny")
    ap.add_argument("--small", default="tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-batches", type=int, nargs="*", default=None,
                    help="batch sizes at which to also time the per-row research loop (default: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--context-tokens", type=int, default=0,
                    help="personal contexts of about this many tokens (LongLaMP profiles: 1,000-3,000); 0: short")
    ap.add_argument("--compare-runner", choices=sorted(REVISIONS), default=None,
                    help="also time steered generation with an earlier small-model runner read from git "
                         "(padded: the layout before the packed KV cache)")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.large == "tiny":
        large, tok, small = tiny_pair()
        tag = args.tag or "tiny"
    else:
        large, tok = load(args.large, args.dtype)
        small, _ = load(args.small, args.dtype)
        tag = args.tag or "real"
    large.generate(**large_inputs(tok, ["warm up"]), max_new_tokens=2)  # first-call costs out of the timings
    loop_rows = args.batch_sizes if args.loop_batches is None else args.loop_batches
    compare = None
    if args.compare_runner:  # the processor accepts SmallModelRunner instances; the earlier class's methods come first
        compare = type("EarlierRunner", (legacy_runner_class(REVISIONS[args.compare_runner]), SmallModelRunner), {})
    results = bench(large, tok, small, args.batch_sizes, args.new_tokens, args.repeats, loop_rows,
                    args.context_tokens, compare)
    md = table(results)
    print(md)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = dict(large=args.large, small=args.small, dtype=args.dtype if args.large != "tiny" else "float32",
                threads=args.threads, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                torch=torch.__version__, command=" ".join(sys.argv), load_average=os.getloadavg())
    (out / f"bench_hf_{tag}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    (out / f"bench_hf_{tag}.md").write_text(md + "\n")
    plot(results, out / f"bench_hf_{tag}.png", f"{args.large} + {args.small}")


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["batch"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [r["plain_tok_s"] for r in results], "o-", label="large alone")
    ax.plot(b, [r["steered_tok_s"] for r in results], "s-", label="CoSteer (this package)")
    if all("loop_tok_s" in r for r in results):
        ax.plot(b, [r["loop_tok_s"] for r in results], "^--", label="per-row research loop")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
