"""The CoSteer update alone: the one-pass form (`steer`) vs the three-log_softmax definition
(`steer_careful`, the code before the one-pass rewrite) vs the release's 20-step loop, side by side.

Usage::

    python benchmarks/bench_update.py                       # 16 rows x 151,936 (Qwen2.5 width), float32 and bf16
    python benchmarks/bench_update.py --rows 1 8 16 32 --width 151936 --repeats 30

Prints a markdown table (median ms per call, ratio careful / one-pass) and writes
``benchmarks/results/bench_update.json``. On a CUDA machine pass ``--device cuda``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from costeer_processor.core import CoSteerConfig, ftrl_reference, steer, steer_careful  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(rows: int, width: int, dtype: torch.dtype, device: str, repeats: int, with_loop: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(rows)
    large, zw, zo = (torch.randn(rows, width, generator=g).mul_(4).to(device=device, dtype=dtype) for _ in range(3))
    gain = CoSteerConfig().gain
    out = {"rows": rows, "width": width, "dtype": str(dtype).replace("torch.", ""),
           "one_pass_ms": time_call(lambda: steer(large, zw, zo, gain), device, repeats),
           "careful_ms": time_call(lambda: steer_careful(large, zw, zo, gain), device, repeats)}
    out["speedup"] = out["careful_ms"] / out["one_pass_ms"]
    if with_loop:
        out["loop_ms"] = time_call(lambda: ftrl_reference(large, zw, zo, CoSteerConfig(), dtype=torch.float32),
                                   device, max(3, repeats // 10))
    err = (steer(large, zw, zo, gain) - steer_careful(large, zw, zo, gain)).abs().max().item()
    out["max_abs_diff"] = err
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--width", type=int, default=151_936)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--loop", action="store_true", help="also time the 20-step FTRL loop (slow)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_update.json"))
    args = p.parse_args(argv)
    results = [measure(r, args.width, getattr(torch, d), args.device, args.repeats, args.loop)
               for d in args.dtypes for r in args.rows]
    meta = {"command": "python benchmarks/bench_update.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, {torch.get_num_threads()} threads, device {args.device}",
            "load_average": os.getloadavg()}
    print(f"| rows x width | dtype | one-pass ms | careful ms | careful / one-pass |{' loop ms |' if args.loop else ''}")
    print(f"|---|---|---|---|---|{'---|' if args.loop else ''}")
    for r in results:
        loop = f" {r['loop_ms']:.2f} |" if args.loop else ""
        print(f"| {r['rows']} x {r['width']:,} | {r['dtype']} | {r['one_pass_ms']:.2f} | {r['careful_ms']:.2f} | "
              f"{r['speedup']:.2f}x |{loop}")
    print(f"\n{meta['machine']}; load average {meta['load_average']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
