"""The one prompt rule, the one context-fits rule, the one EOS list, the one set of validators."""

import time

import pytest
import torch

from costeer_processor import SmallModelRunner
from costeer_processor.core import CoSteerConfig, Variants
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.loading import eos_token_ids
from costeer_processor.prompts import (DEFAULT_SYSTEM_PROMPT, ContextBudget, ContextSplicer, ContextTooLongError,
                                       strip_left_padding, with_system_prompt)
from costeer_processor.testing import build_other_tokenizer

USER = [{"role": "user", "content": "Suggest a dinner recipe."}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}] + USER
MULTI_TURN = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}] + USER


@pytest.mark.parametrize("messages", [USER, WITH_SYSTEM, MULTI_TURN], ids=["no-system", "system", "multi-turn"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_hf_reads_the_prompt_from_input_ids_like_the_given_messages(small_model, tokenizer, messages, position):
    runner = SmallModelRunner(small_model, tokenizer, context_position=position)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    # a left-padded row reads the same
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), ids], 1)
    proc = CoSteerLogitsProcessor(runner, ["I am vegan."])
    proc(padded, torch.zeros(1, len(tokenizer)))  # the first call reads each row's prompt from input_ids
    from_ids = [tuple(proc.steerer.request_of(proc._slots[0]).branches)]
    assert from_ids == [runner.encode_branches(messages, "I am vegan.")]
    with_ids, without_ids = from_ids[0]
    assert without_ids == ids[0].tolist()  # the small model reads the large model's conversation, nothing added
    text = tokenizer.decode(with_ids)
    assert "I am vegan." in text and text.count("<|im_start|>user") == sum(m["role"] == "user" for m in messages)
    last_user = text.rindex("<|im_start|>user")
    assert text.index("I am vegan.") > last_user  # spliced into the LAST user turn


def test_no_system_message_is_added(tokenizer):
    splicer = ContextSplicer(tokenizer)
    assert "system" not in splicer.render("hello")
    assert splicer.render(with_system_prompt("hello")).count(DEFAULT_SYSTEM_PROMPT) == 1
    assert with_system_prompt(WITH_SYSTEM) == WITH_SYSTEM  # an existing system message is kept as is


def test_user_header_is_found_in_another_template_family():
    tok = build_other_tokenizer()
    splicer = ContextSplicer(tok)
    text = splicer.splice(splicer.render(MULTI_TURN), "CTX")
    assert text.index("CTX") > text.rindex("Hello!")
    assert "<|start_header_id|>user<|end_header_id|>" in splicer.user_header


def test_context_budget_refuses_before_tokenising(tokenizer):
    budget = ContextBudget(tokenizer, 512)
    huge = "spicy food " * 2_000_000  # 22 MB
    t0 = time.perf_counter()
    with pytest.raises(ContextTooLongError, match="over the limit of 512"):
        budget.check_text(huge)
    assert time.perf_counter() - t0 < 5.0  # no tokenisation (tokenising 22 MB takes tens of seconds)
    budget.check_text("short")  # the bound never refuses what could fit
    budget.check_tokens(512)
    with pytest.raises(ContextTooLongError, match="513 small-model tokens"):
        budget.check_tokens(513)


def test_context_fits_rule_is_the_runner_rule(small_model, tokenizer):
    runner = SmallModelRunner(small_model, tokenizer, max_context_tokens=40)
    text = runner.splicer.render("hi")
    n_prompt = len(runner.encode_text(runner.splicer.splice(text, "x")))
    ok, over = "x", "x " * (40 - n_prompt + 5)
    runner.branch_ids_from_text(text, ok)
    with pytest.raises(ContextTooLongError):
        runner.branch_ids_from_text(text, over)


def test_strip_left_padding():
    assert strip_left_padding([0, 0, 5, 0, 6], 0) == [5, 0, 6]
    assert strip_left_padding([5, 6], None) == [5, 6]


def test_eos_ids_include_the_end_of_turn_token(tokenizer):
    ids = eos_token_ids(tokenizer, {"eos_token_id": [tokenizer.pad_token_id]})
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.pad_token_id in ids
    other = build_other_tokenizer()
    assert other.convert_tokens_to_ids("<|eot_id|>") in eos_token_ids(other)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gate_threshold=True), "gate_threshold must be a number, got bool"),
    (dict(gate_threshold=1.0), r"gate_threshold must be in \(0, 1\)"),
    (dict(gate_patience=True), "gate_patience must be an integer, got bool"),
    (dict(gate_patience=2.0), "gate_patience must be an integer, got float"),
    (dict(eos_guard=0.0), r"eos_guard must be in \(0, 1\]"),
    (dict(eos_guard="0.5"), "eos_guard must be a number, got str"),
])
def test_variants_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Variants(**kwargs)


def test_variants_parse_is_the_lenient_form():
    base = Variants(gate_threshold=0.2, gate_patience=4, eos_guard=0.5)
    assert Variants.parse(defaults=base) == base
    assert Variants.parse(gate_threshold=0, eos_guard=0, gate_patience=2.0, defaults=base) == Variants(None, 2, None)
    with pytest.raises(ValueError, match="costeer_gate_patience must be an integer, got bool"):
        Variants.parse(gate_patience=True, prefix="costeer_")


def test_served_gain_caps_the_gain():
    assert CoSteerConfig(strength=1000.0).served_gain() == 1000.0
    with pytest.raises(ValueError, match="at most 1000"):
        CoSteerConfig(strength=1000.5).served_gain("costeer_strength")
    with pytest.raises(ValueError, match="alpha > lam"):
        CoSteerConfig(T=20, alpha=3.0, beta=0.5, lam=0.5, eta=1.0).served_gain()
