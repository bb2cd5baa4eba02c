"""The small model's KV storage: in-place decode writes, a failed forward changes nothing, the context cache."""

import pytest
import torch

from costeer_processor import SmallModelRunner
from costeer_processor.kv_cache import ContextCache
from costeer_processor.packed_kv import PackedRows

CHAT = [{"role": "user", "content": "Suggest a dinner recipe."}]
OTHER_CHAT = [{"role": "user", "content": "Write a story about a dragon."}]
CONTEXT = "I am vegan and I love spicy food. " * 6


def run(runner, key, messages, context, steps=6, salt=None):
    """Drives one request like an adapter does: greedy on the with-context branch, returns both logits."""
    w, wo = runner.encode_branches(messages, context)
    runner.add(key, w, wo, salt=salt)
    out, fed = [], []
    for _ in range(steps):
        zw, zo = runner.step([(key, list(fed))])
        out.append((zw.clone(), zo.clone()))
        fed.append(int(zw[0].argmax()))
    runner.remove(key)
    return fed, out


def test_a_cache_hit_gives_the_output_of_a_miss(small_model, tokenizer):
    cached = SmallModelRunner(small_model, tokenizer, context_cache_mb=64)
    plain = SmallModelRunner(small_model, tokenizer, context_cache_mb=0)
    ref_tokens, ref_logits = run(plain, "a", CHAT, CONTEXT)
    first = run(cached, "a", CHAT, CONTEXT)
    tokens_before = cached.prefill_tokens
    second = run(cached, "b", OTHER_CHAT, CONTEXT)  # same user context, another prompt: a hit
    hit_prefill = cached.prefill_tokens - tokens_before
    assert cached.context_cache.stats()["hits"] == 1 and len(cached.context_cache) == 1
    assert first[0] == ref_tokens
    for (a, b), (c, d) in zip(first[1], ref_logits):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, d, atol=1e-4, rtol=1e-4)
    ref_other = run(plain, "b", OTHER_CHAT, CONTEXT)
    assert second[0] == ref_other[0]
    for (a, _), (c, _) in zip(second[1], ref_other[1]):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    w, wo = cached.encode_branches(OTHER_CHAT, CONTEXT)
    assert hit_prefill < len(w) - w.shared + len(wo) + 1  # the context prefix was not run again
    assert w.shared > 20


def test_different_contexts_and_salts_never_share(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer, context_cache_mb=64)
    plain = SmallModelRunner(small_model, tokenizer, context_cache_mb=0)
    run(runner, "a", CHAT, CONTEXT)
    other_context = "I only eat meat and hate spicy food. " * 6
    tokens, _ = run(runner, "b", CHAT, other_context)
    assert tokens == run(plain, "b", CHAT, other_context)[0]
    run(runner, "c", CHAT, CONTEXT, salt="tenant-2")
    stats = runner.context_cache.stats()
    assert stats["hits"] == 0 and stats["entries"] == 3  # 2 contexts + the same context under another salt
    run(runner, "d", OTHER_CHAT, CONTEXT, salt="tenant-2")
    assert runner.context_cache.stats()["hits"] == 1


def test_eviction_keeps_the_cache_under_its_cap(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer, context_cache_mb=64)
    w, _ = runner.encode_branches(CHAT, CONTEXT)
    one_entry = 2 * small_model.config.num_hidden_layers * w.shared * small_model.config.num_key_value_heads \
        * (small_model.config.hidden_size // small_model.config.num_attention_heads) * 4
    runner.context_cache = ContextCache(int(one_entry * 2.5))
    for i in range(4):
        run(runner, i, CHAT, CONTEXT.replace("vegan", f"vegan{i}"), steps=1)
    stats = runner.context_cache.stats()
    assert stats["entries"] == 2 and stats["evictions"] >= 2 and stats["bytes"] <= stats["max_bytes"]
    with pytest.raises(ValueError, match="context_cache_mb"):
        SmallModelRunner(small_model, tokenizer, context_cache_mb=-1)


def test_decode_writes_in_place_and_joining_moves_nobody(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    runner._store = store = PackedRows(small_model.config, torch.float32, runner.device, block=64)
    w, wo = runner.encode_branches(CHAT, "I am vegan.")
    runner.add("a", w, wo)
    runner.step([("a", [])])
    rows_a = runner._requests["a"].rows
    blocks_a = (store.owner == rows_a[0]).nonzero().flatten().tolist()
    runner.add("b", *runner.encode_branches(OTHER_CHAT, "I like dragons."))  # written into free blocks
    runner.step([("a", []), ("b", [])])
    assert (store.owner == rows_a[0]).nonzero().flatten().tolist() == blocks_a  # "a" was not moved
    ptr = store.keys[0].data_ptr()
    for t in range(1, 4):
        runner.step([("a", list(range(5, 5 + t))), ("b", list(range(5, 5 + t)))])
    assert len(w) + 3 < 64 and store.keys[0].data_ptr() == ptr  # no block filled up: every column written in place
    assert (store.owner == rows_a[0]).nonzero().flatten().tolist()[:len(blocks_a)] == blocks_a


def test_a_forward_that_fails_half_way_leaves_the_runner_consistent(small_model, tokenizer, monkeypatch):
    faulty = SmallModelRunner(small_model, tokenizer)
    clean = SmallModelRunner(small_model, tokenizer)
    for r in (faulty, clean):
        for key, (chat, ctx) in enumerate([(CHAT, "I am vegan."), (OTHER_CHAT, "I like dragons.")]):
            r.add(key, *r.encode_branches(chat, ctx))
        r.step([(0, []), (1, [])])
    layer = small_model.model.layers[1]
    original = layer.forward

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault in layer 1")

    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        faulty.step([(0, [7]), (1, [8])])  # layer 0 already appended its column when layer 1 fails
    monkeypatch.setattr(layer, "forward", original)
    a = faulty.step([(0, [7]), (1, [8])])
    b = clean.step([(0, [7]), (1, [8])])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert faulty.kv_tokens == clean.kv_tokens and faulty.stats()["kv_bytes"] == clean.stats()["kv_bytes"]
