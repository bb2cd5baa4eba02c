"""The single steering step (costeer_processor.steering): isolation, fail-closed ending, threads, tenants."""

import threading

import pytest
import torch
from transformers import LogitsProcessorList

from costeer_processor import SmallModelRunner
from costeer_processor.core import Variants, steer
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.steering import Steerer

USERS = ["suggest a dinner recipe", "tell me about tea", "write a story about a dragon", "plan my weekend"]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer warm answers.", "My hobbies are chess and hiking.",
            "I hate crowds and love mountains."]


def prompt_ids(tokenizer, user):
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def only_eos(row, eos):
    return row[eos] == 0 and torch.isneginf(torch.cat([row[:eos], row[eos + 1:]])).all()


def make(small_model, tokenizer, **kw):
    return Steerer(SmallModelRunner(small_model, tokenizer, **kw), tokenizer, [tokenizer.eos_token_id])


def admit_all(steerer, tokenizer, n, gain=1.5, variants=Variants()):
    return [steerer.admit(steerer.request(prompt_ids(tokenizer, u), c, gain=gain, variants=variants))
            for u, c in zip(USERS[:n], CONTEXTS[:n])]


def test_step_equals_the_update_on_the_small_models_logits(small_model, tokenizer):
    steerer = make(small_model, tokenizer)
    slots = admit_all(steerer, tokenizer, 3)
    logits = torch.randn(5, len(tokenizer), generator=torch.Generator().manual_seed(0))
    out = steerer.step(logits.clone(), [0, 2, 4], slots, [[], [], []])
    ref_runner = SmallModelRunner(small_model, tokenizer)
    for k, (u, c) in enumerate(zip(USERS[:3], CONTEXTS[:3])):
        ref_runner.add(k, *ref_runner.branch_ids_from_text(tokenizer.decode(prompt_ids(tokenizer, u)), c))
    zw, zo = ref_runner.step([(k, []) for k in range(3)])
    torch.testing.assert_close(out[[0, 2, 4]], steer(logits[[0, 2, 4]], zw, zo, 1.5))
    assert torch.equal(out[[1, 3]], logits[[1, 3]])  # rows of other requests untouched


def test_a_new_request_whose_prefill_raises_ends_alone(small_model, tokenizer, monkeypatch):
    """3 requests decoding + 1 new one whose prefill raises: the 3 equal a clean run, the new one is ended."""
    steerer, clean = make(small_model, tokenizer), make(small_model, tokenizer)
    slots, ref = admit_all(steerer, tokenizer, 3), admit_all(clean, tokenizer, 3)
    logits = torch.randn(4, len(tokenizer), generator=torch.Generator().manual_seed(1)) * 3
    outputs = [[], [], []]
    for t in range(3):  # three steps of decoding
        a = steerer.step(logits[:3].clone(), [0, 1, 2], slots, outputs)
        b = clean.step(logits[:3].clone(), [0, 1, 2], ref, outputs)
        torch.testing.assert_close(a, b)
        outputs = [o + [int(a[i].argmax())] for i, o in enumerate(outputs)]
    late = steerer.admit(steerer.request(prompt_ids(tokenizer, USERS[3]), CONTEXTS[3], gain=1.5))
    runner = steerer.runner
    real_forward = runner.model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a prefill: only the new request needs one now
            raise RuntimeError("injected: out of memory in the new request's prefill")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", forward)
    got = steerer.step(logits.clone(), [0, 1, 2, 3], slots + [late], outputs + [[]])
    monkeypatch.undo()
    want = clean.step(logits[:3].clone(), [0, 1, 2], ref, outputs)
    assert only_eos(got[3], tokenizer.eos_token_id) and "injected" in steerer.failure(late)
    torch.testing.assert_close(got[:3], want)
    # and they keep decoding exactly as in a clean run
    outputs = [o + [int(want[i].argmax())] for i, o in enumerate(outputs)]
    torch.testing.assert_close(steerer.step(logits[:3].clone(), [0, 1, 2], slots, outputs),
                               clean.step(logits[:3].clone(), [0, 1, 2], ref, outputs))
    for s in slots + [late]:
        steerer.release(s)
    assert steerer.stats()["slots"] == 0 and runner.kv_tokens == 0 and len(runner) == 0


def test_release_frees_the_slot_and_the_rows_and_slots_are_reused(small_model, tokenizer):
    steerer = make(small_model, tokenizer)
    slots = admit_all(steerer, tokenizer, 4)
    steerer.step(torch.randn(4, len(tokenizer)), [0, 1, 2, 3], slots, [[]] * 4)
    assert len(steerer.runner) == 4
    for s in slots:
        steerer.release(s)
    assert len(steerer.runner) == 0 and steerer.stats()["slots"] == 0
    again = admit_all(steerer, tokenizer, 4)
    assert sorted(again) == sorted(slots)  # the per-slot tensors are reused, not grown


def test_many_slots_grow_the_tables(small_model, tokenizer):
    steerer = make(small_model, tokenizer)
    slots = [steerer.admit(steerer.request(prompt_ids(tokenizer, USERS[0]), CONTEXTS[0], gain=float(i)))
             for i in range(20)]
    assert len(set(slots)) == 20 and steerer.stats()["slots"] == 20
    assert [float(steerer._gain[s]) for s in slots] == [float(i) for i in range(20)]


def _generate(large_model, tokenizer, proc, users):
    tokenizer.padding_side = "left"
    inputs = tokenizer.apply_chat_template([[{"role": "user", "content": u}] for u in users],
                                           add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True)
    return large_model.generate(**inputs, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                                max_new_tokens=6, min_new_tokens=6, pad_token_id=tokenizer.pad_token_id)


def test_four_threads_on_one_runner_equal_sequential_runs(large_model, small_model, tokenizer):
    """HF processors of 4 threads share one runner: outputs equal sequential ones; the runner works after."""
    runner = SmallModelRunner(small_model, tokenizer)
    jobs = [(USERS[i:i + 2], CONTEXTS[i:i + 2]) for i in range(4)]
    jobs = [(u + USERS[:2 - len(u)], c + CONTEXTS[:2 - len(c)]) for u, c in jobs]
    want = [_generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, c), u) for u, c in jobs]
    got, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                got[i] = _generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, jobs[i][1]), jobs[i][0])
        except Exception as e:  # reported below with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    import gc
    gc.collect()
    assert _generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, jobs[0][1]), jobs[0][0]).equal(want[0])


def test_hf_cache_salt_separates_tenants(large_model, small_model, tokenizer):
    """Processors with other salts never share cached context KV; the same salt does."""
    runner = SmallModelRunner(small_model, tokenizer)
    context = ["I am vegan and I love spicy food. " * 4]

    def hits():
        return runner.context_cache.stats()["hits"]

    a = _generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, context, cache_salt="tenant-a"), USERS[:1])
    before = hits()
    b = _generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, context, cache_salt="tenant-b"), USERS[:1])
    assert hits() == before  # another tenant: a miss
    c = _generate(large_model, tokenizer, CoSteerLogitsProcessor(runner, context, cache_salt="tenant-a"), USERS[:1])
    assert hits() == before + 1  # the same tenant: a hit
    assert torch.equal(a, b) and torch.equal(a, c)  # the cache never changes outputs
    with pytest.raises(TypeError, match="cache_salt must be a string"):
        CoSteerLogitsProcessor(runner, context, cache_salt=3)
