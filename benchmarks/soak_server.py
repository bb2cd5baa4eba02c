"""Soak test of a CoSteer ``vllm serve`` on loopback: many steered requests, aborted streams, flat memory.

Starts a real vLLM OpenAI server with the CoSteer processor over the tiny test pair (or ``--large`` /
``--small`` folders), then sends ``--requests`` chat requests over HTTP with ``--concurrency``
threads: ``--contexts`` distinct personal contexts, mixed ``max_tokens``, and ``--abort-frac`` of them
streamed and closed after a few chunks. It reports unexpected errors (every request here is valid,
so any non-200 counts), the engine processes' RSS and the small-model runner's stats (written by
the engine to ``COSTEER_STATS_FILE``) after a warm-up and at the end. Bounded: it stops by itself.

Usage::

    python benchmarks/soak_server.py                                  # 2,000 requests, concurrency 16
    python benchmarks/soak_server.py --requests 60 --concurrency 4    # a short run (the test suite does this)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["dinner", "tea", "dragons", "chess", "rain", "bread", "rivers", "music", "gardens", "trains", "autumn",
          "coffee", "stars", "cities", "forests", "oceans"]
USERS = ["Suggest a dinner recipe.", "Tell me about the history of tea.", "Write a story about a dragon.",
         "Plan my weekend.", "Recommend a book."]


def contexts(n: int) -> list[str]:
    return [f"I love {TOPICS[i % len(TOPICS)]} and answer warmly. Profile {i}. " * (1 + i % 4) for i in range(n)]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out.extend(kids)
            todo.extend(kids)
    return out


def find_server(port: str):
    """The pid of the ``vllm serve`` process listening on ``port`` (from /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and port.encode() in args:
            return int(cmdline.parent.name)
    return None


def rss_mib(pids) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def read_stats(path: Path) -> list:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def one_request(client, i: int, ctxs: list[str], rng: random.Random, abort_frac: float) -> str:
    import openai

    messages = [{"role": "user", "content": USERS[i % len(USERS)]}]
    extra = {"extra_body": {"vllm_xargs": {"costeer_context": ctxs[i % len(ctxs)]}}}
    max_tokens = rng.choice([4, 8, 16, 32, 48])
    try:
        if rng.random() < abort_frac:
            stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=64, temperature=0.0,
                                                    stream=True, **extra)
            for k, _ in enumerate(stream):
                if k >= 2:
                    break
            stream.close()  # the server sees the connection go: vLLM aborts the request
            return "aborted"
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0.0,
                                           **extra)
        return "ok" if r.choices[0].message.content is not None else "empty"
    except openai.APIStatusError as e:
        return f"http {e.status_code}: {str(e)[:120]}"
    except openai.APIConnectionError as e:
        return f"connection: {e}"


def timed_request(client, i: int, ctxs: list[str]) -> float:
    t0 = time.perf_counter()
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": USERS[i % len(USERS)]}],
                                   max_tokens=8, temperature=0.0,
                                   extra_body={"vllm_xargs": {"costeer_context": ctxs[i % len(ctxs)]}})
    return time.perf_counter() - t0


def huge_context_phase(client, ctxs: list[str], mb: float) -> dict:
    """Latency of other users' requests while oversize contexts are refused (they must not be held up)."""
    import openai

    huge = "spicy food and mountains " * int(mb * 2**20 / 25)
    with ThreadPoolExecutor(8) as pool:
        alone = list(pool.map(lambda i: timed_request(client, i, ctxs), range(32)))

    def refused(_):
        t0 = time.perf_counter()
        try:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body={"vllm_xargs": {"costeer_context": huge}})
        except openai.BadRequestError:
            return time.perf_counter() - t0
        raise AssertionError("a huge context was accepted")

    with ThreadPoolExecutor(12) as pool:
        refusals = [pool.submit(refused, k) for k in range(4)]
        during = list(pool.map(lambda i: timed_request(client, i, ctxs), range(32)))
        refuse_s = [f.result() for f in refusals]
    med = statistics.median
    return {"context_mb": mb, "others_median_s_alone": med(alone), "others_max_s_alone": max(alone),
            "others_median_s_during": med(during), "others_max_s_during": max(during),
            "refusal_s": refuse_s}


def run(args) -> dict:
    import openai

    from costeer_processor.testing import save_tiny_pair
    from costeer_processor.vllm import processor_fqcn
    from costeer_processor.vllm_server import vllm_server

    work = Path(tempfile.mkdtemp(prefix="costeer_soak_"))
    large, small = (Path(args.large), Path(args.small)) if args.large else save_tiny_pair(work / "pair")
    stats_file = work / "runner_stats.json"
    server_args = ["--logits-processors", processor_fqcn(),
                   "--additional-config", json.dumps({"costeer": {"small_model": str(small)}}),
                   "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", str(args.concurrency),
                   "--enforce-eager", "--served-model-name", "tiny", "--disable-log-stats"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "COSTEER_STATS_FILE": str(stats_file)}
    rng = random.Random(0)
    ctxs = contexts(args.contexts)
    t_start = time.monotonic()
    with vllm_server(str(large), server_args, env=env, timeout=600, log_path=work / "vllm.log") as base:
        server_pid = find_server(base.rsplit(":", 1)[1])
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
        lock = threading.Lock()
        outcomes: dict[str, int] = {}

        def batch(indices):
            with ThreadPoolExecutor(args.concurrency) as pool:
                for res in pool.map(lambda i: one_request(client, i, ctxs, random.Random(i), args.abort_frac),
                                    indices):
                    key = res if res in ("ok", "aborted", "empty") else "error"
                    with lock:
                        outcomes[key] = outcomes.get(key, 0) + 1
                        if key == "error" and outcomes[key] <= 5:
                            print("unexpected:", res, flush=True)

        huge = huge_context_phase(client, ctxs, args.huge_context_mb) if args.huge_context_mb else None
        warm = min(args.warmup, args.requests)
        batch(range(warm))
        time.sleep(1.5)
        pids = descendants(server_pid) if server_pid else []
        before = {"rss_mib": rss_mib(pids), "runner": read_stats(stats_file)}
        batch(range(warm, args.requests))
        time.sleep(1.5)
        # vLLM hands finished / aborted requests to the processor at its next step: one more plain request
        # makes it clean up (and the engine then writes its stats with nothing left in the runner)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        time.sleep(1.5)
        after = {"rss_mib": rss_mib(pids), "runner": read_stats(stats_file)}
    elapsed = time.monotonic() - t_start
    result = {"requests": args.requests, "concurrency": args.concurrency, "contexts": args.contexts,
              "abort_frac": args.abort_frac, "huge_context": huge, "outcomes": outcomes, "unexpected_errors": outcomes.get("error", 0),
              "before": before, "after": after, "elapsed_s": elapsed, "load_average": os.getloadavg(),
              "rss_growth": (after["rss_mib"] / before["rss_mib"] - 1) if before["rss_mib"] else None}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--abort-frac", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--huge-context-mb", type=float, default=20.0,
                   help="first, time 32 small requests alone and while 4 requests with a context this large are "
                        "refused (0: skip)")
    p.add_argument("--large", default=None)
    p.add_argument("--small", default=None)
    p.add_argument("--out", default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
