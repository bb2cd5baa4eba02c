"""The different-tokenizer ("map") variant: HF processor, vLLM processor, split mode."""

import json

import pytest
import torch
from transformers import LogitsProcessorList

from costeer_processor import CoSteerConfig, SmallModelRunner, steer
from costeer_processor.core import Variants
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.testing import build_other_tokenizer, build_tiny_model
from costeer_processor.vocab import ChatTemplateInverter, VocabularyMap

from conftest import CONTEXTS, PROMPTS
from test_hf import MAX_NEW, batch_inputs, generate


def other_tokenizer():
    return build_other_tokenizer()


def test_map_is_deterministic_and_cached(tokenizer):
    other = other_tokenizer()
    a, b = VocabularyMap(tokenizer, other), VocabularyMap(tokenizer, other)
    assert torch.equal(a.large_ids, b.large_ids) and torch.equal(a.small_ids, b.small_ids)
    assert 0 < a.size < len(tokenizer) and not a.identical
    lv, sv = tokenizer.get_vocab(), other.get_vocab()
    inv_l = {i: t for t, i in lv.items()}
    for l, s in zip(a.large_ids.tolist(), a.small_ids.tolist()):
        if l == tokenizer.eos_token_id:  # end-of-sequence pairs up whatever its spelling
            assert s == other.eos_token_id and inv_l[l] not in sv
            continue
        assert sv[inv_l[l]] == s  # same token string on both sides
    assert a.large_ids.tolist() == sorted(a.large_ids.tolist())
    assert VocabularyMap.for_pair(tokenizer, other) is VocabularyMap.for_pair(tokenizer, other)
    assert VocabularyMap(tokenizer, tokenizer).identical


def test_mapped_path_equals_plain_path_for_identical_tokenizers(large_model, small_model, tokenizer, prompts, contexts):
    runner = SmallModelRunner(small_model, tokenizer)
    plain = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, contexts))
    vmap = VocabularyMap(tokenizer, tokenizer)
    mapped = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, contexts, vocab_map=vmap, large_tokenizer=tokenizer))
    assert torch.equal(plain, mapped)


def test_mapped_steering_with_different_tokenizers(large_model, tokenizer, prompts, contexts):
    other = other_tokenizer()
    small = build_tiny_model(other, hidden_size=64, seed=3)
    runner = SmallModelRunner(small, other)
    vmap = VocabularyMap.for_pair(tokenizer, other)
    proc = CoSteerLogitsProcessor(runner, contexts, prompts=prompts, vocab_map=vmap)
    out = generate(large_model, tokenizer, prompts, proc)
    assert out.shape == (3, MAX_NEW)
    allowed = set(vmap.large_ids.tolist())
    assert set(out.flatten().tolist()) <= allowed  # every steered choice exists in both vocabularies
    # one step by hand: steer on the common tokens, the rest impossible
    inputs = batch_inputs(tokenizer, prompts)
    scores = large_model(**inputs).logits[:, -1]
    fresh = CoSteerLogitsProcessor(runner, contexts, prompts=prompts, vocab_map=vmap)
    got = fresh(inputs["input_ids"], scores)
    w = [runner.encode_branches(p, c) for p, c in zip(prompts, contexts)]
    with torch.no_grad():
        zw = torch.stack([small(torch.tensor([x[0]])).logits[0, -1] for x in w])
        zwo = torch.stack([small(torch.tensor([x[1]])).logits[0, -1] for x in w])
    expect = steer(scores[:, vmap.large_ids], zw[:, vmap.small_ids], zwo[:, vmap.small_ids], CoSteerConfig())
    torch.testing.assert_close(got[:, vmap.large_ids], expect, atol=1e-4, rtol=1e-4)
    outside = torch.ones(scores.shape[1], dtype=torch.bool)
    outside[vmap.large_ids] = False
    assert torch.isneginf(got[:, outside]).all()


# ------------------------------------------------------------------------------------------------
# pieces: lifting small logits onto large ids, recovering messages from a chat template
# ------------------------------------------------------------------------------------------------
def test_lift_matches_steer_on_the_map(tokenizer):
    other = other_tokenizer()
    vmap = VocabularyMap.for_pair(tokenizer, other)
    g = torch.Generator().manual_seed(0)
    large = torch.randn(2, len(tokenizer) + 8, generator=g)  # padded large logits
    zw, zo = torch.randn(2, len(other), generator=g), torch.randn(2, len(other), generator=g)
    want = vmap.steer(large, zw, zo, 2.0)
    on = vmap.on_map(large.shape[1])
    assert int(on.sum()) == vmap.size and not on[len(tokenizer):].any()
    got = steer(large.masked_fill(~on, float("-inf")), vmap.lift(zw, large.shape[1]), vmap.lift(zo, large.shape[1]),
                2.0)
    torch.testing.assert_close(got, want)
    assert torch.isneginf(got[:, ~on]).all() and torch.isfinite(got[:, on]).all()


MESSAGES = [
    [{"role": "user", "content": "Suggest a dinner recipe."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi\n\nthere"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def test_chat_template_inverter_round_trips_both_families(tokenizer):
    for tok in (tokenizer, other_tokenizer()):
        inv = ChatTemplateInverter(tok)
        assert inv.usable
        for msgs in MESSAGES:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert inv.parse(text) == msgs
            assert inv.parse(text + "x") is None  # not what the template writes
        assert inv.parse("plain completion text") is None
        no_gen = tok.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=False)
        assert inv.parse(no_gen) is None


def test_inverter_without_a_template_is_unusable(tokenizer):
    bare = other_tokenizer()
    bare.chat_template = None
    assert not ChatTemplateInverter(bare).usable


# ------------------------------------------------------------------------------------------------
# vLLM: the processor with two tokenizer families (V1 adapter driven by hand, then a real engine)
# ------------------------------------------------------------------------------------------------
SYSTEM = "You are a helpful assistant."


def _chat(tok, user):
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def mixed(mixed_pair_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    large_dir, small_dir = mixed_pair_dirs
    large_tok, small_tok = AutoTokenizer.from_pretrained(str(large_dir)), AutoTokenizer.from_pretrained(str(small_dir))
    large = AutoModelForCausalLM.from_pretrained(str(large_dir), dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(str(small_dir), dtype=torch.float32).eval()
    return large, small, large_tok, small_tok, large_dir, small_dir


def hf_mapped(mixed, prompt, context, n, **kw):
    """The HF processor with a vocabulary map: the reference for every other place."""
    large, small, large_tok, small_tok, _, _ = mixed
    runner = SmallModelRunner(small, small_tok)
    # the prompt is read from input_ids (as vLLM reads prompt ids) and bridged to the small model's template
    proc = CoSteerLogitsProcessor(runner, [context], vocab_map=VocabularyMap.for_pair(large_tok, small_tok),
                                  large_tokenizer=large_tok, **kw)
    enc = large_tok(_chat(large_tok, prompt), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = large.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             logits_processor=LogitsProcessorList([proc]), pad_token_id=large_tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _v1_run(proc, model, tok, prompt, context, n, **extra):
    from test_vllm_offline import Driver, make_request

    d = Driver(proc, model)
    r = make_request(tok, prompt, context, **extra)
    d.rows = [r]
    d.update(added=[(0, r["params"], r["prompt"], r["out"])])
    for _ in range(n):
        d.step()
    return r["out"]


def test_vllm_v1_mapped_path_equals_the_hf_mapped_processor(mixed):
    from test_vllm_offline import fake_vllm_config

    from costeer_processor.vllm import CoSteerLogitsProcessor as V1

    large, small, large_tok, small_tok, large_dir, small_dir = mixed
    proc = V1(fake_vllm_config(large_dir, {"small_model": str(small_dir)}), torch.device("cpu"), False)
    vmap = proc.engine.vocab_map
    assert vmap is not None and vmap.size == VocabularyMap.for_pair(large_tok, small_tok).size
    # the small model reads the conversation in its own template, not the large model's
    prompt_ids = large_tok(_chat(large_tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]
    assert proc.engine.bridge(prompt_ids) == _chat(small_tok, PROMPTS[0])
    n = 10
    plain = []
    for p, c in zip(PROMPTS, CONTEXTS):
        got = _v1_run(proc, large, large_tok, p, c, n)
        assert got == hf_mapped(mixed, p, c, n)
        assert set(got) <= set(vmap.large_ids.tolist())
        plain.append(_v1_run(proc, large, large_tok, p, None, n))
    assert any(a != b for a, b in zip(plain, [hf_mapped(mixed, p, c, n) for p, c in zip(PROMPTS, CONTEXTS)]))
    # gating and the EOS guard ride along per request
    got = _v1_run(proc, large, large_tok, PROMPTS[1], CONTEXTS[1], n, costeer_gate_threshold=0.99,
                  costeer_gate_patience=2)
    assert got == hf_mapped(mixed, PROMPTS[1], CONTEXTS[1], n, variants=Variants(gate_threshold=0.99, gate_patience=2))


def test_vllm_v2_mapped_path_equals_the_hf_mapped_processor(mixed):
    from test_vllm_v2 import Runner, fake_vllm_config, make_request

    from costeer_processor.vllm import CoSteerLogitsProcessorV2

    large, small, large_tok, small_tok, large_dir, small_dir = mixed
    cfg = fake_vllm_config(large_dir, {"small_model": str(small_dir)})
    n = 10
    for p, c in zip(PROMPTS[:2], CONTEXTS[:2]):
        r = Runner(lambda state: CoSteerLogitsProcessorV2(cfg, state), large)
        req = make_request(large_tok, p, c)
        r.add(0, req)
        for _ in range(n):
            r.step([0], {0: req})
        assert r.proc.engine.vocab_map is not None
        assert req["out"] == hf_mapped(mixed, p, c, n)


def test_vllm_vocab_map_on_equals_plain_path_for_one_tokenizer(tiny_pair_dirs):
    from test_vllm_offline import fake_vllm_config

    from costeer_processor.vllm import CoSteerLogitsProcessor as V1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    large_dir, small_dir = tiny_pair_dirs
    tok = AutoTokenizer.from_pretrained(str(large_dir))
    model = AutoModelForCausalLM.from_pretrained(str(large_dir), dtype=torch.float32).eval()
    plain = V1(fake_vllm_config(large_dir, {"small_model": str(small_dir)}), torch.device("cpu"), False)
    mapped = V1(fake_vllm_config(large_dir, {"small_model": str(small_dir), "vocab_map": "on"}),
                torch.device("cpu"), False)
    assert plain.engine.vocab_map is None and mapped.engine.vocab_map.identical
    for p, c in zip(PROMPTS, CONTEXTS):
        assert _v1_run(mapped, model, tok, p, c, 10) == _v1_run(plain, model, tok, p, c, 10)


@pytest.mark.parametrize("value,match", [("off", "vocab_map is 'off'"), ("maybe", "vocab_map must be")])
def test_vllm_vocab_map_setting_is_checked(mixed_pair_dirs, value, match):
    from test_vllm_offline import fake_vllm_config

    from costeer_processor.vllm import CoSteerLogitsProcessor as V1

    large_dir, small_dir = mixed_pair_dirs
    with pytest.raises(ValueError, match=match):
        V1(fake_vllm_config(large_dir, {"small_model": str(small_dir), "vocab_map": value}), torch.device("cpu"),
           False)


def test_vllm_unmapped_outputs_switch_requests_off_and_warn_once(mixed):
    """A token the small model lacks (chosen while unsteered) ends its request (fail closed), with the reason."""
    from test_vllm_offline import fake_vllm_config, make_request
    from vllm.v1.sample.logits_processor import BatchUpdate

    from costeer_processor.vllm import CoSteerLogitsProcessor as V1

    large, small, large_tok, small_tok, large_dir, small_dir = mixed
    proc = V1(fake_vllm_config(large_dir, {"small_model": str(small_dir)}), torch.device("cpu"), False)
    mapped = set(proc.engine.vocab_map.large_ids.tolist())
    unmapped = next(i for i in range(len(large_tok)) if i not in mapped)
    reqs = [make_request(large_tok, PROMPTS[i % 3], CONTEXTS[i % 3]) for i in range(20)]
    for r in reqs:
        r["out"].append(unmapped)
    proc.update_state(BatchUpdate(batch_size=20, removed=[], moved=[],
                                  added=[(i, r["params"], r["prompt"], r["out"]) for i, r in enumerate(reqs)]))
    logits = torch.randn(20, large.config.vocab_size)
    out = proc.apply(logits.clone())
    eos = proc.engine.steerer.end_token_id
    assert (out[:, eos] == 0).all() and torch.isneginf(out).sum() == 20 * (out.shape[1] - 1)  # only EOS possible
    assert len(proc.steered_rows) == 20 and not any(h.active for h in proc.steered_rows.values())
    assert all("no counterpart" in h.failed for h in proc.steered_rows.values()) and proc.runner.cached_rows == 0


@pytest.mark.vllm
def test_vllm_engine_with_two_tokenizer_families_equals_hf(mixed, monkeypatch):
    from test_vllm_offline import ENGINE_ENV, _make_llm, greedy, ids

    from costeer_processor.vllm import CoSteerLogitsProcessor as V1

    for k, v in ENGINE_ENV.items():
        monkeypatch.setenv(k, v)
    large_dir, small_dir = mixed[4], mixed[5]
    llm = _make_llm(large_dir, logits_processors=[V1], additional_config={"costeer": {"small_model": str(small_dir)}})
    try:
        n = 12
        texts = [_chat(mixed[2], p) for p in PROMPTS]
        got = ids(llm.generate(texts, [greedy(n, c, min_tokens=n) for c in CONTEXTS], use_tqdm=False))
        assert got == [hf_mapped(mixed, p, c, n) for p, c in zip(PROMPTS, CONTEXTS)]
        # an over-long context is still refused up front, counted in the small model's own template
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="costeer_context: .*over the limit"):
            llm.generate(texts[:1], [greedy(4, "word " * 600)], use_tqdm=False)
        assert len(ids(llm.generate(texts[:1], [greedy(2, CONTEXTS[0])], use_tqdm=False))[0]) == 2
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


# ------------------------------------------------------------------------------------------------
# split mode with two tokenizer families (the fake server from test_split)
# ------------------------------------------------------------------------------------------------
def test_split_mode_with_two_tokenizer_families_equals_hf(mixed):
    from test_split import SECRET, FakeVLLM, _contains_run, _int_lists

    from costeer_processor.testing import LoopbackProxy

    from costeer_processor.prompts import with_system_prompt
    from costeer_processor.split import SplitCoSteerClient, SplitModeError

    convs = [with_system_prompt(p, SYSTEM) for p in PROMPTS]  # what hf_mapped's large model reads

    large, small, large_tok, small_tok, large_dir, _ = mixed
    runner = SmallModelRunner(small, small_tok)
    n = 12
    want = [hf_mapped(mixed, p, c, n) for p, c in zip(PROMPTS, CONTEXTS)]
    with FakeVLLM(large, large_tok) as fake:
        # without the served model's tokenizer the mismatch is caught at connect
        with pytest.raises(SplitModeError, match="large_tokenizer"):
            SplitCoSteerClient(fake.url, runner).generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=2)
        client = SplitCoSteerClient(fake.url, runner, large_tokenizer=large_dir, lookahead=3)
        assert client.vocab_map is not None
        res = client.generate_batch(convs, CONTEXTS, max_new_tokens=n)
        assert [r.token_ids for r in res] == [w[:len(r.token_ids)] for r, w in zip(res, want)]
        assert all(len(r.token_ids) == n or r.finish_reason == "stop" for r in res)
        # certified top-k on the map: same answers
        certified = SplitCoSteerClient(fake.url, runner, large_tokenizer=large_tok, top_logprobs=2,
                                       certify_levels=(16, -1), lookahead=1)
        cres = certified.generate_batch(convs, CONTEXTS, max_new_tokens=n)
        assert [r.token_ids for r in cres] == [r.token_ids for r in res]
        assert all(r.uncertified == 0 for r in cres)
        # gating hands the rest to the server, whose ids need no mapping
        gated = SplitCoSteerClient(fake.url, runner, large_tokenizer=large_tok, variants=Variants(gate_threshold=0.99, gate_patience=3),
                                   lookahead=1).generate(convs[0], CONTEXTS[0], max_new_tokens=n)
        assert gated.handoff_at == 3
        assert gated.token_ids == hf_mapped(mixed, PROMPTS[0], CONTEXTS[0], n,
                                            variants=Variants(gate_threshold=0.99, gate_patience=3))[:len(gated.token_ids)]
        assert len(runner) == 0
        proxy = LoopbackProxy(fake.url)
        try:
            SplitCoSteerClient(proxy.url, runner, large_tokenizer=large_tok).generate(convs[0], SECRET,
                                                                                      max_new_tokens=6)
            records = proxy.records
        finally:
            proxy.close()
    wire = b"".join(b for _, _, _, b in records).decode("utf-8", "replace")
    assert SECRET[:20] not in wire and "Zorblax" not in wire
    sent = [lst for _, _, _, b in records if b for lst in _int_lists(json.loads(b))]
    secret_ids = large_tok(SECRET, add_special_tokens=False)["input_ids"]
    runs = [secret_ids[i:i + 4] for i in range(len(secret_ids) - 3)]
    assert not any(_contains_run(lst, run) for lst in sent for run in runs)
    prompt_ids = large_tok(_chat(large_tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]
    assert any(_contains_run(lst, prompt_ids) for lst in sent)  # the public prompt went out, in large ids
