"""Split mode (large model on an unmodified ``vllm serve``, small model + context here): fidelity and speed.

Fidelity: with full-vocabulary log-probs split mode is exact CoSteer; with the top ``k`` only,
steering runs over those candidates. For each k this reports, against the full-vocabulary
answer of the same prompt (greedy): the exact-match rate and the mean matched-prefix fraction
(``common prefix / longer answer``).

Speed (tokens/s, batch 1 unless said, same machine): the in-process Hugging Face processor vs
split mode with and without each round-trip saving (overlap, look-ahead, top-k, gating hand-off,
batching), on loopback and through a proxy that adds a simulated network round-trip time.

Usage::

    python benchmarks/bench_split.py                                  # tiny models built on the spot
    python benchmarks/bench_split.py --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \\
        --dtype bfloat16 --prompts 12 --new-tokens 32 --speed-prompts 3
    python benchmarks/bench_split.py --server http://127.0.0.1:8000   # a server that is already running

Writes ``benchmarks/results/bench_split_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from costeer_processor.small_model import common_prefix_length  # noqa: E402
from costeer_processor.eval.tasks import load_preference_prompts  # noqa: E402
from costeer_processor.core import Variants  # noqa: E402
from costeer_processor.hf import CoSteerLogitsProcessor  # noqa: E402
from costeer_processor.loading import load_model  # noqa: E402
from costeer_processor.split import SplitCoSteerClient, Transport, load_runner  # noqa: E402
from costeer_processor.testing import LoopbackProxy  # noqa: E402

PREFS = ["concise", "creative", "uplifting", "verbose"]


def load_prompts(n: int) -> list[tuple[str, str]]:
    """(prompt, context) pairs: the Personal Preference Eval prompts (shipped with the package) with a
    stated preference as context."""
    prompts = [row["input"] for row in load_preference_prompts()]
    prompts = (prompts * (n // len(prompts) + 1))[:n]
    return [(p, f"Your answer should be as {PREFS[i % len(PREFS)]} as possible") for i, p in enumerate(prompts)]


def resolve(name: str, dtype: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    from costeer_processor.models import resolve_model

    return resolve_model(name, dtype=dtype)


# ------------------------------------------------------------------ measurements
common_prefix = common_prefix_length


def fidelity(url, runner, pairs, ks, new_tokens, batch, lookahead, reference="full", validate=0, certified_rows=True):
    """Top-k (with and without the certificate) against the full-vocabulary answers."""
    def answers(subset, **kw):
        # Full-vocabulary answers are megabytes per position on a 150k vocabulary: one position per request.
        la = 1 if (kw.get("top_logprobs") is None and runner.vocab_size > 50_000) else lookahead
        client = SplitCoSteerClient(url, runner, lookahead=la, timeout=600, **kw)
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(subset), batch):
            chunk = subset[i:i + batch]
            out += client.generate_batch([p for p, _ in chunk], [c for _, c in chunk], max_new_tokens=new_tokens)
        client.close()
        return out, time.perf_counter() - t0

    rows = []
    if reference == "full":
        ref, t = answers(pairs)
        rows.append({"mode": "full vocabulary (reference)", "k": "all", "seconds": round(t, 1)})
    else:  # the certified top-k answer is the full-vocabulary argmax by construction; check it on a subset
        ref, t = answers(pairs, top_logprobs=max(ks))
        rows.append({"mode": f"certified top-{max(ks)} (reference)", "k": max(ks), "seconds": round(t, 1)})
        if validate:
            full, tf = answers(pairs[:validate])
            same = sum(a.token_ids == b.token_ids for a, b in zip(full, ref))
            rows.append({"mode": f"check: full vocabulary on {validate} prompts", "k": "all",
                         "exact_match": round(same / validate, 3), "seconds": round(tf, 1)})
    print(f"  {rows[-1]}", flush=True)
    ref_ids = [r.token_ids for r in ref]

    def compare(mode, k, got, t):
        ids = [r.token_ids for r in got]
        tokens = max(1, sum(len(x) for x in ids))
        row = {"mode": mode, "k": k,
               "exact_match": round(sum(a == b for a, b in zip(ref_ids, ids)) / len(ids), 3),
               "prefix_fraction": round(sum(common_prefix(a, b) / max(len(a), len(b), 1)
                                            for a, b in zip(ref_ids, ids)) / len(ids), 3),
               "escalations_per_token": round(sum(r.escalations for r in got) / tokens, 3),
               "seconds": round(t, 1)}
        rows.append(row)
        print(f"  {row}", flush=True)

    for k in ks:
        compare("top-k only", k, *answers(pairs, top_logprobs=k, certify=False))
        if certified_rows and not (reference != "full" and k == max(ks)):
            compare("top-k + certificate", k, *answers(pairs, top_logprobs=k))
    return rows


def hf_speed(large, tok, runner, pairs, new_tokens, batch=1, gate=None):
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        proc = CoSteerLogitsProcessor(runner, [c for _, c in chunk], variants=Variants(gate_threshold=gate))
        texts = [runner.splicer.render(p) for p, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = large.generate(**enc, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        for row in gen.tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t == tok.eos_token_id:
                    n = j + 1
                    break
            tokens += n
    return tokens, time.perf_counter() - t0


def split_speed(url, runner, pairs, new_tokens, batch=1, **kw):
    client = SplitCoSteerClient(url, runner, timeout=600, **kw)
    tokens = rt = handed = 0
    t0 = time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        for r in client.generate_batch([p for p, _ in chunk], [c for _, c in chunk], max_new_tokens=new_tokens):
            tokens += len(r.token_ids)
            handed += r.handoff_at is not None
    dt = time.perf_counter() - t0
    rt = client.requests_made
    client.close()
    return tokens, dt, rt, handed


def server_alone_speed(url, model, prompt_ids, new_tokens):
    """The large model alone on the server (one plain request per prompt): the upper bound."""
    http_ = Transport(url, 600)
    tokens, t0 = 0, time.perf_counter()
    for ids in prompt_ids:
        ans = http_.json("POST", "/v1/completions", {"model": model, "prompt": ids, "max_tokens": new_tokens,
                                                      "temperature": 0, "return_token_ids": True})
        tokens += len(ans["choices"][0]["token_ids"])
    return tokens, time.perf_counter() - t0


SPLIT_CONFIGS = {  # name: (label, client options, batched?)
    "full-la1-nooverlap": ("split full vocab, look-ahead 1, no overlap", dict(lookahead=1, overlap=False), False),
    "full-la1": ("split full vocab, look-ahead 1", dict(lookahead=1), False),
    "full-la4": ("split full vocab, look-ahead <=4 (adaptive)", dict(lookahead=4), False),
    "full-la4-fixed": ("split full vocab, look-ahead 4 (fixed)", dict(lookahead=4, adaptive_lookahead=False), False),
    "full-la4-batch": ("split full vocab, look-ahead <=4, batch {b}", dict(lookahead=4), True),
    "top20-la1-nooverlap": ("split top-20+cert, look-ahead 1, no overlap",
                            dict(lookahead=1, top_logprobs=20, overlap=False), False),
    "top20-la1": ("split top-20+cert, look-ahead 1", dict(lookahead=1, top_logprobs=20), False),
    "top20-la4": ("split top-20+cert, look-ahead <=4 (adaptive)", dict(lookahead=4, top_logprobs=20), False),
    "top20-la4-fixed": ("split top-20+cert, look-ahead 4 (fixed)",
                        dict(lookahead=4, top_logprobs=20, adaptive_lookahead=False), False),
    "top100-la4": ("split top-100+cert, look-ahead <=4 (adaptive)", dict(lookahead=4, top_logprobs=100), False),
    "top20-la4-gate": ("split top-20+cert, look-ahead <=4, gate 0.1/3",
                       dict(lookahead=4, top_logprobs=20, variants=Variants(gate_threshold=0.1)), False),
    "top20-la4-batch": ("split top-20+cert, look-ahead <=4, batch {b}", dict(lookahead=4, top_logprobs=20), True),
}
ALL_CONFIGS = ["hf", "hf-gate", "hf-batch", "server-alone", *SPLIT_CONFIGS]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="tiny", help="'tiny', a model folder or a preset name")
    ap.add_argument("--small", default="tiny")
    ap.add_argument("--dtype", default=None, help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--server", default=None, help="use this running server instead of starting one")
    ap.add_argument("--prompts", type=int, default=24, help="prompts for the fidelity study")
    ap.add_argument("--speed-prompts", type=int, default=6, help="prompts for the speed study")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 20, 100])
    ap.add_argument("--batch", type=int, default=4, help="batch size for the batched rows")
    ap.add_argument("--fidelity-lookahead", type=int, default=1)
    ap.add_argument("--fidelity-batch", type=int, default=1,
                    help="prompts per request in the fidelity study (vLLM's CPU bf16 kernels are not batch-invariant: "
                         "compare like with like)")
    ap.add_argument("--rtt-ms", type=float, nargs="*", default=[20.0], help="simulated round-trip times")
    ap.add_argument("--phases", nargs="+", default=["fidelity", "speed", "rtt"])
    ap.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS,
                    help="speed configurations to run")
    ap.add_argument("--reference", choices=["full", "certified"], default="full",
                    help="fidelity reference: full-vocabulary answers, or certified top-max(k) answers "
                         "(exact by construction; cheaper on a 150k vocabulary)")
    ap.add_argument("--validate-full", type=int, default=0,
                    help="with --reference certified: also run full vocabulary on this many prompts to check")
    ap.add_argument("--no-certified-rows", action="store_true",
                    help="fidelity: skip the 'top-k + certificate' rows (exact by construction) to save time")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so the vLLM server is stopped on `timeout`
    torch.set_num_threads(args.threads)

    tiny = args.large == "tiny"
    dtype = args.dtype or ("float32" if tiny else "bfloat16")
    if tiny:
        from costeer_processor.testing import save_tiny_pair

        large_dir, small_dir = save_tiny_pair(Path(tempfile.mkdtemp(prefix="bench_split_")))
    else:
        large_dir, small_dir = resolve(args.large, dtype), resolve(args.small, dtype)
    tag = args.tag or ("tiny" if tiny else f"{Path(large_dir).name}")
    runner = load_runner(small_dir, dtype=dtype, context_position="after", context_separator="\n")
    tok = runner.tokenizer
    pairs = load_prompts(max(args.prompts, args.speed_prompts))
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "large": str(large_dir),
              "small": str(small_dir), "dtype": dtype, "new_tokens": args.new_tokens, "threads": args.threads,
              "load_average_start": os.getloadavg(),
              "command": "python benchmarks/bench_split.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "fidelity_prompts": args.prompts if "fidelity" in args.phases else 0}

    import contextlib

    if args.server:
        server_cm = contextlib.nullcontext(args.server)
    else:
        from costeer_processor.vllm_server import vllm_server

        server_args = ["--dtype", dtype, "--max-logprobs", "-1", "--enable-prefix-caching",
                       "--max-model-len", "512" if tiny else "2048", "--served-model-name", "bench-large"]
        if not torch.cuda.is_available():
            server_args += ["--block-size", "32"]  # CPU default 128 leaves short prompts without cache hits
        server_cm = vllm_server(str(large_dir), server_args, env={"VLLM_CPU_KVCACHE_SPACE": "1" if tiny else "2"})
    with server_cm as url:
        print(f"server {url}", flush=True)
        warm = SplitCoSteerClient(url, runner)
        warm.generate(pairs[0][0], pairs[0][1], max_new_tokens=4)
        model_name = warm.model
        warm.close()

        if "fidelity" in args.phases:
            print(f"fidelity: {args.prompts} prompts x {args.new_tokens} tokens", flush=True)
            result["fidelity"] = fidelity(url, runner, pairs[:args.prompts], args.ks, args.new_tokens, args.fidelity_batch,
                                          args.fidelity_lookahead, args.reference, args.validate_full,
                                          certified_rows=not args.no_certified_rows)

        speed_pairs = pairs[:args.speed_prompts]
        rows = []

        def record(name, tokens, dt, rt=None, handed=None, where="loopback"):
            row = {"config": name, "where": where, "tokens": tokens, "seconds": round(dt, 2),
                   "tok_per_s": round(tokens / dt, 2)}
            if rt is not None:
                row["round_trips_per_token"] = round(rt / max(tokens, 1), 3)
            if handed:
                row["handed_off"] = handed
            rows.append(row)
            print(f"  {where:>9} {name:<42} {row['tok_per_s']:7.2f} tok/s  rt/token {row.get('round_trips_per_token', '-')}",
                  flush=True)

        wanted = set(args.configs)
        if "speed" in args.phases:
            print(f"speed: {len(speed_pairs)} prompts x {args.new_tokens} tokens", flush=True)
            if wanted & {"hf", "hf-gate", "hf-batch"}:
                large = load_model(large_dir, dtype)
                hf_speed(large, tok, runner, speed_pairs[:1], 4)  # warm-up
                if "hf" in wanted:
                    record("in-process HF processor", *hf_speed(large, tok, runner, speed_pairs, args.new_tokens))
                if "hf-gate" in wanted:
                    record("in-process HF processor, gate 0.1/3",
                           *hf_speed(large, tok, runner, speed_pairs, args.new_tokens, gate=0.1))
                if "hf-batch" in wanted:
                    record(f"in-process HF processor, batch {args.batch}",
                           *hf_speed(large, tok, runner, speed_pairs, args.new_tokens, batch=args.batch))
                del large
            if "server-alone" in wanted:
                prompt_ids = [runner.encode_branches(p, c)[1] for p, c in speed_pairs]
                record("server alone (large model, no steering)",
                       *server_alone_speed(url, model_name, prompt_ids, args.new_tokens))
            for name in args.configs:
                if name in SPLIT_CONFIGS:
                    label, kw, batch = SPLIT_CONFIGS[name]
                    record(label.format(b=args.batch),
                           *split_speed(url, runner, speed_pairs, args.new_tokens, batch=args.batch if batch else 1,
                                        **kw))
        if "rtt" in args.phases:
            for rtt in args.rtt_ms:
                proxy = LoopbackProxy(url, delay=rtt / 1000.0)  # a simulated network
                where = f"rtt {rtt:g}ms"
                print(f"speed through a {rtt:g} ms round-trip proxy", flush=True)
                for name in args.configs:
                    if name in SPLIT_CONFIGS and "nooverlap" not in name:
                        label, kw, batch = SPLIT_CONFIGS[name]
                        record(label.format(b=args.batch),
                               *split_speed(proxy.url, runner, speed_pairs, args.new_tokens,
                                            batch=args.batch if batch else 1, **kw), where=where)
                proxy.close()
        result["speed"] = rows
    result["load_average_end"] = os.getloadavg()

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_split_{tag}.json").write_text(json.dumps(result, indent=2))
    md = [f"# bench_split ({tag}, {dtype}, {result['machine']}, {args.new_tokens} new tokens)", "",
          f"`{result['command']}`", ""]
    if "fidelity" in result:
        md += [f"Fidelity over {args.prompts} prompts (greedy).", ""]
    if "fidelity" in result:
        md += ["| mode | k | exact match | mean matched-prefix fraction | extra requests / token | seconds |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['mode']} | {r['k']} | {r.get('exact_match', '')} | {r.get('prefix_fraction', '')} | "
               f"{r.get('escalations_per_token', '')} | {r['seconds']} |" for r in result["fidelity"]]
        md.append("")
    if rows:
        md += ["| where | configuration | tok/s | round trips / token |", "|---|---|---|---|"]
        md += [f"| {r['where']} | {r['config']} | {r['tok_per_s']:.2f} | {r.get('round_trips_per_token', '-')} |"
               for r in rows]
    (out / f"bench_split_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
