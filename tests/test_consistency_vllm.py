"""vLLM and transformers feed the small model the same ids (one prompt rule, one implementation).

The vLLM engine builds each request's branches from its prompt ids (:class:`SteeringEngine`), the
API server counts them with :class:`BranchBuilder`, and the HF processor builds them from
``input_ids``: for the same chat, all three must give the same ``(with_ids, without_ids)``.
"""

from __future__ import annotations

import pytest
import torch

from costeer_processor import SmallModelRunner
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.testing import build_other_tokenizer, build_tiny_model, build_tiny_tokenizer
from costeer_processor.vocab import VocabularyMap

CONTEXT = "I am vegan and I love spicy food."
CHATS = {
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Suggest a dinner recipe."}],
    "no-system": [{"role": "user", "content": "Suggest a dinner recipe."}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Suggest a dinner recipe."}],
}


@pytest.fixture(scope="module")
def tokenizers():
    large = build_tiny_tokenizer()
    return {"one tokenizer": (large, large), "two families": (large, build_other_tokenizer())}


@pytest.mark.parametrize("pair", ["one tokenizer", "two families"])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_vllm_engine_and_frontend_build_the_hf_processors_branches(tokenizers, pair, position, chat):
    from vllm import SamplingParams

    from costeer_processor.vllm.engine import SteeringEngine
    from costeer_processor.vllm.frontend import BranchBuilder
    from costeer_processor.vllm.settings import EngineSettings

    large_tok, small_tok = tokenizers[pair]
    small = build_tiny_model(small_tok)
    runner = SmallModelRunner(small, small_tok, context_position=position)
    vmap = VocabularyMap.if_needed(large_tok, small_tok)
    assert (vmap is None) == (pair == "one tokenizer")
    input_ids = large_tok.apply_chat_template(CHATS[chat], add_generation_prompt=True)["input_ids"]

    hf = CoSteerLogitsProcessor(runner, [CONTEXT], vocab_map=vmap, large_tokenizer=large_tok)
    hf(torch.tensor([input_ids]), torch.zeros(1, len(large_tok)))  # its first call reads the prompt from input_ids
    want = [tuple(hf.steerer.request_of(hf._slots[0]).branches)]

    settings = EngineSettings(context_position=position)
    engine = SteeringEngine(settings, large_tok, runner, [large_tok.eos_token_id], vmap)
    handle = engine.open(SamplingParams(extra_args={"costeer_context": CONTEXT}), input_ids)
    assert handle.active and [handle.branches] == want
    builder = BranchBuilder(small_tok, settings, small.config)  # the API server's count
    assert [builder.branch_ids_from_text(engine.bridge(input_ids), CONTEXT)] == want

    # the context is in the with-branch only; the without-branch is the conversation the large model read
    with_ids, without_ids = want[0]
    assert CONTEXT in small_tok.decode(with_ids) and CONTEXT not in small_tok.decode(without_ids)
    expected = small_tok.apply_chat_template(CHATS[chat], add_generation_prompt=True)["input_ids"]
    assert without_ids == expected
    assert len(with_ids) > len(without_ids)
