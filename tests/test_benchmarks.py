"""The benchmark scripts keep working (tiny models, CPU): numbers are measured, never asserted."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_on_cpu_with_tiny_models(tmp_path):
    result = load("gpu_hf").main(["--tiny", "--batch-sizes", "1", "2", "--new-tokens", "3", "--repeats", "1",
                                  "--small-steps", "2", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["context_tokens"] > 0  # the with-context branch really is longer
        assert r["plain_tok_s"] > 0 and r["steered_tok_s"] > 0 and r["small_step_ms"] > 0 and r["update_ms"] > 0
    assert (tmp_path / "gpu_hf.json").is_file() and "| batch |" in (tmp_path / "gpu_hf.md").read_text()


def test_update_benchmark_compares_both_forms(tmp_path):
    results = load("bench_update").main(["--rows", "2", "--width", "4096", "--repeats", "2",
                                         "--dtypes", "float32", "--out", str(tmp_path / "u.json")])
    (r,) = results
    assert r["one_pass_ms"] > 0 and r["careful_ms"] > 0
    assert r["max_abs_diff"] < 1e-4  # the two forms agree


def test_small_runner_benchmark_reports_memory_speed_and_reuse(tmp_path):
    out = load("bench_small_runner").main(["--shape", "mini", "--users", "2", "--long-tokens", "150",
                                           "--short-tokens", "10", "--steps", "3", "--dtype", "float32",
                                           "--runners", "packed", "--out", str(tmp_path / "r.json")])
    rows = {r["contexts"]: r for r in out["results"]}
    assert set(rows) == {"short", "long"}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["prefill_s"] > 0 and r["kv_mib"] > 0 and r["reuse_prefill_s"] > 0
        assert 1.0 <= r["kv_over_needed"]  # never less than the tokens themselves
    assert "| long (150) | packed |" in (tmp_path / "r.md").read_text()
