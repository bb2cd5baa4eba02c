"""CoSteer decoding-time personalization for Hugging Face ``generate`` and vLLM.

A large model writes; a small model that holds a user's private context steers it::

    p = log_softmax(ref + g * delta),  ref = log_softmax(z_large),
    delta = log_softmax(z_small_with_context) - log_softmax(z_small_without_context)

The update lives in :mod:`costeer_processor.core`; adapters: :mod:`costeer_processor.hf`,
:mod:`costeer_processor.vllm` (V1 and Model Runner V2), :mod:`costeer_processor.split`.
"""

from .core import CoSteerConfig, costeer_gain, ftrl_reference, steer
from .small_model import ContextSplicer, ContextTooLongError, SmallModelRunner
from .vocab import ChatTemplateInverter, VocabularyMap

__version__ = "0.1.0"

__all__ = [
    "CoSteerConfig",
    "costeer_gain",
    "steer",
    "ftrl_reference",
    "SmallModelRunner",
    "ContextSplicer",
    "ContextTooLongError",
    "VocabularyMap",
    "ChatTemplateInverter",
]
