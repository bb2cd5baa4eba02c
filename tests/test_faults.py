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


def _hf_inputs(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer.apply_chat_template([[{"role": "user", "content": u}] for u in USERS],
                                         add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


HF_KW = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)


def test_hf_transient_fault_is_retried_row_by_row_and_equals_a_clean_run(large_model, small_model, tokenizer,
                                                                          monkeypatch):
    inputs = _hf_inputs(tokenizer)
    runner = SmallModelRunner(small_model, tokenizer)
    layer = small_model.model.layers[0]
    original, calls = layer.forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the batched decode step in the middle of generate fails once
            raise RuntimeError("injected")
        return original(*a, **k)

    monkeypatch.setattr(layer, "forward", flaky)
    proc = CoSteerLogitsProcessor(runner, CONTEXTS)
    got = large_model.generate(**inputs, logits_processor=LogitsProcessorList([proc]),
                               pad_token_id=tokenizer.pad_token_id, **HF_KW)
    monkeypatch.setattr(layer, "forward", original)
    clean = large_model.generate(**inputs, logits_processor=LogitsProcessorList(
        [CoSteerLogitsProcessor(SmallModelRunner(small_model, tokenizer), CONTEXTS)]),
        pad_token_id=tokenizer.pad_token_id, **HF_KW)
    assert len(calls) > 3 and torch.equal(got, clean) and proc.failures() == [None, None, None]


def test_hf_persistent_fault_ends_that_row_only(large_model, small_model, tokenizer, monkeypatch):
    inputs = _hf_inputs(tokenizer)
    runner = SmallModelRunner(small_model, tokenizer)
    proc = CoSteerLogitsProcessor(runner, CONTEXTS)
    real_step = runner.step

    def step(batch):
        if any(key == proc.steerer.key(proc._slots[1]) for key, _ in batch):
            raise RuntimeError("injected: row 1's small model always fails")
        return real_step(batch)

    monkeypatch.setattr(runner, "step", step)
    got = large_model.generate(**inputs, logits_processor=LogitsProcessorList([proc]),
                               pad_token_id=tokenizer.pad_token_id, **HF_KW)
    clean = large_model.generate(**inputs, logits_processor=LogitsProcessorList(
        [CoSteerLogitsProcessor(SmallModelRunner(small_model, tokenizer), CONTEXTS)]),
        pad_token_id=tokenizer.pad_token_id, **HF_KW)
    start = inputs["input_ids"].shape[1]
    assert got[1, start] == tokenizer.eos_token_id  # ended at once: never an unsteered answer
    assert "injected" in proc.failures()[1] and proc.failures()[0] is None
    assert torch.equal(got[[0, 2]], clean[[0, 2]])  # the others as in a clean run
    proc.release()
    assert runner.kv_tokens == 0 and len(runner) == 0


def test_nan_small_logits_end_the_request_with_a_reason(small_model, tokenizer, logits, monkeypatch):
    engine, clean = make_engine(small_model, tokenizer), make_engine(small_model, tokenizer)
    handles, ref_handles = open_all(engine, tokenizer), open_all(clean, tokenizer)
    real_step = engine.runner.step

    def step(batch):
        z_with, z_without = real_step(batch)
        for i, (key, _) in enumerate(batch):
            if key == handles[2].key:
                z_with[i] = float("nan")  # what a broken small model (or a poisoned cache) gives
        return z_with, z_without

    monkeypatch.setattr(engine.runner, "step", step)
    out = step_all = engine.apply(logits.clone(), [0, 1, 2], handles, [[], [], []])
    ref = clean.apply(logits.clone(), [0, 1, 2], ref_handles, [[], [], []])
    assert only_eos(step_all[2], tokenizer.eos_token_id) and "not finite" in handles[2].failed
    torch.testing.assert_close(out[:2], ref[:2])
    assert handles[0].active and not handles[2].active


def test_type_error_in_the_small_step_ends_those_requests_engine_alive(small_model, tokenizer, logits, monkeypatch):
    engine = make_engine(small_model, tokenizer)
    handles = open_all(engine, tokenizer)
    monkeypatch.setattr(engine.runner, "step", lambda batch: (_ for _ in ()).throw(TypeError("version drift")))
    out = engine.apply(logits.clone(), [0, 1, 2], handles, [[], [], []])
    assert all(only_eos(row, tokenizer.eos_token_id) for row in out)
    assert all("version drift" in h.failed for h in handles)
    monkeypatch.undo()
    fresh = open_all(engine, tokenizer)  # the engine still serves new requests
    again = engine.apply(logits.clone(), [0, 1, 2], fresh, [[], [], []])
    assert not any(only_eos(row, tokenizer.eos_token_id) for row in again)
