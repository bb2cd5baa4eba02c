"""``costeer proxy`` vs :class:`SplitCoSteerClient` in-process: tokens/s at 1, 4 and 8 concurrent clients.

Same run, same upstream (a loopback ``vllm serve`` of the large model), same small model and
settings: for each concurrency ``c`` and each repeat,

* **in-process**: ``SplitCoSteerClient.generate_batch`` over ``c`` prompts (one completion request
  and one batched small-model step per round: the best a single process can do);
* **proxy**: ``costeer proxy`` started as a command (its own process, as deployed), ``c`` clients
  with the official ``openai`` package each sending one chat request at the same moment; the
  proxy's scheduler batches them into the same rounds.

tok/s = generated tokens / wall time from the first request to the last answer; the two are
run alternately and the median of the repeats is reported. ``overhead = 1 - proxy / in-process``.
The proxy's token ids are checked against the in-process ones (greedy: they must be equal).

Usage::

    python benchmarks/bench_proxy.py --quick      # tiny random-weight pair built on the spot (minutes)
    python benchmarks/bench_proxy.py --large qwen2.5-coder-1.5b-instruct --small qwen2.5-coder-0.5b-instruct \\
        --dtype bfloat16 --new-tokens 32 --repeats 3
    python benchmarks/bench_proxy.py --upstream http://127.0.0.1:8000 --small DIR   # a running upstream

Writes ``benchmarks/results/bench_proxy_<tag>.json`` and ``.md`` (``--out`` for another JSON path).
See ``docs/proxy.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Suggest a dinner recipe for tonight.", "Plan my Saturday.", "Give me three tips to learn a language.",
           "Tell me about the history of tea.", "Write a short story about a dragon.", "Explain how rainbows form.",
           "What should I read next?", "How do I start running?"]
CONTEXTS = ["I am vegan and I love spicy food.", "I hate crowds and I love mountains.",
            "I prefer short, practical answers.", "I am a history teacher who loves tea.",
            "My children are five and seven.", "I am a physics student.", "I love science fiction and poetry.",
            "I have a bad knee and little time."]


def resolve(name: str, dtype: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    from costeer_processor.models import resolve_model

    return Path(resolve_model(name, dtype))


@contextlib.contextmanager
def proxy_process(upstream: str, small_dir: Path, dtype: str, threads: int, args) -> str:
    from costeer_processor.vllm_server import free_port, stop_process

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="bench_proxy_", suffix=".log")[1])
    cmd = [sys.executable, "-m", "costeer_processor", "proxy", "--upstream", upstream, "--small", str(small_dir),
           "--port", str(port), "--dtype", dtype, "--temperature", "0", "--log-level", "warning",
           "--top-logprobs", str(args.top_logprobs), "--lookahead", str(args.lookahead)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("costeer proxy did not start:\n" + log.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        stop_process(proc)


def run_proxy(url: str, model: str, c: int, new_tokens: int) -> tuple[float, int, list[list[int]]]:
    import openai

    clients = [openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) for _ in range(c)]
    out, barrier = [None] * c, threading.Barrier(c + 1)

    def one(i):
        barrier.wait()
        res = clients[i].chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=new_tokens,
            temperature=0, extra_body={"costeer_context": CONTEXTS[i % len(CONTEXTS)], "return_token_ids": True})
        out[i] = res.model_extra["costeer"]["token_ids"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if any(o is None for o in out):
        raise RuntimeError("a proxy request failed")
    return wall, sum(len(o) for o in out), out


def run_inprocess(client, c: int, new_tokens: int) -> tuple[float, int, list[list[int]]]:
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(c)]
    contexts = [CONTEXTS[i % len(CONTEXTS)] for i in range(c)]
    t0 = time.perf_counter()
    res = client.generate_batch(prompts, contexts, new_tokens)
    wall = time.perf_counter() - t0
    return wall, sum(len(r.token_ids) for r in res), [r.token_ids for r in res]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random-weight pair (float32), built on the spot")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default=None, help="default: float32 with --quick, else bfloat16")
    ap.add_argument("--upstream", default=None, help="use this running upstream instead of starting one")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 24 (--quick: 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import signal

    import torch

    from costeer_processor.split import SplitCoSteerClient, load_runner

    if argv is None:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so the servers are stopped on `timeout`
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    new_tokens = args.new_tokens or (32 if args.quick else 24)
    if args.quick:
        from costeer_processor.testing import save_tiny_pair

        large_dir, small_dir = save_tiny_pair(Path(tempfile.mkdtemp(prefix="bench_proxy_")))
    else:
        small_dir = resolve(args.small, dtype)
        large_dir = None if args.upstream else resolve(args.large, dtype)
    tag = args.tag or ("tiny" if args.quick else Path(large_dir or "upstream").name)
    levels = [int(x) for x in args.concurrency.split(",")]
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "large": str(large_dir or args.upstream),
              "small": str(small_dir), "dtype": dtype, "new_tokens": new_tokens, "threads": args.threads,
              "top_logprobs": args.top_logprobs, "lookahead": args.lookahead, "repeats": args.repeats,
              "load_average_start": os.getloadavg(),
              "command": "python benchmarks/bench_proxy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": []}
    if args.upstream:
        upstream_cm = contextlib.nullcontext(args.upstream)
    else:
        from costeer_processor.vllm_server import vllm_server

        server_args = ["--dtype", dtype, "--max-logprobs", "-1", "--enable-prefix-caching",
                       "--max-model-len", "512" if args.quick else "2048", "--served-model-name", "bench-large"]
        if not torch.cuda.is_available():
            server_args += ["--block-size", "32"]
        upstream_cm = vllm_server(str(large_dir), server_args,
                                  env={"VLLM_CPU_KVCACHE_SPACE": "1" if args.quick else "2"})
    runner = load_runner(small_dir, dtype=dtype)
    with upstream_cm as upstream, proxy_process(upstream, small_dir, dtype, args.threads, args) as url:
        client = SplitCoSteerClient(upstream, runner, top_logprobs=args.top_logprobs, lookahead=args.lookahead)
        run_inprocess(client, 1, 4)  # warm both paths (connections, prefix cache of the prompts)
        model = client.model
        run_proxy(url, model, max(levels), 4)
        for c in levels:
            runs = {"in_process": [], "proxy": []}
            equal = 0
            for rep in range(args.repeats):
                order = (("in_process", "proxy") if rep % 2 == 0 else ("proxy", "in_process"))
                ids = {}
                for kind in order:
                    wall, tokens, ids[kind] = (run_inprocess(client, c, new_tokens) if kind == "in_process"
                                               else run_proxy(url, model, c, new_tokens))
                    runs[kind].append(tokens / wall)
                equal += sum(a == b for a, b in zip(ids["in_process"], ids["proxy"]))
            row = {"concurrency": c,
                   "in_process_tok_s": round(statistics.median(runs["in_process"]), 3),
                   "proxy_tok_s": round(statistics.median(runs["proxy"]), 3),
                   "runs": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
                   "equal_answers": f"{equal}/{c * args.repeats}"}
            row["overhead"] = round(1 - row["proxy_tok_s"] / row["in_process_tok_s"], 4)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        import httpx

        result["proxy_stats"] = httpx.get(url + "/stats").json()
        client.close()
    result["load_average_end"] = os.getloadavg()
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_proxy_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# bench_proxy ({tag})", "", f"`{result['command']}`", "",
             f"{result['machine']}, {dtype}, {new_tokens} new tokens, top-{args.top_logprobs} + certificate, "
             f"look-ahead {args.lookahead}, median of {args.repeats}; load average "
             f"{result['load_average_start'][0]:.1f} -> {result['load_average_end'][0]:.1f}", "",
             "| clients | in-process tok/s | proxy tok/s | overhead | equal answers |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['in_process_tok_s']:.2f} | {r['proxy_tok_s']:.2f} | {r['overhead']:+.1%} | "
              f"{r['equal_answers']} |" for r in result["rows"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
