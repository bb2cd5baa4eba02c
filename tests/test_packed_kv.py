"""The packed decode cache: the attention kernel against SDPA, sliding windows, memory, supported models."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, Qwen2Config

from costeer_processor import SmallModelRunner
from costeer_processor.packed_kv import (PackedKV, PackedRows, _Step, check_supported, packed_attention,
                                         use_packed_attention)
from costeer_processor.testing import build_tiny_model


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("window", [None, 7])
def test_the_kernel_equals_sdpa_row_by_row(dtype, tol, window):
    g = torch.Generator().manual_seed(0)
    kv_heads, groups, dim, block = 2, 3, 16, 8
    lengths = [1, 8, 9, 30, 3]
    per_row = [math.ceil(n / block) for n in lengths]
    blocks = sum(per_row) + 3  # three free blocks full of garbage
    pool_k = torch.randn(blocks, kv_heads, block, dim, generator=g).to(dtype)
    pool_v = torch.randn(blocks, kv_heads, block, dim, generator=g).to(dtype)
    order = torch.randperm(blocks, generator=g)  # a row's blocks anywhere in the pool, in any order
    owner = torch.full((blocks,), len(lengths))
    fill = torch.zeros(blocks, dtype=torch.long)
    start = torch.zeros(blocks, dtype=torch.long)
    taken = 0
    for r, (n, k) in enumerate(zip(lengths, per_row)):
        for j in range(k):
            b = int(order[taken + k - 1 - j])  # reversed: block order must not matter
            owner[b], start[b], fill[b] = r, j * block, min(block, n - j * block)
        taken += k
    columns = torch.arange(block)
    query_pos = torch.tensor(lengths) - 1
    step = _Step(owner, columns < fill[:, None], start[:, None] + columns, query_pos, len(lengths))
    query = torch.randn(len(lengths), kv_heads * groups, 1, dim, generator=g).to(dtype)
    out, _ = packed_attention(None, query, PackedKV(pool_k, step), PackedKV(pool_v, step), sliding_window=window)
    for r, n in enumerate(lengths):
        mine = (owner == r).nonzero().flatten()
        mine = mine[start[mine].argsort()]
        keys = pool_k[mine].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n]
        values = pool_v[mine].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n]
        if window is not None:
            keep = torch.arange(n) > n - 1 - window
            keys, values = keys[:, keep], values[:, keep]
        ref = torch.nn.functional.scaled_dot_product_attention(
            query[r:r + 1].float(), keys[None].float(), values[None].float(), enable_gqa=True)
        torch.testing.assert_close(out[r, 0].float(), ref[0, :, 0], atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding"])
def test_the_runner_equals_a_full_recompute_on_other_architectures(tokenizer, arch):
    if arch == "llama":
        model = build_tiny_model(tokenizer, arch="llama")
    else:
        model = build_tiny_model(tokenizer)
        settings = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
        config = Qwen2Config(**{**settings, "use_sliding_window": True, "sliding_window": 6,
                                "max_window_layers": 1})
        assert config.layer_types == ["full_attention", "sliding_attention"]
        state = model.state_dict()
        model = type(model)(config).eval()
        model.load_state_dict(state)
    runner = SmallModelRunner(model, tokenizer)
    keys = ["a", "b"]
    branches = {k: runner.encode_branches(f"Prompt {k} about tea", f"I like {k} tea a lot.") for k in keys}
    for k in keys:
        runner.add(k, *branches[k])
    fed = []
    for t in range(40):  # several blocks of 32 and far past the window
        zw, zo = runner.step([(k, fed) for k in keys])
        for row, k in enumerate(keys):
            w, wo = branches[k]
            torch.testing.assert_close(zw[row].float(), full_logits(model, w + fed), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(zo[row].float(), full_logits(model, wo + fed), atol=1e-4, rtol=1e-4)
        fed = fed + [5 + t % 50]


def test_memory_follows_the_sum_of_row_lengths():
    config = SimpleNamespace(layer_types=["full_attention"] * 2, num_hidden_layers=2, num_key_value_heads=1,
                             head_dim=4, hidden_size=8, num_attention_heads=2, model_type="tiny")
    store = PackedRows(config, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    lengths = []
    for user in range(16):  # LongLaMP-like: 2,000-3,000-token with-context rows, ~50-token without rows
        n_with, n_without = 2000 + 61 * user, 40 + user
        for n in (n_with, n_without):
            cache = DynamicCache()
            for layer in range(2):
                cache.update(torch.randn(1, 1, n + 5, 4, generator=g), torch.randn(1, 1, n + 5, 4, generator=g), layer)
            mask = torch.zeros(1, n + 5, dtype=torch.long)
            mask[0, 5:] = 1  # left padding is not stored
            store.add(cache, mask)
            lengths.append(n)
    needed = sum(lengths) * store.bytes_per_token()
    assert store.tokens() == sum(lengths)
    assert store.nbytes() <= 1.1 * needed, store.nbytes() / needed
    # a padded layout would hold rows x longest row
    assert max(lengths) * len(lengths) * store.bytes_per_token() > 1.8 * needed


def test_unsupported_models_are_refused_clearly():
    with pytest.raises(ValueError, match="full and sliding-window"):
        check_supported(SimpleNamespace(layer_types=["full_attention", "linear_attention"], model_type="hybrid"))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        check_supported(SimpleNamespace(layer_types=None, model_type="gemma2", attn_logit_softcapping=50.0))
    check_supported(SimpleNamespace(model_type="llama"))  # no layer_types: all full attention


def test_the_kernel_is_refused_outside_a_packed_step():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(TypeError, match="PackedRows.decode"):
        packed_attention(None, q, q, q)


def test_the_packed_attention_is_selected_once_and_wraps_the_original(tokenizer):
    model = build_tiny_model(tokenizer, seed=5)
    ids = torch.tensor([[11, 12, 13, 14], [0, 0, 21, 22]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert use_packed_attention(model) == "costeer_packed:sdpa" == model.config._attn_implementation
    SmallModelRunner(model, tokenizer)  # a second selection (another runner on the same model) changes nothing
    assert model.config._attn_implementation == "costeer_packed:sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    flash = build_tiny_model(tokenizer, seed=5)
    flash.config._attn_implementation_internal = "flash_attention_2"  # reads its own name at run time
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        SmallModelRunner(flash, tokenizer)
