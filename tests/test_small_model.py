"""The small-model runner: batched branches, continuous batching, cache bookkeeping."""

import pytest
import torch

from costeer_processor import SmallModelRunner


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_continuous_batching_matches_recompute(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    prompts = ["Tell me about tea.", "Suggest a dinner recipe for tonight please.", "Hi"]
    contexts = ["I like green tea.", "I am vegan.", "I love chess and long walks in the park."]
    branches = {i: runner.encode_branches(p, c) for i, (p, c) in enumerate(zip(prompts, contexts))}
    generated = {i: [] for i in branches}
    g = torch.Generator().manual_seed(0)
    runner.add(0, *branches[0])
    runner.add(1, *branches[1])
    live = [0, 1]
    for step in range(8):
        if step == 3:  # a request joins mid-stream, with some tokens already generated elsewhere
            generated[2] = [5, 6]
            runner.add(2, *branches[2])
            live.append(2)
        if step == 5:  # one leaves
            runner.remove(0)
            live.remove(0)
        z_with, z_without = runner.step([(k, generated[k]) for k in live])
        for row, k in enumerate(live):
            w, wo = branches[k]
            torch.testing.assert_close(z_with[row].float(), full_logits(small_model, w + generated[k]), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(z_without[row].float(), full_logits(small_model, wo + generated[k]), atol=1e-4, rtol=1e-4)
        for k in live:
            generated[k].append(int(torch.randint(3, len(tokenizer), (1,), generator=g)))
    assert runner.cached_rows == 2


def test_one_forward_per_step_and_resync(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    for k in range(4):
        runner.add(k, *runner.encode_branches(f"Prompt number {k}", f"context {k}"))
    runner.step([(k, []) for k in range(4)])
    assert runner.forward_count == 2  # all 4 with-context rows together, then all 4 without
    runner.step([(k, [7]) for k in range(4)])
    assert runner.forward_count == 3  # and all 8 decoded together
    # a request whose history changed (preempted and resumed differently) is re-prefilled
    z_with, _ = runner.step([(0, [9, 9]), (1, [7, 8]), (2, [7, 8]), (3, [7, 8])])
    w, _ = runner.encode_branches("Prompt number 0", "context 0")
    torch.testing.assert_close(z_with[0].float(), full_logits(small_model, w + [9, 9]), atol=1e-4, rtol=1e-4)
    # a step where a row is absent leaves a masked hole; its next logits are still right
    z_with, _ = runner.step([(1, [7, 8, 10])])
    z_with, _ = runner.step([(1, [7, 8, 10, 11]), (2, [7, 8, 12])])
    w2, _ = runner.encode_branches("Prompt number 2", "context 2")
    torch.testing.assert_close(z_with[1].float(), full_logits(small_model, w2 + [7, 8, 12]), atol=1e-4, rtol=1e-4)


def test_the_packed_cache_holds_the_sum_of_row_lengths_and_reuses_freed_blocks(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    long = runner.encode_branches("a very long prompt " * 20, "ctx")
    short = runner.encode_branches("hi", "ctx")
    runner.add("long", *long)
    runner.add("short", *short)
    runner.step([("long", []), ("short", [])])
    assert runner.kv_tokens == sum(map(len, long + short))
    runner.step([("long", [5]), ("short", [6])])
    assert runner.kv_tokens == sum(map(len, long + short)) + 4
    held = runner.stats()["kv_bytes"]
    runner.remove("long")
    assert runner.kv_tokens == sum(map(len, short)) + 2
    for i in range(50):  # churn: requests join and leave; freed blocks are reused, the pool does not grow
        runner.add(i, *runner.encode_branches(f"p{i}", "c"))
        runner.step([(i, [])])
        runner.remove(i)
    assert len(runner) == 1 and runner.cached_rows == 1
    assert runner.stats()["kv_bytes"] == held
    runner.remove("short")
    assert runner.stats()["kv_bytes"] == 0 and runner.kv_tokens == 0  # idle: nothing held


def test_splicer_positions(tokenizer, small_model):
    before = SmallModelRunner(small_model, tokenizer)
    after = SmallModelRunner(small_model, tokenizer, context_position="after", context_separator="\n")
    text = before.splicer.render("What is tea?")
    assert "<|im_start|>user\nMY CONTEXT\n\nWhat is tea?<|im_end|>" in before.splicer.splice(text, "MY CONTEXT")
    assert "<|im_start|>user\nWhat is tea?\nMY CONTEXT<|im_end|>" in after.splicer.splice(text, "MY CONTEXT")
    assert after.splicer.splice("raw text", "C") == "raw text\nC"


def test_a_key_twice_in_one_batch_is_prefilled_once(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer)
    w, wo = runner.encode_branches("Hi", "I like tea.")
    runner.add("a", w, wo)
    zw, _ = runner.step([("a", []), ("a", [])])
    assert torch.equal(zw[0], zw[1]) and runner.cached_rows == 1 and runner.forward_count == 2
    with pytest.raises(ValueError, match="twice"):
        runner.step([("a", [5]), ("a", [5, 6])])
    assert runner.forward_count == 2  # refused before anything ran
    zw, _ = runner.step([("a", [5])])
    torch.testing.assert_close(zw[0].float(), full_logits(small_model, w + [5]), atol=1e-4, rtol=1e-4)
    runner.remove("a")
    assert runner.stats()["kv_bytes"] == 0
