"""Speculative CoSteer against plain and steered ``generate``, side by side in one run.

For each batch size, on the workload's prompts (chat template, the paper's system prompt) with a
preference context per row, ``--new-tokens`` fixed tokens (end-of-sequence masked, as
``min_new_tokens`` does), greedy:

* ``plain``: the large model's ``generate`` alone;
* ``steered``: ``generate`` with :class:`CoSteerLogitsProcessor` (non-speculative CoSteer);
* ``spec k=K <proposal>``: :func:`costeer_processor.speculative.speculative_generate` with ``K``
  drafts per round (``adaptive``: up to ``--max-k``, grown while drafts are accepted), proposals
  ``with_context`` (the small model's with-context branch) and ``proxy``
  (``log p_S+ + (g - 1) (log p_S+ - log p_S-)``).

Each row reports tokens/s, the ratio to plain and to steered, whether the output equals the steered
output token for token (and where it first differs), the acceptance rate, tokens per large forward
and small-model forwards per token.

Usage::

    python benchmarks/bench_speculative.py --quick           # tiny models built on the spot (seconds)
    python benchmarks/bench_speculative.py --large qwen2.5-coder-1.5b-instruct \\
        --small qwen2.5-coder-0.5b-instruct --batch-sizes 1 8 --new-tokens 64

Writes ``benchmarks/results/bench_speculative_<tag>.json`` and ``.md`` (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from costeer_processor import CoSteerConfig, SmallModelRunner  # noqa: E402
from costeer_processor.hf import CoSteerLogitsProcessor  # noqa: E402
from costeer_processor.prompts import with_system_prompt  # noqa: E402
from costeer_processor.speculative import speculative_generate  # noqa: E402

from benchmarks.workload import CONTEXTS, PROMPTS  # noqa: E402


def load_pair(large: str, small: str, dtype: str):
    if large == "tiny":
        from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
        tok = build_tiny_tokenizer()
        return (build_tiny_model(tok, hidden_size=128, layers=2, heads=2, kv_heads=1, seed=1), tok,
                build_tiny_model(tok, hidden_size=64, layers=2, heads=2, kv_heads=1, seed=2))
    from costeer_processor.models import load_pair as load
    pair = load(large, small, dtype=dtype)
    if pair.vocab_map is not None:
        raise SystemExit("this benchmark runs a pair that shares one tokenizer")
    return pair.large_model, pair.large_tokenizer, pair.small_model


def inputs_for(tok, b):
    texts = [tok.apply_chat_template(with_system_prompt(PROMPTS[i % len(PROMPTS)]), tokenize=False,
                                     add_generation_prompt=True) for i in range(b)]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def first_difference(a: torch.Tensor, b: torch.Tensor):
    """(row, position) of the first differing generated token, or None."""
    if a.shape != b.shape:
        return "shape"
    diff = (a != b).nonzero()
    return None if not diff.numel() else [int(diff[0, 0]), int(diff[0, 1])]


@torch.inference_mode()
def forward_costs(large, runner, inputs, contexts, widths=(1, 3, 5, 9), repeats=3):
    """Milliseconds of one large forward over ``w`` new tokens per row (on the cached prompt), and of one
    batched small-model step over both branches: the cost model of a round."""
    from transformers import DynamicCache
    b = inputs["input_ids"].shape[0]
    cache = DynamicCache(config=large.config)
    large(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    length = cache.get_seq_length()
    out = {}
    for w in widths:
        times = []
        for _ in range(repeats):
            ids = torch.full((b, w), 100, dtype=torch.long)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], dim=1)
            positions = (mask.cumsum(-1) - 1)[:, -w:]
            t0 = time.perf_counter()
            large(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                  logits_to_keep=w)
            times.append(time.perf_counter() - t0)
            cache.crop(-(cache.get_seq_length() - length))
        out[f"large_forward_{w}_ms"] = 1e3 * statistics.median(times)
    for i, c in enumerate(contexts):
        runner.add(("cost", i), *runner.encode_branches("Suggest a dinner.", c))
    hist = [[] for _ in contexts]
    runner.step([(("cost", i), h) for i, h in enumerate(hist)])
    times = []
    for t in range(repeats + 1):
        for h in hist:
            h.append(100 + t)
        t0 = time.perf_counter()
        runner.step([(("cost", i), h) for i, h in enumerate(hist)])
        times.append(time.perf_counter() - t0)
    for i in range(len(contexts)):
        runner.remove(("cost", i))
    out["small_step_ms"] = 1e3 * statistics.median(times[1:])
    return out


@torch.inference_mode()
def steered_margins(large, runner, inputs, contexts, cfg, gen) -> list[list[float]]:
    """Per generated position and row: top-1 minus top-2 of the steered scores of non-speculative CoSteer
    (nats; a small margin is a near tie, where bf16 rounding can flip the greedy choice). Run apart from
    the timed runs (keeping every step's scores costs memory and time)."""
    proc = CoSteerLogitsProcessor(runner, contexts, cfg)
    out = large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), output_scores=True,
                         return_dict_in_generate=True, **gen)
    proc.release()
    return [(lambda t: (t[:, 0] - t[:, 1]).tolist())(s.float().topk(2, dim=-1).values) for s in out.scores]


def bench(large, tok, small, batch_sizes, n, configs, max_k, repeats=1):
    """Every mode once per repeat, interleaved (a shared machine's noise falls on all of them alike);
    per mode the median wall time and the median CPU time of this process."""
    runner = SmallModelRunner(small, tok)
    cfg = CoSteerConfig()
    rows = []
    for b in batch_sizes:
        inputs = inputs_for(tok, b)
        start = inputs["input_ids"].shape[1]
        contexts = [CONTEXTS[i % len(CONTEXTS)] for i in range(b)]
        gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def steered_run():
            proc = CoSteerLogitsProcessor(runner, contexts, cfg)
            out = large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), **gen)
            proc.release()
            return out

        def spec_run(k, proposal):
            adaptive = k == "adaptive"
            return speculative_generate(large, runner, inputs["input_ids"], inputs["attention_mask"], contexts,
                                        config=cfg, max_new_tokens=n, min_new_tokens=n,
                                        k=max_k if adaptive else k, adaptive=adaptive, proposal=proposal)

        modes = {"plain": lambda: large.generate(**inputs, **gen), "steered": steered_run}
        modes.update({f"spec k={k} {p}": (lambda k=k, p=p: spec_run(k, p)) for k, p in configs})
        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        outputs = {}
        for _ in range(repeats):
            for mode, fn in modes.items():
                c0 = time.process_time()
                outputs[mode], t = timed(fn)
                wall[mode].append(t)
                cpu[mode].append(time.process_time() - c0)
                print(json.dumps({"batch": b, "mode": mode, "wall_s": t, "cpu_s": cpu[mode][-1]}), flush=True)
        med = {m: statistics.median(v) for m, v in wall.items()}
        med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
        base = dict(batch=b, new_tokens=n, repeats=repeats, plain_tok_s=b * n / med["plain"],
                    steered_tok_s=b * n / med["steered"], load_average=os.getloadavg())
        base.update(forward_costs(large, runner, inputs, contexts))
        steered = outputs["steered"]
        margins = steered_margins(large, runner, inputs, contexts, cfg, gen) if any(
            first_difference(outputs[m].sequences[:, start:], steered[:, start:]) is not None
            for m in modes if m.startswith("spec")) else None
        for mode in modes:
            if mode == "plain":
                continue
            row = {**base, "mode": mode, "tok_s": b * n / med[mode], "vs_plain": med["plain"] / med[mode],
                   "vs_steered": med["steered"] / med[mode], "cpu_vs_plain": med_cpu["plain"] / med_cpu[mode],
                   "wall_s": wall[mode], "plain_wall_s": wall["plain"]}
            if mode == "steered":
                row["same_as_steered"] = True
            else:
                s = outputs[mode].stats.summary()
                diff = first_difference(outputs[mode].sequences[:, start:], steered[:, start:])
                if isinstance(diff, list) and margins is not None:
                    row["margin_at_difference"] = float(margins[diff[1]][diff[0]])
                row.update(same_as_steered=diff is None, first_difference=diff, acceptance=s["acceptance"],
                           tokens_per_large_forward=s["tokens_per_forward"], rounds=s["rounds"],
                           small_forwards_per_token=s["small_forwards"] * b / max(1, s["tokens"]))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "wall_s" not in k}), flush=True)
    return rows


def table(rows):
    lines = ["| batch | mode | tok/s | vs plain | vs steered | CPU time vs plain | same tokens as steered | "
             "acceptance | tokens / large forward | small forwards / token |", "|---" * 10 + "|"]
    for r in rows:
        same = "yes" if r["same_as_steered"] else f"no (row, pos {r.get('first_difference')})"
        if "margin_at_difference" in r:
            same += f", margin {r['margin_at_difference']:.3f}"
        lines.append(f"| {r['batch']} | {r['mode']} | {r['tok_s']:.2f} | {r['vs_plain']:.2f}x | "
                     f"{r['vs_steered']:.2f}x | {r['cpu_vs_plain']:.2f}x | {same} | "
                     f"{r.get('acceptance', float('nan')):.2f} | "
                     f"{r.get('tokens_per_large_forward', 1.0):.2f} | "
                     f"{r.get('small_forwards_per_token', 1.0):.2f} |")
    lines += ["", "| batch | plain tok/s | large forward ms, 1 / 3 / 5 / 9 tokens per row | "
              "small step ms (both branches) |", "|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "steered":
            lines.append(f"| {r['batch']} | {r['plain_tok_s']:.2f} | " + " / ".join(
                f"{r[f'large_forward_{w}_ms']:.0f}" for w in (1, 3, 5, 9)) + f" | {r['small_step_ms']:.0f} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", nargs="+", default=["2", "4", "8", "adaptive"])
    ap.add_argument("--max-k", type=int, default=8, help="the most drafts per round with k=adaptive")
    ap.add_argument("--proposals", nargs="+", default=["with_context", "proxy"])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of every mode (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="tiny models, batch 1 and 2, 8 tokens (a smoke run)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.large = args.small = "tiny"
        args.batch_sizes, args.new_tokens, args.repeats = [1, 2], 8, 1
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    large, tok, small = load_pair(args.large, args.small, args.dtype)
    large.generate(**inputs_for(tok, 1), max_new_tokens=2)  # first-call costs out of the timings
    configs = [(k if k == "adaptive" else int(k), p) for k in args.ks for p in args.proposals]
    rows = bench(large, tok, small, args.batch_sizes, args.new_tokens, configs, args.max_k, args.repeats)
    md = table(rows)
    print(md)
    command = ["python", "benchmarks/bench_speculative.py", *(argv if argv is not None else sys.argv[1:])]
    meta = dict(large=args.large, small=args.small, dtype=args.dtype if args.large != "tiny" else "float32",
                threads=args.threads, cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpus=os.cpu_count(), torch=torch.__version__, command=" ".join(command),
                load_average_before=load_before, load_average_after=os.getloadavg())
    tag = args.tag or ("tiny_quick" if args.large == "tiny" else "real")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(meta=meta, rows=rows)
    (out / f"bench_speculative_{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"bench_speculative_{tag}.md").write_text(md + "\n")
    return result


if __name__ == "__main__":
    main()
