"""CoSteer decoding-time personalization for Hugging Face ``generate`` and vLLM.

A large model writes; a small model that holds a user's private context steers it::

    p = log_softmax(ref + g * delta),  ref = log_softmax(z_large),
    delta = log_softmax(z_small_with_context) - log_softmax(z_small_without_context)

The core (framework-free): :mod:`costeer_processor.core` (the update, its settings, the
variants), :mod:`costeer_processor.prompts` (what the small model reads, does the context fit),
:mod:`costeer_processor.loading`, :mod:`costeer_processor.small_model` (the small-model engine),
:mod:`costeer_processor.kv_cache`. Adapters: :mod:`costeer_processor.hf`,
:mod:`costeer_processor.vllm` (V1 and Model Runner V2), :mod:`costeer_processor.split`.
"""

from .core import CoSteerConfig, Variants, costeer_gain, ftrl_reference, steer
from .loading import eos_token_ids
from .prompts import DEFAULT_SYSTEM_PROMPT, ContextBudget, ContextSplicer, ContextTooLongError
from .small_model import SmallModelRunner
from .steering import Steerer, SteerRequest
from .vocab import ChatTemplateInverter, VocabularyMap

__version__ = "0.2.0"

__all__ = [
    "CoSteerConfig",
    "Variants",
    "Steerer",
    "SteerRequest",
    "costeer_gain",
    "steer",
    "ftrl_reference",
    "SmallModelRunner",
    "ContextSplicer",
    "ContextBudget",
    "ContextTooLongError",
    "DEFAULT_SYSTEM_PROMPT",
    "eos_token_ids",
    "VocabularyMap",
    "ChatTemplateInverter",
]
