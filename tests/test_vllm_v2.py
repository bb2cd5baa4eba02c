"""The Model Runner V2 processor on the CPU, with a synthetic LogitsContext and request state.

vLLM's V2 runner needs a GPU (and Triton), so these tests play its part: request slots, the
committed-token table ``all_token_ids``, prompt / prefill lengths, rows reordered every step,
chunked prefills, slots freed without notice, preemption with resumption in another slot.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from costeer_processor import SmallModelRunner
from costeer_processor.hf import CoSteerLogitsProcessor as HFProcessor

SYSTEM = "You are a helpful assistant."
PROMPTS = ["Suggest a dinner recipe.", "Tell me about the history of tea.", "Write a story about a dragon.",
           "Give me three tips for learning a new programming language."]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer uplifting, warm answers.",
            "My hobbies are chess and hiking.", "Please answer as concisely as possible."]
MAX_REQS, MAX_LEN = 8, 256


def chat_text(tok, user):
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


def fake_vllm_config(large_dir, costeer: dict, speculative=None):
    model_config = SimpleNamespace(tokenizer=str(large_dir), model=str(large_dir), trust_remote_code=False,
                                   tokenizer_revision=None, dtype=torch.float32,
                                   try_get_generation_config=lambda: {})
    return SimpleNamespace(model_config=model_config, additional_config={"costeer": costeer},
                           speculative_config=speculative)


class Runner:
    """Plays Model Runner V2 around a processor: slots, committed ids, greedy sampling, full recompute."""

    def __init__(self, proc_factory, model):
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

        self.model = model
        self.all_ids = torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int32)
        self.total = torch.zeros(MAX_REQS, dtype=torch.int32)
        self.prompt_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.state = LogitsProcRequestState(
            device=torch.device("cpu"), max_num_reqs=MAX_REQS, vocab_size=model.config.vocab_size,
            all_token_ids=SimpleNamespace(gpu=self.all_ids), prompt_len=self.prompt_len,
            prefill_len=self.prefill_len, total_len=SimpleNamespace(gpu=self.total))
        self.proc = proc_factory(self.state)
        self.computed = np.zeros(MAX_REQS, dtype=np.int64)  # tokens already "in the KV cache"
        self.free = list(range(MAX_REQS))[::-1]
        self.slot_of: dict[int, int] = {}  # request id -> slot

    def add(self, rid, req, chunk=None):
        slot = self.free.pop()
        seq = req["prompt"] + req["out"]
        self.all_ids[slot].zero_()
        self.all_ids[slot, : len(seq)] = torch.tensor(seq, dtype=torch.int32)
        self.prompt_len.np[slot] = len(req["prompt"])
        self.prefill_len.np[slot] = len(seq)
        self.total[slot] = len(seq)
        self.computed[slot] = 0 if chunk is None else 0
        req["chunk"] = chunk
        self.slot_of[rid] = slot
        needs = self.proc.add_request(slot, req["params"])
        return slot, needs

    def remove(self, rid):  # finish or preempt: V2 tells the processor nothing
        self.free.append(self.slot_of.pop(rid))

    def step(self, rids, reqs, rng=None):
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        order = list(rids)
        if rng is not None:
            rng.shuffle(order)  # V2 reorders rows every step
        slots, pos, logits = [], [], []
        for rid in order:
            slot, req = self.slot_of[rid], reqs[rid]
            total = int(self.total[slot])
            chunk = req.get("chunk")
            if self.computed[slot] < self.prefill_len.np[slot] and chunk:  # a chunked prefill
                upto = min(int(self.computed[slot]) + chunk, total)
            else:
                upto = total
            self.computed[slot] = upto
            with torch.no_grad():
                z = self.model(self.all_ids[slot, :upto].long()[None]).logits[0, -1].float()
            slots.append(slot)
            pos.append(upto - 1)
            logits.append(z)
        logits = torch.stack(logits)
        idx = torch.tensor(slots, dtype=torch.int32)
        ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                            input_ids=torch.stack([self.all_ids[s, p] for s, p in zip(slots, pos)]),
                            pos=torch.tensor(pos, dtype=torch.int64),
                            seq_lens_upper_bound_np=np.array([p + 1 for p in pos], dtype=np.int32))
        before = logits.clone()
        out = self.proc.apply(logits, ctx)
        for row, rid in enumerate(order):
            slot, req = self.slot_of[rid], reqs[rid]
            if pos[row] + 1 < self.total[slot]:
                assert torch.equal(out[row], before[row])  # partial prefill rows are left alone
                continue
            tok = int(out[row].argmax())
            req["out"].append(tok)
            self.all_ids[slot, self.total[slot]] = tok
            self.total[slot] += 1
            self.computed[slot] = int(self.total[slot]) - 1
        return out, before, order


@pytest.fixture(scope="module")
def parts(tiny_pair_dirs):
    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    large_dir, small_dir = tiny_pair_dirs
    tok = AutoTokenizer.from_pretrained(str(large_dir))
    model = AutoModelForCausalLM.from_pretrained(str(large_dir), dtype=torch.float32).eval()

    def factory(**costeer):
        cfg = fake_vllm_config(large_dir, {"small_model": str(small_dir), **costeer})
        return lambda state: CoSteerLogitsProcessorV2(cfg, state)
    return tok, model, factory


def make_request(tok, prompt, context, max_tokens=256, **extra):
    from vllm import SamplingParams

    args = {"costeer_context": context, **extra} if context else None
    return {"prompt": tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"], "out": [],
            "params": SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=args)}


def alone(parts, prompt, context, steps, **costeer):
    tok, model, factory = parts
    r = Runner(factory(**costeer), model)
    req = make_request(tok, prompt, context)
    r.add(0, req)
    for _ in range(steps):
        r.step([0], {0: req})
    return req["out"]


def test_v2_is_a_model_runner_v2_processor():
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    assert issubclass(CoSteerLogitsProcessorV2, LogitsProcessor)
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert _load_v2_logitsprocs_by_fqcns(["costeer_processor.vllm:CoSteerLogitsProcessorV2"]) == [
        CoSteerLogitsProcessorV2]


def test_v2_equals_the_hf_processor(parts, tiny_pair_dirs):
    tok, model, _ = parts
    small = AutoModelForCausalLM.from_pretrained(str(tiny_pair_dirs[1]), dtype=torch.float32).eval()
    runner = SmallModelRunner(small, tok)
    n = 10
    for p, c in zip(PROMPTS[:2], CONTEXTS[:2]):
        proc = HFProcessor(runner, [c])  # reads the prompt from input_ids, as the V2 processor does
        enc = tok([chat_text(tok, p)], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id)
        want = out[0, enc["input_ids"].shape[1]:].tolist()
        got = alone(parts, p, c, n)
        if tok.eos_token_id in got:  # HF's min_new_tokens masks EOS; compare up to where V2 would stop
            got = got[: got.index(tok.eos_token_id)]
            want = want[: len(got)]
        assert got == want


def test_v2_churn_reorder_chunked_prefill_preemption(parts):
    tok, model, factory = parts
    steps = 6
    specs = [(PROMPTS[i % 4], CONTEXTS[i % 4] if i % 3 else None) for i in range(6)]
    want = [alone(parts, p, c, steps) for p, c in specs]
    rng = random.Random(1)
    r = Runner(factory(), model)
    reqs = {i: make_request(tok, *s) for i, s in enumerate(specs)}
    pending, parked, live = list(reqs), [], []
    preempted = 0
    while pending or parked or live:
        for rid in list(live):
            if len(reqs[rid]["out"]) >= steps:
                live.remove(rid)
                r.remove(rid)
            elif reqs[rid]["out"] and rng.random() < 0.2 and preempted < 4:
                live.remove(rid)
                r.remove(rid)  # preempted: its slot goes back to the free list, nobody is told
                parked.append(rid)
                preempted += 1
        while (pending or parked) and len(live) < 3:
            rid = parked.pop(0) if parked and (rng.random() < 0.5 or not pending) else pending.pop(0)
            r.add(rid, reqs[rid], chunk=rng.choice([None, 7]))
            live.append(rid)
        if live:
            r.step(live, reqs, rng)
    assert preempted > 0
    assert [reqs[i]["out"][:steps] for i in range(len(specs))] == want
    # some steered request really differs from its unsteered twin
    assert any(w != alone(parts, s[0], None, steps) for w, s in zip(want, specs) if s[1])
    # finished slots give up their small-model rows at the next step without them
    assert r.proc.runner.cached_rows >= 1
    reqs["plain"] = make_request(tok, PROMPTS[0], None)
    r.add("plain", reqs["plain"])
    r.step(["plain"], reqs)
    assert r.proc.runner.cached_rows == 0 and len(r.proc.runner) == 0


def test_v2_unsteered_rows_untouched_and_early_return(parts):
    tok, model, factory = parts
    r = Runner(factory(), model)
    reqs = {0: make_request(tok, PROMPTS[0], None), 1: make_request(tok, PROMPTS[1], CONTEXTS[1])}
    _, needs = r.add(0, reqs[0])
    assert needs is False
    out, before, _ = r.step([0], reqs)
    assert out is not None and torch.equal(out, before) and r.proc.engine.steps == 0
    _, needs = r.add(1, reqs[1])
    assert needs is True
    out, before, order = r.step([0, 1], reqs)
    row0, row1 = order.index(0), order.index(1)
    assert torch.equal(out[row0], before[row0]) and not torch.equal(out[row1], before[row1])
    assert r.proc.engine.steps == 1 and r.proc.runner.cached_rows == 1


def test_v2_slot_reuse_and_absent_slots_free_the_small_model(parts):
    tok, model, factory = parts
    r = Runner(factory(), model)
    reqs = {0: make_request(tok, PROMPTS[0], CONTEXTS[0]), 1: make_request(tok, PROMPTS[1], CONTEXTS[1])}
    r.add(0, reqs[0])
    r.add(1, reqs[1])
    r.step([0, 1], reqs)
    assert r.proc.runner.cached_rows == 2
    r.remove(0)  # finished
    r.step([1], reqs)
    assert r.proc.runner.cached_rows == 1  # request 0's rows freed although V2 never said so
    reqs[2] = make_request(tok, PROMPTS[2], None)
    slot, _ = r.add(2, reqs[2])  # takes request 0's slot: its handle is dropped
    assert slot == r.slot_of[2] and len(r.proc._slots) == 1


def test_v2_gating_state_follows_a_preempted_request(parts):
    tok, model, factory = parts
    r = Runner(factory(gate_threshold=0.999, gate_patience=2), model)
    reqs = {0: make_request(tok, PROMPTS[0], CONTEXTS[0]), 1: make_request(tok, PROMPTS[1], None)}
    r.add(1, reqs[1])  # occupies slot 0
    r.add(0, reqs[0])
    r.step([0, 1], reqs)
    old_slot = r.slot_of[0]
    handle = r.proc._slots[old_slot]
    assert handle.streak == 1 and handle.active
    r.remove(0)  # preempted: V2 frees the slot without telling the processor
    r.free.insert(0, r.free.pop())  # ... and hands out another slot when the request comes back
    r.step([1], reqs)  # the step that preempted it runs without it (vLLM resumes a step later at the earliest)
    assert r.proc.runner.cached_rows == 0
    r.add(0, reqs[0])  # resumed in another slot with the same SamplingParams object
    assert r.slot_of[0] != old_slot and old_slot not in r.proc._slots
    r.step([0, 1], reqs)
    assert r.proc._slots[r.slot_of[0]] is handle and r.proc.resumed == 1
    assert handle.streak == 2 and not handle.active and r.proc.runner.cached_rows == 0


def test_v2_gating_state_survives_slot_reuse_and_finished_requests_are_forgotten(parts):
    tok, model, factory = parts
    r = Runner(factory(gate_threshold=0.999, gate_patience=3), model)
    reqs = {0: make_request(tok, PROMPTS[0], CONTEXTS[0]), 1: make_request(tok, PROMPTS[1], CONTEXTS[1], max_tokens=2)}
    r.add(0, reqs[0])
    r.add(1, reqs[1])
    r.step([0, 1], reqs)
    r.step([0, 1], reqs)  # request 1 has its max_tokens now: finished
    handle = r.proc._slots[r.slot_of[0]]
    assert handle.streak == 2
    r.remove(0)  # preempted
    r.remove(1)  # finished
    reqs[2], reqs[3] = make_request(tok, PROMPTS[2], None), make_request(tok, PROMPTS[3], None)
    r.add(2, reqs[2])  # both freed slots are reused: their handles are closed
    r.add(3, reqs[3])
    assert len(r.proc.engine.parking) == 1  # the preempted one only: a finished request is never parked
    r.step([2, 3], reqs)
    r.add(0, reqs[0])
    assert r.proc._slots[r.slot_of[0]] is handle and len(r.proc.engine.parking) == 0
    r.step([0, 2, 3], reqs)
    assert handle.streak == 3 and not handle.active
    # a parked request that vLLM drops (aborted while preempted) leaves the parking with it
    r.remove(0)
    reqs[4] = make_request(tok, PROMPTS[0], None)
    r.step([2, 3], reqs)
    r.add(4, reqs[4])  # reuses request 0's slot: its (switched-off) handle is parked ...
    assert len(r.proc.engine.parking) == 1
    del reqs[0], handle
    assert len(r.proc.engine.parking) == 0  # ... until its SamplingParams are gone


def test_v2_n_children_sharing_one_params_object_are_steered_separately(parts):
    """vLLM gives unseeded ``n > 1`` children one SamplingParams object: each is still its own request."""
    tok, model, factory = parts
    steps = 5
    want = alone(parts, PROMPTS[0], CONTEXTS[0], steps)
    r = Runner(factory(), model)
    first = make_request(tok, PROMPTS[0], CONTEXTS[0])
    reqs = {i: {**first, "out": []} for i in range(3)}  # same prompt, same params object
    for i in reqs:
        r.add(i, reqs[i])
    assert len({id(h) for h in r.proc._slots.values()}) == 3
    for _ in range(steps):
        r.step(list(reqs), reqs, random.Random(0))
    assert all(reqs[i]["out"] == want for i in reqs)
    assert r.proc.runner.cached_rows == 3


@pytest.mark.parametrize("env,triton,config,want", [
    ("1", False, None, "V2"), ("0", True, None, "V1"), (None, True, None, "V2"), (None, False, None, "V1"),
    ("1", False, False, "V1"), (None, False, True, "V2"),
])
def test_processor_fqcn_follows_the_runner_vllm_picks(monkeypatch, env, triton, config, want):
    import vllm.envs
    from vllm import triton_utils

    from costeer_processor.vllm import V1_PROCESSOR, V2_PROCESSOR, processor_fqcn

    if env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", env)
    if vllm.envs._is_envs_cache_enabled():  # pragma: no cover - only after an in-process engine
        monkeypatch.setattr(vllm.envs, "__getattr__", vllm.envs.__getattr__.__wrapped__)
    monkeypatch.setattr(triton_utils, "HAS_TRITON", triton)
    cfg = None if config is None else SimpleNamespace(use_v2_model_runner=config)  # the engine's own decision wins
    assert processor_fqcn(cfg) == {"V1": V1_PROCESSOR, "V2": V2_PROCESSOR}[want]
    if config is None:
        assert processor_fqcn() == processor_fqcn(None)


def test_v2_refuses_speculative_decoding(tiny_pair_dirs):
    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    cfg = fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tiny_pair_dirs[1])}, speculative=object())
    with pytest.raises(ValueError, match="speculative decoding"):
        CoSteerLogitsProcessorV2(cfg, SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4))


def test_v2_validate_params_is_the_shared_one():
    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    with pytest.raises(ValueError, match="costeer_lam"):
        CoSteerLogitsProcessorV2.validate_params(SimpleNamespace(extra_args={"costeer_context": "c",
                                                                             "costeer_lam": 0}))
    CoSteerLogitsProcessorV2.validate_params(SimpleNamespace(extra_args={"unrelated": 1}))
    CoSteerLogitsProcessorV2.validate_params(SimpleNamespace(extra_args=None))


def test_v2_prompt_embeddings_end_the_request(parts, tiny_pair_dirs):
    """With prompt embeddings allowed, a prompt of 0 ids (vLLM's filler for embeddings) is ended, never steered
    on a prompt it does not have; a request with real ids next to it is steered as usual."""
    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    tok, model, _ = parts
    cfg = fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tiny_pair_dirs[1])})
    cfg.model_config.enable_prompt_embeds = True
    r = Runner(lambda state: CoSteerLogitsProcessorV2(cfg, state), model)
    embeds = make_request(tok, PROMPTS[0], CONTEXTS[0])
    embeds["prompt"] = [0] * len(embeds["prompt"])
    reqs = {0: embeds, 1: make_request(tok, PROMPTS[1], CONTEXTS[1])}
    r.add(0, reqs[0])
    r.add(1, reqs[1])
    out, before, order = r.step([0, 1], reqs)
    row0, row1 = order.index(0), order.index(1)
    eos = r.proc.engine.steerer.end_token_id
    assert out[row0, eos] == 0 and torch.isneginf(out[row0]).sum() == out.shape[1] - 1
    assert "embeddings" in r.proc._slots[r.slot_of[0]].failed
    assert not torch.equal(out[row1], before[row1]) and r.proc._slots[r.slot_of[1]].failed is None


def test_v2_refuses_a_request_state_it_cannot_read(tiny_pair_dirs):
    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    cfg = fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tiny_pair_dirs[1])})
    state = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4, prompt_len=SimpleNamespace(np=None),
                            prefill_len=SimpleNamespace(np=None), all_token_ids=SimpleNamespace())
    with pytest.raises(ValueError, match=r"all_token_ids\.gpu"):
        CoSteerLogitsProcessorV2(cfg, state)
