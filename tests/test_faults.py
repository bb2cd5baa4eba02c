"""Injected faults: one request's failure never switches off or changes the others; nothing runs unsteered silently."""

import pytest
import torch
from transformers import LogitsProcessorList

from costeer_processor import SmallModelRunner
from costeer_processor.hf import CoSteerLogitsProcessor

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from costeer_processor.vllm.engine import SteeringEngine  # noqa: E402
from costeer_processor.vllm.settings import EngineSettings  # noqa: E402

USERS = ["suggest a dinner recipe", "tell me about tea", "write a story about a dragon"]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer warm answers.", "My hobbies are chess and hiking."]


def make_engine(small_model, tokenizer, **settings):
    runner = SmallModelRunner(small_model, tokenizer, max_context_tokens=settings.pop("max_context_tokens", None))
    return SteeringEngine(EngineSettings(**settings), tokenizer, runner, [tokenizer.eos_token_id])


def open_all(engine, tokenizer, contexts=CONTEXTS):
    handles = []
    for user, ctx in zip(USERS, contexts):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, return_dict=True)["input_ids"]
        handles.append(engine.open(SamplingParams(extra_args={"costeer_context": ctx}), prompt))
    return handles


def step(engine, handles, logits, outputs):
    return engine.apply(logits.clone(), list(range(len(handles))), handles, outputs)


def only_eos(row, eos):
    return row[eos] == 0 and torch.isneginf(torch.cat([row[:eos], row[eos + 1:]])).all()


@pytest.fixture
def logits(tokenizer):
    return torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(0)) * 3


def test_a_context_too_long_in_the_engine_ends_that_request_only(small_model, tokenizer, logits):
    engine = make_engine(small_model, tokenizer, max_context_tokens=60)
    clean = make_engine(small_model, tokenizer, max_context_tokens=60)
    long_ctx = ["I am vegan and I love spicy food. " * 20] + CONTEXTS[1:]
    out = step(engine, open_all(engine, tokenizer, long_ctx), logits, [[], [], []])
    ref_handles = open_all(clean, tokenizer)
    ref = step(clean, ref_handles, logits, [[], [], []])
    assert only_eos(out[0], tokenizer.eos_token_id)  # ended at once, never an unsteered continuation
    torch.testing.assert_close(out[1:], ref[1:])  # the others are steered as if nothing happened
    assert not torch.equal(out[1:], logits[1:])


def test_one_failed_admission_does_not_switch_off_the_others(small_model, tokenizer, logits, monkeypatch):
    engine, clean = make_engine(small_model, tokenizer), make_engine(small_model, tokenizer)
    handles, ref_handles = open_all(engine, tokenizer), open_all(clean, tokenizer)
    real_add = engine.runner.add

    def add(key, *args, **kwargs):
        if key == handles[1].key:
            raise RuntimeError("injected admission fault")
        return real_add(key, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "add", add)
    out = step(engine, handles, logits, [[], [], []])
    ref = step(clean, ref_handles, logits, [[], [], []])
    assert only_eos(out[1], tokenizer.eos_token_id) and handles[1].failed
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]])
    assert handles[0].active and handles[2].active
    # and the next step too: the survivors keep being steered exactly as in a clean engine
    out2 = engine.apply(logits.clone(), [0, 2], [handles[0], handles[2]], [[5], [6]])
    ref2 = clean.apply(logits.clone(), [0, 2], [ref_handles[0], ref_handles[2]], [[5], [6]])
    torch.testing.assert_close(out2[[0, 2]], ref2[[0, 2]])


def test_a_forward_failure_ends_its_requests_and_leaves_the_runner_consistent(small_model, tokenizer, logits,
                                                                              monkeypatch):
    engine, clean = make_engine(small_model, tokenizer), make_engine(small_model, tokenizer)
    handles, ref_handles = open_all(engine, tokenizer), open_all(clean, tokenizer)
    step(engine, handles[:1], logits[:1], [[]])
    step(clean, ref_handles[:1], logits[:1], [[]])
    layer = small_model.model.layers[1]
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    out = engine.apply(logits[1:2].clone(), [0], [handles[1]], [[]])  # admission + forward of request 1 fails
    monkeypatch.setattr(layer, "forward", original)
    assert only_eos(out[0], tokenizer.eos_token_id) and handles[1].failed
    # request 0 (already in the cache when the forward failed) continues exactly as in a clean run
    a = engine.apply(logits[:1].clone(), [0], [handles[0]], [[7]])
    b = clean.apply(logits[:1].clone(), [0], [ref_handles[0]], [[7]])
    torch.testing.assert_close(a, b)
    assert engine.runner.kv_tokens == clean.runner.kv_tokens


def test_arguments_the_engine_refuses_end_the_request(small_model, tokenizer, logits):
    engine = make_engine(small_model, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True)["input_ids"]
    handle = engine.open(SamplingParams(extra_args={"costeer_context": "x", "costeer_T": True}), prompt)
    assert handle is not None and handle.failed and "costeer_T" in handle.failed
    out = engine.apply(logits[:1].clone(), [0], [handle], [[]])
    assert only_eos(out[0], tokenizer.eos_token_id)


def test_hf_fault_raises_and_the_next_call_equals_a_clean_run(large_model, small_model, tokenizer, monkeypatch):
    tokenizer.padding_side = "left"
    inputs = tokenizer.apply_chat_template([[{"role": "user", "content": u}] for u in USERS],
                                           add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True)
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    runner = SmallModelRunner(small_model, tokenizer)
    layer = small_model.model.layers[0]
    original, calls = layer.forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # fails in the middle of generate
            raise RuntimeError("injected")
        return original(*a, **k)

    monkeypatch.setattr(layer, "forward", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        large_model.generate(**inputs, logits_processor=LogitsProcessorList([CoSteerLogitsProcessor(runner, CONTEXTS)]),
                             **kw)
    monkeypatch.setattr(layer, "forward", original)
    again = large_model.generate(**inputs, logits_processor=LogitsProcessorList(
        [CoSteerLogitsProcessor(runner, CONTEXTS)]), **kw)
    clean = large_model.generate(**inputs, logits_processor=LogitsProcessorList(
        [CoSteerLogitsProcessor(SmallModelRunner(small_model, tokenizer), CONTEXTS)]), **kw)
    assert torch.equal(again, clean)
