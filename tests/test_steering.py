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
    assert [float(steerer.slots.gain[s]) for s in slots] == [float(i) for i in range(20)]


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


# --------------------------------------------------------------------------- the options of the step
def _copier(steerer, bonus=20.0):
    """A small model that copies its context: the with-context branch puts ``bonus`` on the token that
    continues the longest suffix of the history found in the context (the failure the n-gram guard stops)."""
    runner = steerer.runner
    real_step = runner.step
    slot_of = {}

    def step(batch):
        z_with, z_without = real_step(batch)
        z_with, z_without = torch.zeros_like(z_with), torch.zeros_like(z_without)
        for i, (key, history) in enumerate(batch):
            if key not in slot_of:
                slot_of[key] = next(s for s in range(steerer.slots.cap) if steerer.slots.keys[s] == key)
            ids = steerer.request_of(slot_of[key]).context_ids  # the guard's surface forms: the first is the context
            context = list(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else list(ids)
            nxt = context[0]
            for n in range(min(len(history), len(context) - 1), 0, -1):
                tail = list(history[-n:])
                hits = [k + n for k in range(len(context) - n) if context[k:k + n] == tail]
                if hits:
                    nxt = context[hits[0]]
                    break
            z_with[i, nxt] = bonus
        return z_with, z_without
    return step


def _ngrams(ids, n):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


@pytest.mark.parametrize("n", [2, 4])
def test_the_ngram_guard_keeps_context_runs_out_of_the_output(large_model, small_model, tokenizer, monkeypatch, n):
    context = "Zorblax Quentin lives at 42 Hazelmere Lane and is allergic to peanuts."
    outputs = {}
    for guard in (0, n):
        runner = SmallModelRunner(small_model, tokenizer)
        proc = CoSteerLogitsProcessor(runner, [context], variants=Variants(ngram_guard=guard))
        # the guard needs the context's ids even when off: the copier reads them from the request
        monkeypatch.setattr(Steerer, "request", _request_with_context_ids(Steerer.request))
        monkeypatch.setattr(runner, "step", _copier(proc.steerer))
        tokenizer.padding_side = "left"
        enc = tokenizer.apply_chat_template([[{"role": "user", "content": USERS[0]}]], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = large_model.generate(**enc, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                                   max_new_tokens=24, min_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
        prompt = enc["input_ids"][0].tolist()
        outputs[guard] = (prompt, out[0, len(prompt):].tolist(), proc.steerer.slot_stats(proc._slots[0]))
        monkeypatch.undo()
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    prompt, plain, _ = outputs[0]
    private = _ngrams(context_ids, n) - _ngrams(prompt, n)
    assert _ngrams(prompt[-(n - 1):] + plain, n) & private  # without the guard the copier leaks the context
    prompt, guarded, stats = outputs[n]
    assert not _ngrams(prompt[-(n - 1):] + guarded, n) & private  # with it: never a run of n context tokens
    assert stats["guard_fired"] > 0


def _request_with_context_ids(real):
    def request(self, prompt_ids, context, **kw):
        req = real(self, prompt_ids, context, **kw)
        if not req.context_ids:
            object.__setattr__(req, "context_ids", self.large_tokenizer(context, add_special_tokens=False)["input_ids"])
        return req
    return request


@pytest.mark.parametrize("variants", [Variants(plausibility=0.2), Variants(plausibility=0.2, plausibility_mode="large"),
                                      Variants(delta_clip=0.3), Variants(placebo=True), Variants(ngram_guard=1)])
def test_each_option_changes_the_step_and_off_is_identical(small_model, tokenizer, variants):
    plain, styled, off = (make(small_model, tokenizer) for _ in range(3))
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(3)) * 2
    out = {}
    for name, steerer, v in (("plain", plain, Variants()), ("styled", styled, variants), ("off", off, Variants())):
        slots = admit_all(steerer, tokenizer, 3, gain=3.0, variants=v)
        out[name] = steerer.step(logits.clone(), [0, 1, 2], slots, [[], [], []])
    assert torch.equal(out["plain"], out["off"])
    assert not torch.equal(out["plain"], out["styled"])
    assert not torch.isnan(out["styled"]).any()


def test_the_ngram_guard_default_is_the_modes(small_model, tokenizer):
    """``Variants().ngram_guard`` is ``None``: the steerer's default applies (split mode: on); an explicit
    ``0`` switches the guard off there, an explicit ``n`` wins everywhere."""
    from costeer_processor.core import SPLIT_NGRAM_GUARD

    assert Variants().ngram_guard is None and not Variants().steers_style
    assert Variants().with_ngram_default(4).ngram_guard == 4
    assert Variants(ngram_guard=0).with_ngram_default(4).ngram_guard == 0
    assert Variants(ngram_guard=6).with_ngram_default(4).ngram_guard == 6
    ids = prompt_ids(tokenizer, USERS[0])
    for default, variants, want in [(0, Variants(), 0), (SPLIT_NGRAM_GUARD, Variants(), SPLIT_NGRAM_GUARD),
                                    (SPLIT_NGRAM_GUARD, Variants(gate_threshold=0.1), SPLIT_NGRAM_GUARD),
                                    (SPLIT_NGRAM_GUARD, Variants(ngram_guard=0), 0), (0, Variants(ngram_guard=5), 5)]:
        steerer = Steerer(SmallModelRunner(small_model, tokenizer), tokenizer, [tokenizer.eos_token_id],
                          ngram_default=default)
        request = steerer.request(ids, CONTEXTS[0], gain=1.5, variants=variants)
        assert request.variants.ngram_guard == want
        assert bool(request.context_ids) == (want > 0)
        slot = steerer.admit(request)
        assert int(steerer.slots.ngram[slot]) == want
        steerer.release(slot)
    for bad in (-1, 65, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="ngram_default"):
            Steerer(SmallModelRunner(small_model, tokenizer), tokenizer, [1], ngram_default=bad)
