import os

import pytest
import torch

from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def large_model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=128, seed=1)


@pytest.fixture(scope="session")
def small_model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=64, seed=2)


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
    """(large_dir, small_dir): the tiny pair saved as transformers folders (for vLLM and the CLI)."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


PROMPTS = ["Suggest a dinner recipe.", "Tell me about the history of tea.", "Write a story about a dragon."]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer uplifting, warm answers.", "My hobbies are chess and hiking."]


@pytest.fixture
def prompts():
    return list(PROMPTS)


@pytest.fixture
def contexts():
    return list(CONTEXTS)


@pytest.fixture(scope="session")
def mixed_pair_dirs(tmp_path_factory):
    """(large_dir, small_dir) where the small model has another tokenizer family (the mapped path)."""
    return save_tiny_pair(tmp_path_factory.mktemp("mixed_pair"), other_small_tokenizer=True)
