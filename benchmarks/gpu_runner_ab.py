"""A/B on a CUDA machine, in one process: HF steered generate with today's runner, without the in-place
KV growth (plain DynamicCache; the context cache then switches itself off), and without the context cache.

Qwen2.5-7B + 0.5B shapes, random weights, bf16, 32 fixed tokens, batch 8 and 32. Usage: ``python benchmarks/gpu_runner_ab.py``.
"""
import sys, time, statistics, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import gpu_hf as g
from transformers import LogitsProcessorList, DynamicCache
import costeer_processor.small_model as sm
from costeer_processor import SmallModelRunner
from costeer_processor.hf import CoSteerLogitsProcessor
tok = g.build_tiny_tokenizer(); tok.padding_side = "left"
large = g.build(g.QWEN25_7B, tok, "cuda", torch.bfloat16, 1); small = g.build(g.QWEN25_05B, tok, "cuda", torch.bfloat16, 2)
real_growing = sm.growing_cache
def plain_cache(config): return DynamicCache(config=config)
for b in (8, 32):
    chats = [[{"role": "user", "content": g.PROMPTS[i % 4]}] for i in range(b)]
    inputs = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True).to("cuda")
    ctx = g.context(64, tok)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    def t(fn, n=3):
        fn(); torch.cuda.synchronize(); ts=[]
        for _ in range(n):
            t0=time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter()-t0)
        return statistics.median(ts)/32*1e3
    print(b, "plain ms/step", round(t(lambda: large.generate(**inputs, **kw)),1), flush=True)
    for name, growing, mb in (("today", real_growing, 256), ("no-growing", plain_cache, 256), ("no-ctx-cache", real_growing, 0)):
        sm.growing_cache = growing
        runner = SmallModelRunner(small, tok, context_cache_mb=mb)
        def steered():
            p = CoSteerLogitsProcessor(runner, [ctx]*b); large.generate(**inputs, logits_processor=LogitsProcessorList([p]), **kw); p.release()
        print(b, name, "steered ms/step", round(t(steered),1), flush=True)
    sm.growing_cache = real_growing
