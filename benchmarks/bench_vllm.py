"""CoSteer inside a real vLLM OpenAI server: throughput and latency, steered vs unsteered.

Per concurrency level (1, 4, 16 by default) it sends the same chat requests (fixed length:
``min_tokens = max_tokens``, ``ignore_eos``), streaming, through the ``openai`` client:

* ``plain``: a server started WITHOUT the processor (the large model alone);
* ``unsteered``: the CoSteer server, requests without ``costeer_context`` (what the processor
  costs when it has nothing to do);
* ``steered``: the CoSteer server, every request with its own ``costeer_context``;
* ``bound``: the large model alone plus the small model's own cost: time per output token
  ``ms_per_token_plain(c) + small_step(c)``, where ``small_step(c)`` is one batched
  :class:`~costeer_processor.SmallModelRunner` decode step over the ``2c`` branch rows plus the
  closed-form update, measured in this process with the engine's thread count. ``steered`` can
  only approach it: the small model runs after the large one in the same engine step.

Reported per row (median and best over ``--repeats`` interleaved runs): output tokens/s, mean and
p50 latency, mean TTFT, ms per output token (request latency / its tokens; streamed chunks merge
under load, so inter-chunk times are not used). Both servers run at once so that the modes can be
interleaved; only one is ever busy.

Usage::

    python benchmarks/bench_vllm.py                                   # tiny models built on the spot
    python benchmarks/bench_vllm.py --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \\
        --dtype bfloat16 --max-tokens 32 --max-model-len 2048 --tag qwen

``--large/--small`` take folders or presets (``costeer_processor.models``). Writes
``benchmarks/results/bench_vllm_<tag>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import CONTEXTS, PROMPTS, long_context  # noqa: E402

_LONG_CONTEXTS: dict = {"tokens": 0, "tokenizer": None, "cache": {}}


def user_context(i: int) -> str:
    """User i's personal context: the short preference, or (``--context-tokens``) a profile of that length."""
    short = CONTEXTS[i % len(CONTEXTS)] + f" (user {i})"
    n = _LONG_CONTEXTS["tokens"]
    if not n:
        return short
    cache = _LONG_CONTEXTS["cache"]
    if i not in cache:
        cache[i] = long_context(short, i, _LONG_CONTEXTS["tokenizer"], n)
    return cache[i]

SYSTEM = "You are a helpful assistant."


def resolve(name: str, dtype: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from costeer_processor.models import resolve_model

    return Path(resolve_model(name, dtype=dtype))


def request_once(client, model, i, context, max_tokens):
    extra = {"min_tokens": max_tokens, "ignore_eos": True}
    if context is not None:
        extra["vllm_xargs"] = {"costeer_context": context}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body=extra)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    t1 = time.perf_counter()
    first = first or t1
    # Streamed chunks can merge under load, so the per-token time is taken from the whole latency.
    return {"latency": t1 - t0, "ttft": first - t0, "tokens": tokens, "ms_per_token": 1000 * (t1 - t0) / max(tokens, 1)}


def run_level(client, model, concurrency, n_requests, steered, max_tokens):
    contexts = [(user_context(i)) if steered else None for i in range(n_requests)]
    request_once(client, model, 0, contexts[0], 4)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda i: request_once(client, model, i, contexts[i], max_tokens), range(n_requests)))
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in res]
    return {"concurrency": concurrency, "requests": n_requests, "wall_s": wall,
            "tokens": sum(r["tokens"] for r in res),
            "req_per_s": n_requests / wall, "tok_per_s": sum(r["tokens"] for r in res) / wall,
            "latency_mean_s": statistics.mean(lat), "latency_p50_s": statistics.median(lat),
            "ttft_mean_s": statistics.mean(r["ttft"] for r in res),
            "ms_per_token": statistics.mean(r["ms_per_token"] for r in res)}


def small_step_ms(small_dir, dtype, concurrency, steps, threads):
    """One batched decode step of the small model over 2c branch rows + the update, in ms (best of ``steps``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from costeer_processor import SmallModelRunner, steer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(small_dir))
    model = AutoModelForCausalLM.from_pretrained(str(small_dir), dtype=getattr(torch, dtype)).eval()
    runner = SmallModelRunner(model, tok)
    gen = {}
    for i in range(concurrency):
        runner.add(i, *runner.encode_branches(PROMPTS[i % len(PROMPTS)], user_context(i)))
        gen[i] = []
    vocab = runner.vocab_size
    large_like = torch.randn(concurrency, vocab)
    runner.step([(i, gen[i]) for i in gen])  # prefill
    fwd, upd = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for i in gen:
            gen[i].append(int(torch.randint(10, min(vocab, len(tok)), (1,), generator=g)))
        t0 = time.perf_counter()
        zw, zwo = runner.step([(i, gen[i]) for i in gen])
        t1 = time.perf_counter()
        steer(large_like, zw.float(), zwo.float(), 1.783)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        upd.append(t2 - t1)
    return 1000 * min(fwd), 1000 * min(upd)


def processor_step_ms(large_dir, small_dir, dtype, concurrency, steps, threads):
    """One ``apply`` of the V1 processor over c steered rows (small step + update + bookkeeping), best of ``steps``.

    Driven in this process with synthetic batch updates, so engine noise does not enter.
    """
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer
    from vllm.v1.sample.logits_processor import BatchUpdate

    from costeer_processor.vllm import CoSteerLogitsProcessor

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(large_dir))
    mc = SimpleNamespace(tokenizer=str(large_dir), trust_remote_code=False, tokenizer_revision=None,
                         dtype=getattr(torch, dtype), try_get_generation_config=lambda: {})
    cfg = SimpleNamespace(model_config=mc, speculative_config=None,
                          additional_config={"costeer": {"small_model": str(small_dir), "dtype": dtype}})
    proc = CoSteerLogitsProcessor(cfg, torch.device("cpu"), False)
    outs = [[] for _ in range(concurrency)]
    added = []
    for i in range(concurrency):
        text = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       tokenize=False, add_generation_prompt=True)
        params = SimpleNamespace(extra_args={"costeer_context": user_context(i)})
        added.append((i, params, tok(text, add_special_tokens=False)["input_ids"], outs[i]))
    proc.update_state(BatchUpdate(batch_size=concurrency, removed=[], added=added, moved=[]))
    vocab = proc.runner.vocab_size
    g = torch.Generator().manual_seed(0)
    proc.apply(torch.randn(concurrency, vocab, generator=g))  # prefill
    times = []
    for _ in range(steps):
        for o in outs:
            o.append(int(torch.randint(10, min(vocab, len(tok)), (1,), generator=g)))
        logits = torch.randn(concurrency, vocab, generator=g)
        t0 = time.perf_counter()
        proc.apply(logits)
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def table(results):
    lines = ["| c | mode | tok/s (median) | tok/s (best) | latency mean (s) | p50 (s) | TTFT (s) | ms/token (median) | ms/token (best) | bound / steered |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, rows in results["levels"].items():
        bound = rows.get("bound", {})
        for mode in ("plain", "unsteered", "steered"):
            r = rows.get(mode)
            if not r:
                continue
            vs = ""
            if mode == "steered" and bound:
                vs = f"{bound['ms_per_token'] / r['best_ms_per_token']:.2f}"
            lines.append(f"| {c} | {mode} | {r['tok_per_s']:.1f} | {r['best_tok_per_s']:.1f} | {r['latency_mean_s']:.2f} | "
                         f"{r['latency_p50_s']:.2f} | {r['ttft_mean_s']:.3f} | {r['ms_per_token']:.1f} | "
                         f"{r['best_ms_per_token']:.1f} | {vs} |")
        if bound:
            lines.append(f"| {c} | bound: best large alone + small step {bound['small_forward_ms']:.2f} ms + update "
                         f"{bound['update_ms']:.2f} ms (whole apply {bound['processor_apply_ms']:.2f} ms) | | "
                         f"{bound['tok_per_s']:.1f} | | | | | {bound['ms_per_token']:.1f} | 1.00 |")
    lines.append("")
    lines.append("ms/token = request latency / output tokens, per request (c requests decode together). "
                 "`bound / steered` = bound ms/token / best steered ms/token (1.00 = steering costs only the "
                 "small model's own step). Medians and bests over interleaved repeats.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", help="large model folder or preset (default: tiny models built now)")
    ap.add_argument("--small", help="small model folder or preset")
    ap.add_argument("--dtype", default=None, help="engine and small-model dtype (default float32 tiny, bfloat16 real)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(2c, 4))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per level (medians reported)")
    ap.add_argument("--small-steps", type=int, default=40, help="decode steps timed for the small-model bound")
    ap.add_argument("--no-plain", action="store_true", help="skip the processor-free server")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="the processor's `threads` setting (torch threads of the small model in the engine)")
    ap.add_argument("--context-tokens", type=int, default=0,
                    help="personal contexts of about this many tokens (LongLaMP profiles: 1,000-3,000); 0: short")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    import openai

    from costeer_processor.vllm import processor_fqcn
    from costeer_processor.vllm_server import vllm_server

    tiny = args.large is None
    if tiny:
        from costeer_processor.testing import save_tiny_pair

        large_dir, small_dir = save_tiny_pair(Path(tempfile.mkdtemp(prefix="bench_vllm_")))
    else:
        if not args.small:
            ap.error("--small is required with --large")
    dtype = args.dtype or ("float32" if tiny else "bfloat16")
    if not tiny:
        large_dir, small_dir = resolve(args.large, dtype), resolve(args.small, dtype)
    tag = args.tag or ("tiny" if tiny else Path(large_dir).name)
    if args.context_tokens:
        from transformers import AutoTokenizer

        _LONG_CONTEXTS.update(tokens=args.context_tokens, tokenizer=AutoTokenizer.from_pretrained(str(small_dir)))
    max_len = args.max_model_len or (256 if tiny else 2048)
    base_args = ["--dtype", dtype, "--max-model-len", str(max_len), "--max-num-seqs", str(max(args.concurrency)),
                 "--enforce-eager", "--served-model-name", "m", "--disable-log-stats"]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = (str(iomp) + " " + os.environ.get("LD_PRELOAD", "")).strip()
    costeer_args = base_args + ["--logits-processors", processor_fqcn(), "--additional-config",
                                json.dumps({"costeer": {"small_model": str(small_dir), "dtype": dtype,
                                                        **({"threads": args.engine_threads}
                                                           if args.engine_threads else {})}})]

    results = {"large": str(large_dir), "small": str(small_dir), "dtype": dtype, "max_tokens": args.max_tokens,
               "context_tokens": args.context_tokens, "load_average": os.getloadavg(),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "levels": {}}

    def n_for(c):
        return args.requests or max(2 * c, 4)

    modes = ([] if args.no_plain else [("plain", False)]) + [("unsteered", False), ("steered", True)]
    runs: dict = {}
    with contextlib.ExitStack() as stack:
        urls = {}
        if not args.no_plain:
            t0 = time.perf_counter()
            urls["plain"] = stack.enter_context(vllm_server(str(large_dir), base_args, env=env, timeout=900))
            results["plain_server_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        urls["unsteered"] = urls["steered"] = stack.enter_context(
            vllm_server(str(large_dir), costeer_args, env=env, timeout=900))
        results["costeer_server_start_s"] = time.perf_counter() - t0
        clients = {m: openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=3600)
                   for m, u in urls.items()}
        # Repetitions interleave the modes, so load from other processes hits all of them alike.
        for rep in range(args.repeats):
            for c in args.concurrency:
                for mode, steered in modes:
                    r = run_level(clients[mode], "m", c, n_for(c), steered, args.max_tokens)
                    runs.setdefault(str(c), {}).setdefault(mode, []).append(r)
                    print(f"rep {rep} c={c:>2} {mode:<9} {r['tok_per_s']:8.1f} tok/s  {r['ms_per_token']:7.1f} ms/token"
                          f"  latency {r['latency_mean_s']:.2f} s", flush=True)
    for c, per_mode in runs.items():
        for mode, rs in per_mode.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("concurrency", "requests")}
            results["levels"].setdefault(c, {})[mode] = {
                "concurrency": int(c), "requests": rs[0]["requests"], "repeats": len(rs), **med,
                "best_tok_per_s": max(r["tok_per_s"] for r in rs),
                "best_ms_per_token": min(r["ms_per_token"] for r in rs), "runs": rs}

    for c in args.concurrency:
        fwd, upd = small_step_ms(small_dir, dtype, c, args.small_steps, args.threads)
        level = results["levels"][str(c)]
        base = level.get("plain") or level["unsteered"]
        per_token = base["best_ms_per_token"] + fwd + upd
        level["bound"] = {"small_forward_ms": fwd, "update_ms": upd, "ms_per_token": per_token,
                          "tok_per_s": 1000 * c / per_token}
        level["bound"]["processor_apply_ms"] = proc_ms = processor_step_ms(
            large_dir, small_dir, dtype, c, args.small_steps, args.threads)
        print(f"c={c:>2} small step {fwd:.2f} ms + update {upd:.2f} ms; whole processor apply {proc_ms:.2f} ms",
              flush=True)

    text = table(results)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_vllm_{tag}.json").write_text(json.dumps(results, indent=2))
    (out / f"bench_vllm_{tag}.md").write_text(text + "\n")
    print(f"\nwrote {out / f'bench_vllm_{tag}.json'}")


if __name__ == "__main__":
    main()
