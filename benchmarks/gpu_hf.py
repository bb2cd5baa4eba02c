"""GPU timing of the Hugging Face path with random-weight models of real shapes (no downloads).

For a CUDA machine that has torch and transformers but no vLLM, no network and no room for weights:
it builds the Qwen2.5-7B-Instruct architecture as the large model and Qwen2.5-0.5B-Instruct as the
small one, with random weights, in bf16 on the GPU, and times, side by side in one run:

* ``plain``: the large model's ``generate`` alone, fixed length (``min_new_tokens = max_new_tokens``);
* ``steered``: the same ``generate`` with :class:`~costeer_processor.hf.CoSteerLogitsProcessor`;
* ``small step``: one batched small-model decode step over the 2B branch rows (after prefill);
* ``update``: :func:`~costeer_processor.steer` alone on B x 152,064 logits;

at batch 1, 8 and 32 by default. ``--tiny`` runs the same code on tiny models on the CPU (the test
suite does, so the script keeps working). Random weights make the text meaningless; the timings are
those of the real shapes. Token ids come from the tiny test tokenizer (all valid ids of the big vocab).

Usage::

    python benchmarks/gpu_hf.py --out-dir $OUT                      # CUDA, real shapes, ~3 minutes on an H200
    python benchmarks/gpu_hf.py --batch-sizes 8 --context-tokens 2000  # LongLaMP-length personal contexts
    python benchmarks/gpu_hf.py --tiny --batch-sizes 1 2 --new-tokens 4  # CPU smoke run
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
from transformers import AutoModelForCausalLM, LogitsProcessorList, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from costeer_processor import SmallModelRunner, steer  # noqa: E402
from costeer_processor.hf import CoSteerLogitsProcessor  # noqa: E402
from costeer_processor.prompts import strip_left_padding  # noqa: E402
from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer  # noqa: E402

# config.json of Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-0.5B-Instruct (the fields that set the shapes)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)

PROMPTS = ["Suggest a dinner recipe for tonight.", "Plan a weekend trip for me.", "Recommend a book to read.",
           "Write a short poem about autumn."]
CONTEXT_WORDS = ("I am vegan and I love very spicy food. I hate crowds and love mountains. I only read science "
                 "fiction. I like funny, rhyming verse. ").split()


def build(shape: dict, tok, device: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    config = Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def context(n_tokens: int, tok) -> str:
    words, text = [], ""
    while len(tok(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        words.extend(CONTEXT_WORDS)
        text = " ".join(words)
    return text


def run_batch(b: int, large, small, tok, args) -> dict:
    dev = args.device
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(b)]
    inputs = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                     return_dict=True).to(dev)
    ctx = context(args.context_tokens, tok)
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
    runner = SmallModelRunner(small, tok)

    def plain():
        return large.generate(**inputs, **gen_kw)

    def steered():
        proc = CoSteerLogitsProcessor(runner, [ctx] * b)
        out = large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), **gen_kw)
        proc.release()
        return out

    t_plain, out_plain = timed(plain, dev, args.repeats)
    t_steer, out_steer = timed(steered, dev, args.repeats)

    # the small model's decode step alone: 2b rows after prefill
    proc = CoSteerLogitsProcessor(runner, [ctx] * b)
    branches = [proc.steerer.request(strip_left_padding(row, tok.pad_token_id), ctx, gain=1.0).branches
                for row in inputs["input_ids"].cpu().tolist()]
    keys = [("bench", i) for i in range(b)]
    for k, (w, wo) in zip(keys, branches):
        runner.add(k, w, wo)
    runner.step([(k, []) for k in keys])
    sync(dev)
    fed: list[int] = []
    step_times = []
    for t in range(args.small_steps):
        fed.append(100 + t)
        t0 = time.perf_counter()
        runner.step([(k, list(fed)) for k in keys])
        sync(dev)
        step_times.append(time.perf_counter() - t0)
    for k in keys:
        runner.remove(k)
    t_small = statistics.median(step_times[1:] or step_times)

    g = torch.Generator(device="cpu").manual_seed(b)
    zl = torch.randn(b, large.config.vocab_size, generator=g).to(dev, torch.bfloat16)
    zw, zo = (torch.randn(b, small.config.vocab_size, generator=g).to(dev, torch.bfloat16) for _ in range(2))
    t_update, _ = timed(lambda: steer(zl, zw, zo, 1.783), dev, 20)

    n = args.new_tokens
    changed = int((out_plain != out_steer).any(dim=1).sum())
    return {"batch": b, "new_tokens": n, "context_tokens": len(branches[0][0]) - len(branches[0][1]),
            "plain_tok_s": b * n / t_plain, "steered_tok_s": b * n / t_steer,
            "plain_step_ms": t_plain / n * 1e3, "steered_step_ms": t_steer / n * 1e3,
            "small_step_ms": t_small * 1e3, "update_ms": t_update * 1e3,
            "steered_over_plain": t_steer / t_plain,
            "overhead_vs_bound": (t_steer / n) / (t_plain / n + t_small),
            "rows_changed_by_steering": changed}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small-steps", type=int, default=16)
    p.add_argument("--out-dir", default=None, help="writes gpu_hf.json and gpu_hf.md there")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tok = build_tiny_tokenizer()
    tok.padding_side = "left"  # batched generation of a decoder-only model
    t0 = time.perf_counter()
    if args.tiny:
        large = build_tiny_model(tok, hidden_size=128, seed=1).to(args.device)
        small = build_tiny_model(tok, hidden_size=64, seed=2).to(args.device)
        shapes = "tiny (hidden 128 / 64)"
    else:
        large = build(QWEN25_7B, tok, args.device, torch.bfloat16, 1)
        small = build(QWEN25_05B, tok, args.device, torch.bfloat16, 2)
        shapes = "Qwen2.5-7B-Instruct + Qwen2.5-0.5B-Instruct shapes, random weights, bf16"
    build_s = time.perf_counter() - t0
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    rows = [run_batch(b, large, small, tok, args) for b in args.batch_sizes]
    meta = {"device": card, "shapes": shapes, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "build_s": build_s,
            "command": "python benchmarks/gpu_hf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_average": os.getloadavg()}
    lines = [f"{card}; {shapes}; torch {meta['torch']}, transformers {meta['transformers']}",
             "", "| batch | ctx tokens | plain tok/s | steered tok/s | steered/plain time | plain step ms | "
             "small step ms | update ms | steered step ms | steered / (plain + small) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context_tokens']} | {r['plain_tok_s']:.1f} | {r['steered_tok_s']:.1f} | "
                     f"{r['steered_over_plain']:.2f}x | {r['plain_step_ms']:.1f} | {r['small_step_ms']:.1f} | "
                     f"{r['update_ms']:.2f} | {r['steered_step_ms']:.1f} | {r['overhead_vs_bound']:.2f} |")
    text = "\n".join(lines)
    print(text)
    result = {"meta": meta, "rows": rows}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f"_ctx{args.context_tokens}" if args.context_tokens != 64 else ""
        (out / f"gpu_hf{suffix}.json").write_text(json.dumps(result, indent=2))
        (out / f"gpu_hf{suffix}.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
