"""Is split mode batch-invariant? ``generate_batch`` of 8 prompts vs each prompt alone, per dtype (tiny pair).

A vLLM server of the tiny test pair per dtype on loopback, ``SplitCoSteerClient(top_logprobs=20,
lookahead=4)``, greedy, 32 tokens. In bf16 the upstream's and the small model's numerics depend on
the batch composition, so a near tie can flip (docs/proxy.md#speed); float32 is exact.

    python benchmarks/split_batch_invariance.py bfloat16 float32

Writes ``benchmarks/results/split_batch_invariance_tiny.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> dict:
    import torch

    from bench_proxy import CONTEXTS, PROMPTS
    from costeer_processor.split import SplitCoSteerClient, load_runner
    from costeer_processor.testing import save_tiny_pair
    from costeer_processor.vllm_server import vllm_server

    dtypes = (argv if argv is not None else sys.argv[1:]) or ["bfloat16", "float32"]
    torch.set_num_threads(1)
    large, small = save_tiny_pair(Path(tempfile.mkdtemp(prefix="batch_invariance_")))
    out = {}
    for dtype in dtypes:
        args = ["--dtype", dtype, "--max-logprobs", "-1", "--enable-prefix-caching", "--max-model-len", "512",
                "--block-size", "32", "--served-model-name", "m"]
        with vllm_server(str(large), args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
            client = SplitCoSteerClient(url, load_runner(small, dtype=dtype), top_logprobs=20, lookahead=4)
            prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
            batch = [r.token_ids for r in client.generate_batch(prompts, CONTEXTS, 32)]
            alone = [client.generate_batch([p], [c], 32)[0].token_ids for p, c in zip(prompts, CONTEXTS)]
            again = [r.token_ids for r in client.generate_batch(prompts, CONTEXTS, 32)]
            client.close()
        out[dtype] = {"batch_vs_alone_equal": sum(a == b for a, b in zip(batch, alone)),
                      "batch_vs_batch_equal": sum(a == b for a, b in zip(batch, again)),
                      "first_diff": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                     for a, b in zip(batch, alone)]}
        print(dtype, out[dtype], flush=True)
    path = ROOT / "benchmarks" / "results" / "split_batch_invariance_tiny.json"
    path.write_text(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
