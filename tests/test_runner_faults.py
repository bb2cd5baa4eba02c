"""The small-model runner under threads and faults: concurrent callers, stale values in reused blocks,
failures at every allocation point, and a failing prefill chunk that leaves the rest of the step usable."""

import math
import threading

import pytest
import torch
from transformers import Qwen2Config

from costeer_processor import SmallModelRunner
from costeer_processor.packed_kv import PackedRows
from costeer_processor.testing import build_tiny_model

TOL = dict(atol=1e-4, rtol=1e-4)


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def check_against_recompute(model, runner, key_rows, z_with, z_without, fed):
    """Every row of a step equals a full recompute of its branches (the ground truth)."""
    for row, key in enumerate(key_rows):
        w, wo = key_rows[key]
        torch.testing.assert_close(z_with[row].float(), full_logits(model, w + fed[key]), **TOL)
        torch.testing.assert_close(z_without[row].float(), full_logits(model, wo + fed[key]), **TOL)


# ---------------------------------------------------------------------------------------------- threads
def _thread_jobs():
    return {t: [(f"t{t}-{j}", f"Prompt {t}.{j} about tea and dinner", f"I like thing {t}{j} a lot.")
                for j in range(2)] for t in range(4)}


def _work(runner, t, jobs, out, start=None, steps=10):
    """One caller: its own two keys (the second joins at step ``t``), fixed tokens, both removed at the end."""
    (k0, p0, c0), (k1, p1, c1) = jobs[t]
    runner.add(k0, *runner.encode_branches(p0, c0))
    if start is not None:
        start.wait()
    fed, live, logits = {k0: [], k1: []}, [k0], []
    for s in range(steps):
        if s == t:
            runner.add(k1, *runner.encode_branches(p1, c1))
            live.append(k1)
        zw, zo = runner.step([(k, fed[k]) for k in live])
        logits.append({k: (zw[i].clone(), zo[i].clone()) for i, k in enumerate(live)})
        for i, k in enumerate(live):
            fed[k] = fed[k] + [5 + (7 * s + 3 * t + i) % 200]
    runner.remove(k0)
    runner.remove(k1)
    out[t] = logits


def test_threads_sharing_one_runner_get_the_sequential_outputs(tokenizer):
    model = build_tiny_model(tokenizer, seed=3)  # its own model: the old code could leave it switched for good
    jobs = _thread_jobs()
    shared = SmallModelRunner(model, tokenizer)
    out, errors = {}, []
    start = threading.Barrier(4)

    def run(t):
        try:
            _work(shared, t, jobs, out, start)
        except BaseException as e:  # reported below, with the thread's number
            errors.append((t, repr(e)))
            start.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert all(not th.is_alive() for th in threads)
    sequential = SmallModelRunner(model, tokenizer)
    expected = {}
    for t in range(4):
        _work(sequential, t, jobs, expected)
    for t in range(4):
        for got, want in zip(out[t], expected[t]):
            assert got.keys() == want.keys()
            for k in got:
                torch.testing.assert_close(got[k][0], want[k][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got[k][1], want[k][1], atol=1e-5, rtol=1e-5)
    stats = shared.stats()
    assert (len(shared), stats["kv_bytes"], stats["kv_tokens"], stats["cached_rows"]) == (0, 0, 0, 0)
    w, wo = shared.encode_branches("After the storm", "I like rain.")  # and it still serves requests
    shared.add("after", w, wo)
    zw, zo = shared.step([("after", [])])
    zw2, zo2 = shared.step([("after", [9])])
    check_against_recompute(model, shared, {"after": (w, wo)}, zw2, zo2, {"after": [9]})


def _model(tokenizer, arch):
    if arch != "qwen2-sliding":
        return build_tiny_model(tokenizer, arch=arch, seed=4)
    model = build_tiny_model(tokenizer, seed=4)
    settings = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    config = Qwen2Config(**{**settings, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1})
    state = model.state_dict()
    model = type(model)(config).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("arch,attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama", "sdpa"),
                                       ("qwen2-sliding", "sdpa"), ("qwen2-sliding", "eager")])
def test_ordinary_forwards_are_unchanged_and_safe_while_the_runner_decodes(tokenizer, arch, attn):
    model = _model(tokenizer, arch)
    model.set_attn_implementation(attn)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18], [0, 0, 0, 21, 22, 23, 24, 25]])
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    runner = SmallModelRunner(model, tokenizer)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    w, wo = runner.encode_branches("Decode while others run", "I am vegan.")
    runner.add("r", w, wo)
    errors, done = [], threading.Event()

    def decode():
        try:
            fed = []
            for s in range(30):
                zw, _ = runner.step([("r", fed)])
                fed = fed + [5 + s]
        except BaseException as e:
            errors.append(repr(e))
        finally:
            done.set()

    th = threading.Thread(target=decode)
    th.start()
    outputs = []
    with torch.no_grad():  # the model's own forwards in this thread, while the runner decodes in the other
        while not done.is_set() or not outputs:
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    th.join(timeout=300)
    assert not errors, errors
    for got in outputs:
        torch.testing.assert_close(got, before, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


# ---------------------------------------------------------------------------------------------- stale blocks
def test_inf_and_nan_left_in_freed_blocks_never_reach_a_new_owner(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    branches = {"keep": runner.encode_branches("Stay with me", "I like tea."),
                "old": runner.encode_branches("a long prompt about many things " * 6, "I like long stories."),
                "new": runner.encode_branches("Now something new", "I am vegan.")}
    runner.add("keep", *branches["keep"])
    runner.add("old", *branches["old"])
    fed = {"keep": [], "old": []}
    for s in range(3):
        runner.step([(k, fed[k]) for k in fed])
        fed = {k: v + [7 + s] for k, v in fed.items()}
    runner.remove("old")
    del fed["old"]
    store = runner._store
    free = (store.owner < 0).nonzero().flatten()
    assert free.numel() >= 4  # the old request's blocks (and spare room), all poisoned below
    with torch.inference_mode():  # the pools are inference tensors
        for pool in store.keys + store.values:
            pool[free] = math.inf
            pool[free, :, :, 1::3] = -math.inf
            pool[free, :, ::2] = math.nan
    runner.add("new", *branches["new"])
    fed["new"] = []
    for s in range(40):  # past a block boundary: the rows' next blocks come from the poisoned ones too
        keys = ["keep", "new"]
        zw, zo = runner.step([(k, fed[k]) for k in keys])
        assert bool(torch.isfinite(zw).all()) and bool(torch.isfinite(zo).all()), f"step {s}"
        if s % 13 == 0 or s == 39:
            check_against_recompute(small_model, runner, {k: branches[k] for k in keys}, zw, zo, fed)
        fed = {k: v + [5 + (s * 11) % 100] for k, v in fed.items()}


# ---------------------------------------------------------------------------------------------- leaks
class _FailingLayer:
    @property
    def keys(self):
        raise RuntimeError("injected: writing the KV failed")

    values = keys


class _HalfCache:
    """A prefill cache whose second layer cannot be read: the write fails after rows and blocks are taken."""

    def __init__(self, cache):
        self.layers = [cache.layers[0], _FailingLayer()]


@pytest.mark.parametrize("point", ["with_add", "without_add", "grow_last", "last_write"])
def test_a_failure_at_any_allocation_point_leaks_nothing(small_model, tokenizer, monkeypatch, point):
    runner = SmallModelRunner(small_model, tokenizer)
    a = runner.encode_branches("A request that keeps going", "I like tea.")
    b = runner.encode_branches("A request whose prefill fails", "I am vegan.")
    runner.add("a", *a)
    runner.step([("a", [])])
    runner.add("b", *b)
    calls = {"n": 0}
    if point in ("with_add", "without_add"):
        original = runner._store.add
        fail_at = 1 if point == "with_add" else 2

        def add(cache, mask):
            calls["n"] += 1
            return original(_HalfCache(cache) if calls["n"] == fail_at else cache, mask)

        monkeypatch.setattr(runner._store, "add", add)
    elif point == "grow_last":
        def grow_last(*args):
            raise RuntimeError("injected: no memory for the logits table")

        monkeypatch.setattr(runner, "_grow_last", grow_last)
    else:
        original = runner._prefill_rows

        def prefill_rows(*args, **kwargs):
            calls["n"] += 1
            cache, mask, logits = original(*args, **kwargs)
            return cache, mask, (logits[:, :-1] if calls["n"] == 2 else logits)  # the logits write fails

        monkeypatch.setattr(runner, "_prefill_rows", prefill_rows)
    with pytest.raises(RuntimeError):
        runner.step([("a", [5]), ("b", [])])
    monkeypatch.undo()
    zw, zo = runner.step([("a", [5])])  # "a" was decoded in that step: its logits are there, unchanged
    check_against_recompute(small_model, runner, {"a": a}, zw, zo, {"a": [5]})
    zw, zo = runner.step([("a", [5, 6]), ("b", [])])  # and "b" can be retried
    check_against_recompute(small_model, runner, {"a": a, "b": b}, zw, zo, {"a": [5, 6], "b": []})
    runner.remove("a")
    runner.remove("b")
    assert runner.stats()["kv_bytes"] == 0 and runner.kv_tokens == 0 and runner.cached_rows == 0
    c = runner.encode_branches("A new request", "I like dragons.")
    runner.add("c", *c)
    runner.step([("c", [])])
    zw, zo = runner.step([("c", [8])])
    check_against_recompute(small_model, runner, {"c": c}, zw, zo, {"c": [8]})


def test_a_failed_write_into_the_packed_rows_frees_what_it_took(small_model):
    from transformers import DynamicCache

    store = PackedRows(small_model.config, torch.float32, torch.device("cpu"), block=4)
    cache = DynamicCache()
    with torch.no_grad():
        small_model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]), past_key_values=cache)
    store.add(cache, torch.ones(1, 6, dtype=torch.long))
    before = (store.tokens(), store.blocks_in_use(), len(store))
    with pytest.raises(RuntimeError, match="injected"):
        store.add(_HalfCache(cache), torch.ones(1, 6, dtype=torch.long))
    assert (store.tokens(), store.blocks_in_use(), len(store)) == before
    store.clear()
    assert store.nbytes() == 0 and len(store) == 0


# ---------------------------------------------------------------------------------------------- isolation
def test_max_prefill_tokens_is_validated(small_model, tokenizer):
    for bad in (0, -1, 2.5, "8", True, float("inf")):
        with pytest.raises(ValueError, match="max_prefill_tokens"):
            SmallModelRunner(small_model, tokenizer, max_prefill_tokens=bad)
    assert SmallModelRunner(small_model, tokenizer, max_prefill_tokens=1).max_prefill_tokens == 1


def test_prefill_is_split_into_chunks_under_the_token_bound(small_model, tokenizer, monkeypatch):
    runner = SmallModelRunner(small_model, tokenizer, context_cache_mb=0)
    branches = {k: runner.encode_branches(f"Prompt number {k} about tea", f"context {k}") for k in range(5)}
    size = max(len(w) + len(wo) for w, wo in branches.values())
    runner = SmallModelRunner(small_model, tokenizer, context_cache_mb=0, max_prefill_tokens=2 * size)
    seen = []
    original = runner._forward

    def forward(input_ids, attention_mask, *args):
        seen.append(int(attention_mask[:, -input_ids.shape[1]:].sum()))
        return original(input_ids, attention_mask, *args)

    monkeypatch.setattr(runner, "_forward", forward)
    for k, (w, wo) in branches.items():
        runner.add(k, w, wo)
    zw, zo = runner.step([(k, []) for k in branches])
    assert runner.forward_count == 6  # chunks of 2, 2 and 1 requests: two forwards each
    assert all(a + b <= 2 * size for a, b in zip(seen[::2], seen[1::2]))
    check_against_recompute(small_model, runner, branches, zw, zo, {k: [] for k in branches})
    one = SmallModelRunner(small_model, tokenizer, context_cache_mb=0, max_prefill_tokens=1)
    for k, (w, wo) in branches.items():  # a request larger than the bound runs alone
        one.add(k, w, wo)
    zw, zo = one.step([(k, []) for k in branches])
    assert one.forward_count == 10
    check_against_recompute(small_model, one, branches, zw, zo, {k: [] for k in branches})


def test_a_failing_prefill_chunk_leaves_the_rest_of_the_step_usable(small_model, tokenizer, monkeypatch):
    prompts = {"d0": ("Tell me about tea.", "I like green tea."), "d1": ("Suggest a dinner.", "I am vegan."),
               "d2": ("Hi", "I love chess."), "n0": ("Write a story.", "I like dragons."),
               "n1": ("Explain rainbows.", "I like the sky."), "bad": ("zebra quartz xylophone", "I like rain.")}
    probe = SmallModelRunner(small_model, tokenizer)
    branches = {k: probe.encode_branches(*v) for k, v in prompts.items()}
    others = {i for k, (w, wo) in branches.items() if k != "bad" for i in w + wo}
    marker = next(i for i in branches["bad"][1] if i not in others)  # a token only "bad" has
    bound = max(len(w) + len(wo) for w, wo in branches.values())  # every new request is its own chunk
    faulty = SmallModelRunner(small_model, tokenizer, max_prefill_tokens=bound)
    clean = SmallModelRunner(small_model, tokenizer, max_prefill_tokens=bound)
    fed = {k: [] for k in branches}
    for runner in (faulty, clean):
        for k in ("d0", "d1", "d2"):
            runner.add(k, *branches[k])
        runner.step([(k, []) for k in ("d0", "d1", "d2")])
        runner.step([(k, [5]) for k in ("d0", "d1", "d2")])
    fed.update({k: [5, 6 + i] for i, k in enumerate(("d0", "d1", "d2"))})
    for k in ("n0", "n1", "bad"):
        faulty.add(k, *branches[k])
        clean.add(k, *branches[k])
    forward = small_model.forward

    def failing(input_ids=None, *args, **kwargs):
        if input_ids is not None and bool((input_ids == marker).any()):
            raise RuntimeError("injected: the small model failed on this request")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(small_model, "forward", failing)
    batch = ["d0", "d1", "d2", "n0", "n1", "bad"]
    with pytest.raises(RuntimeError, match="injected"):
        faulty.step([(k, fed[k]) for k in batch])
    assert faulty.cached_rows == 5 and "bad" in faulty  # "bad" holds no rows; the others kept theirs
    forwards = faulty.forward_count
    good = batch[:-1]
    got = faulty.step([(k, fed[k]) for k in good])  # a retry with the subset: nothing is recomputed
    assert faulty.forward_count == forwards
    want = clean.step([(k, fed[k]) for k in good])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    check_against_recompute(small_model, faulty, {k: branches[k] for k in good}, *got, fed)
    for s in range(4):  # and they keep decoding exactly like a clean run
        fed = {k: v + [9 + s] for k, v in fed.items()}
        got = faulty.step([(k, fed[k]) for k in good])
        want = clean.step([(k, fed[k]) for k in good])
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    zw, zo = faulty.step([("bad", [])])  # the failed request, retried alone once the fault is gone
    check_against_recompute(small_model, faulty, {"bad": branches["bad"]}, zw, zo, {"bad": []})
    for k in batch:
        faulty.remove(k)
    assert faulty.stats()["kv_bytes"] == 0 and faulty.kv_tokens == 0
