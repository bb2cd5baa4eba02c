"""The Hugging Face processor against plain generate and a per-row reference loop."""

import pytest
import torch
from transformers import LogitsProcessorList

from costeer_processor import CoSteerConfig, SmallModelRunner, costeer_gain
from costeer_processor.core import Variants
from costeer_processor.hf import CoSteerLogitsProcessor

SYSTEM = "You are a helpful assistant."
MAX_NEW = 12


def chat_text(tokenizer, user):
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)


def batch_inputs(tokenizer, prompts):
    texts = [chat_text(tokenizer, p) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def generate(model, tokenizer, prompts, processor=None, **kw):
    inputs = batch_inputs(tokenizer, prompts)
    kw.setdefault("do_sample", False)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                         logits_processor=LogitsProcessorList([processor] if processor else []), **kw)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.fixture
def runner(small_model, tokenizer):
    return SmallModelRunner(small_model, tokenizer)


def reference_loop(large, small, tokenizer, prompt, context, gain, steps=MAX_NEW):
    """CoSteer the way every research implementation runs it: one prompt, no batching, no cache."""
    enc = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    large_ids = enc(chat_text(tokenizer, prompt))
    with_ids = enc(chat_text(tokenizer, context + "\n\n" + prompt))
    without_ids = enc(chat_text(tokenizer, prompt))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            z_l = large(large_ids).logits[0, -1].float()
            z_p = small(with_ids).logits[0, -1].float()
            z_m = small(without_ids).logits[0, -1].float()
            p = torch.log_softmax(torch.log_softmax(z_l, -1) + gain * (torch.log_softmax(z_p, -1) - torch.log_softmax(z_m, -1)), -1)
            tok = p.argmax().view(1, 1)
            out.append(int(tok))
            large_ids, with_ids, without_ids = (torch.cat([x, tok], 1) for x in (large_ids, with_ids, without_ids))
    return out


def test_batched_equals_per_row_reference_loop(large_model, small_model, tokenizer, runner, prompts, contexts):
    proc = CoSteerLogitsProcessor(runner, contexts)
    batched = generate(large_model, tokenizer, prompts, proc)
    gain = costeer_gain(CoSteerConfig())
    for row, (p, c) in enumerate(zip(prompts, contexts)):
        assert batched[row].tolist() == reference_loop(large_model, small_model, tokenizer, p, c, gain)
    # and steering really changed something
    assert not torch.equal(batched, generate(large_model, tokenizer, prompts))


def test_zero_delta_reproduces_plain_generate(large_model, tokenizer, runner, prompts, contexts):
    runner.splicer.splice_parts = lambda text, context: ("", text)  # identical branches: delta == 0
    proc = CoSteerLogitsProcessor(runner, contexts)
    assert torch.equal(generate(large_model, tokenizer, prompts, proc), generate(large_model, tokenizer, prompts))


def test_strength_zero_is_plain_generate(large_model, tokenizer, runner, prompts, contexts):
    proc = CoSteerLogitsProcessor(runner, contexts, CoSteerConfig(strength=0.0))
    assert torch.equal(generate(large_model, tokenizer, prompts, proc), generate(large_model, tokenizer, prompts))


def test_rows_are_independent(large_model, tokenizer, runner, prompts, contexts):
    base = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, contexts))
    changed = list(contexts)
    changed[1] = "Numbers one two three four five six seven eight nine ten hundred thousand million."
    other = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, changed))
    assert torch.equal(base[0], other[0]) and torch.equal(base[2], other[2])
    assert not torch.equal(base[1], other[1])


def test_reuse_across_generate_calls_and_runner_cleanup(large_model, tokenizer, runner, prompts, contexts):
    proc = CoSteerLogitsProcessor(runner, contexts)
    first = generate(large_model, tokenizer, prompts, proc)
    second = generate(large_model, tokenizer, prompts, proc)
    assert torch.equal(first, second)
    assert len(runner) == 3  # state of the last call only, not accumulated
    del proc
    import gc
    gc.collect()
    assert len(runner) == 0 and runner.cached_rows == 0


def test_sampling_runs_and_is_reproducible(large_model, tokenizer, runner, prompts, contexts):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        proc = CoSteerLogitsProcessor(runner, contexts)
        outs.append(generate(large_model, tokenizer, prompts, proc, do_sample=True, temperature=0.7, top_p=0.9))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (3, MAX_NEW)


def test_gating_switches_rows_off_and_frees_the_small_model(large_model, tokenizer, runner, prompts, contexts):
    # threshold 0.999: every step counts as confident, so patience 1 switches rows off at once
    proc = CoSteerLogitsProcessor(runner, contexts, variants=Variants(gate_threshold=0.999, gate_patience=1))
    assert torch.equal(generate(large_model, tokenizer, prompts, proc), generate(large_model, tokenizer, prompts))
    assert runner.cached_rows == 0 and runner.forward_count == 0
    proc = CoSteerLogitsProcessor(runner, contexts, variants=Variants(gate_threshold=0.999, gate_patience=3))
    generate(large_model, tokenizer, prompts, proc)
    assert runner.cached_rows == 0 and runner.forward_count == 3  # prefill (2 forwards) + one decode step, then off


def test_eos_guard_stops_where_the_large_model_would(large_model, tokenizer, runner, prompts, contexts):
    inputs = batch_inputs(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    # Make EOS the large model's overwhelming choice at the first step via a bias processor placed before CoSteer.
    class Bias:
        def __call__(self, ids, scores):
            scores = scores.clone()
            scores[:, eos] += 30.0
            return scores
    proc = CoSteerLogitsProcessor(runner, contexts, CoSteerConfig(strength=50.0), variants=Variants(eos_guard=0.5))
    out = large_model.generate(**inputs, max_new_tokens=4, do_sample=False,
                               logits_processor=LogitsProcessorList([Bias(), proc]))
    assert (out[:, inputs["input_ids"].shape[1]] == eos).all()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(contexts=["a", "b"]), ValueError, "one context per prompt"),
    (dict(contexts=["a", "", "c"]), ValueError, "context is empty"),
    (dict(contexts=["a", 3, "c"]), TypeError, "must be a string"),
    (dict(contexts="abc"), TypeError, "not a single string"),
    (dict(contexts=["a", "b", "word " * 2000]), ValueError, "over the limit"),
    (dict(config=dict(T=0)), ValueError, r"T must be in \[1, "),
    (dict(variants=dict(gate_patience=True)), ValueError, "gate_patience must be an integer, got bool"),
    (dict(variants=dict(gate_threshold=1.5)), ValueError, "gate_threshold"),
    (dict(variants=dict(gate_threshold="0.5")), ValueError, "gate_threshold must be a number"),
    (dict(variants=dict(gate_threshold=float("nan"))), ValueError, "gate_threshold"),
    (dict(variants=dict(gate_patience=0)), ValueError, "gate_patience"),
    (dict(variants=dict(gate_patience=2.0)), ValueError, "gate_patience"),
    (dict(variants=dict(eos_guard=0.0)), ValueError, "eos_guard"),
    (dict(variants=dict(eos_guard=True)), ValueError, "eos_guard must be a number"),
    (dict(vocab_map="auto"), TypeError, "vocab_map must be a VocabularyMap"),
])
def test_bad_arguments(runner, prompts, contexts, kwargs, exc, match):
    args = dict(prompts=prompts, contexts=contexts)
    if "config" in kwargs:
        with pytest.raises(exc, match=match):
            CoSteerConfig(**kwargs.pop("config"))
        return
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        if "variants" in args:  # the options object refuses bad values itself, naming them
            args["variants"] = Variants(**args["variants"])
        CoSteerLogitsProcessor(runner, **args)


def test_beam_search_and_batch_mismatch_are_refused(large_model, tokenizer, runner, prompts, contexts):
    proc = CoSteerLogitsProcessor(runner, contexts)
    with pytest.raises(ValueError, match="Beam search"):
        generate(large_model, tokenizer, prompts, proc, num_beams=2)
    with pytest.raises(ValueError, match="3 contexts"):
        generate(large_model, tokenizer, prompts[:2], proc)


def test_assisted_decoding_is_refused(large_model, tokenizer, runner, prompts, contexts):
    proc = CoSteerLogitsProcessor(runner, contexts[:1])
    with pytest.raises(RuntimeError, match="assisted/speculative decoding is not supported"):
        generate(large_model, tokenizer, prompts[:1], proc, prompt_lookup_num_tokens=3)


def test_not_for_continuous_batching():
    assert CoSteerLogitsProcessor.supports_continuous_batching is False


def test_wider_large_vocabulary_keeps_padded_ids_impossible(tokenizer, small_model, prompts, contexts):
    from costeer_processor.testing import build_tiny_model
    wide = build_tiny_model(tokenizer, hidden_size=128, seed=1, vocab_size=len(tokenizer) + 64)
    runner = SmallModelRunner(small_model, tokenizer)
    proc = CoSteerLogitsProcessor(runner, contexts)
    inputs = batch_inputs(tokenizer, prompts)
    scores = wide(**inputs).logits[:, -1]
    out = proc(inputs["input_ids"], scores)
    assert out.shape == scores.shape
    assert torch.isneginf(out[:, len(tokenizer):]).all()
    assert torch.isfinite(out[:, : len(tokenizer)]).all()
