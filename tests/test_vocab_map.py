"""The different-tokenizer ("map") variant."""

import torch
from transformers import LogitsProcessorList

from costeer_processor import CoSteerConfig, SmallModelRunner, steer
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.testing import CORPUS, build_tiny_model, build_tiny_tokenizer
from costeer_processor.vocab import VocabularyMap

from test_hf import MAX_NEW, batch_inputs, generate


def other_tokenizer():
    return build_tiny_tokenizer(vocab_size=400, corpus=CORPUS.replace("e", "E") + " " + CORPUS[:300])


def test_map_is_deterministic_and_cached(tokenizer):
    other = other_tokenizer()
    a, b = VocabularyMap(tokenizer, other), VocabularyMap(tokenizer, other)
    assert torch.equal(a.large_ids, b.large_ids) and torch.equal(a.small_ids, b.small_ids)
    assert 0 < a.size < len(tokenizer) and not a.identical
    lv, sv = tokenizer.get_vocab(), other.get_vocab()
    inv_l = {i: t for t, i in lv.items()}
    for l, s in zip(a.large_ids.tolist(), a.small_ids.tolist()):
        assert sv[inv_l[l]] == s  # same token string on both sides
    assert a.large_ids.tolist() == sorted(a.large_ids.tolist())
    assert VocabularyMap.for_pair(tokenizer, other) is VocabularyMap.for_pair(tokenizer, other)
    assert VocabularyMap(tokenizer, tokenizer).identical


def test_mapped_path_equals_plain_path_for_identical_tokenizers(large_model, small_model, tokenizer, prompts, contexts):
    runner = SmallModelRunner(small_model, tokenizer)
    plain = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, prompts, contexts))
    vmap = VocabularyMap(tokenizer, tokenizer)
    mapped = generate(large_model, tokenizer, prompts, CoSteerLogitsProcessor(runner, prompts, contexts, vocab_map=vmap))
    assert torch.equal(plain, mapped)


def test_mapped_steering_with_different_tokenizers(large_model, tokenizer, prompts, contexts):
    other = other_tokenizer()
    small = build_tiny_model(other, hidden_size=64, seed=3)
    runner = SmallModelRunner(small, other)
    vmap = VocabularyMap.for_pair(tokenizer, other)
    proc = CoSteerLogitsProcessor(runner, prompts, contexts, vocab_map=vmap)
    out = generate(large_model, tokenizer, prompts, proc)
    assert out.shape == (3, MAX_NEW)
    allowed = set(vmap.large_ids.tolist())
    assert set(out.flatten().tolist()) <= allowed  # every steered choice exists in both vocabularies
    # one step by hand: steer on the common tokens, the rest impossible
    inputs = batch_inputs(tokenizer, prompts)
    scores = large_model(**inputs).logits[:, -1]
    fresh = CoSteerLogitsProcessor(runner, prompts, contexts, vocab_map=vmap)
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
