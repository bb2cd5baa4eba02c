"""A short soak of a real CoSteer server: no unexpected error, aborted streams cleaned up, huge contexts refused."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def test_short_soak(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_server.py"
    spec = importlib.util.spec_from_file_location("soak_server", path)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak_server"] = soak
    spec.loader.exec_module(soak)
    r = soak.main(["--requests", "48", "--warmup", "8", "--concurrency", "4", "--contexts", "6",
                   "--abort-frac", "0.25", "--huge-context-mb", "2", "--out", str(tmp_path / "soak.json")])
    assert r["unexpected_errors"] == 0, r["outcomes"]
    assert r["outcomes"].get("ok", 0) + r["outcomes"].get("aborted", 0) == 48 and r["outcomes"].get("aborted", 0) > 0
    after = r["after"]["runner"]
    assert after["requests"] == 0 and after["cached_rows"] == 0 and after["kv_bytes"] == 0 and after["parked"] == 0
    assert len(r["huge_context"]["refusal_s"]) == 4
