"""A/B: one benchmark script run for an earlier commit and for this checkout, interleaved, in one run.

The earlier commit's tree (package and benchmarks) is exported with ``git archive`` into a
temporary folder; each round runs ``benchmarks/<script>`` of the earlier tree (its own package
first on ``PYTHONPATH``) and then of this checkout, with the same arguments, so both see the same
machine state (rounds interleave: A B A B ...). Each run writes its usual JSON into its own tree's
``benchmarks/results/``; this script copies them as ``ab_<script>_<label>_<round>.json`` and prints
where they are, with the load average before every run.

    python benchmarks/bench_ab.py --base f2b9c2d --rounds 2 -- bench_hf.py --large qwen2.5-coder-1.5b-instruct \\
        --small qwen2.5-coder-0.5b-instruct --batch-sizes 1 8 --new-tokens 32 --repeats 2 --loop-batches
    python benchmarks/bench_ab.py --base f2b9c2d bench_update.py -- --rows 16 --repeats 10 \
        --out benchmarks/results/bench_update_{tag}.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """``rev``'s package and benchmarks as files under ``into`` (nothing of this checkout is touched)."""
    archive = into / "tree.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "costeer_processor", "benchmarks"], stdout=f,
                       check=True)
    with tarfile.open(archive) as t:
        t.extractall(into / "tree", filter="data")
    return into / "tree"


def run(tree: Path, script: str, args: list[str], tag: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = tree / "benchmarks" / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*.json")} if results.exists() else {}
    load = os.getloadavg()
    start = time.perf_counter()
    # "{tag}" in the arguments is replaced (e.g. an --out path); otherwise the script gets --tag
    argv = [x.replace("{tag}", tag) for x in args] if any("{tag}" in x for x in args) else [*args, "--tag", tag]
    results.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *argv], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    written = [p for p in results.glob("*.json") if before.get(p) != p.stat().st_mtime]
    return {"tree": str(tree), "seconds": seconds, "load_before": load, "stdout": proc.stdout[-4000:],
            "results": {p.name: json.loads(p.read_text()) for p in written}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the earlier commit (A)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--quick", action="store_true", help="one round (a check that the A/B runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("script", help="a script of benchmarks/ (e.g. bench_hf.py)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    a = ap.parse_args()
    args = [x for x in a.args if x != "--"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"A": export(a.base, Path(tmp)), "B": ROOT}
        runs = []
        for r in range(1 if a.quick else a.rounds):
            for label, tree in trees.items():
                tag = f"ab_{label}_{r}"
                res = run(tree, a.script, args, tag, a.timeout)
                runs.append({"label": label, "round": r, **res})
                print(f"round {r} {label}: {res['seconds']:.1f} s, load {res['load_before'][0]:.2f}", flush=True)
                if tree != ROOT:  # the earlier tree's results live in the temporary folder: keep a copy
                    for name in res["results"]:
                        shutil.copy(tree / "benchmarks" / "results" / name, out / name)
    summary = {"base": a.base, "head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                      capture_output=True, text=True).stdout.strip(),
               "script": a.script, "args": args, "runs": runs}
    path = out / f"ab_{Path(a.script).stem}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
