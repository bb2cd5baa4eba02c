"""The framework-free core: the update, its settings, and the release's variants (torch only).

* :mod:`.update`: :func:`steer` (the closed form) and :func:`ftrl_reference` (the literal loop).
* :mod:`.config`: :class:`CoSteerConfig`, :class:`Variants`: every default and range check.
* :mod:`.variants`: AdaCoSteer gating and the EOS guard, batched.
* :mod:`.style`: the options that keep a persona's topic out (plausibility, delta clipping, placebo).
* :mod:`.ngram`: the context n-gram guard (the private context cannot leave through the answer).
* :mod:`.sampling`: greedy or sampled choice of the next token.
"""

from .config import (MAX_GAIN, MAX_T, SPLIT_NGRAM_GUARD, CoSteerConfig, Variants, check_gain, check_ngram,
                     check_range, check_variants, gain_from_hyperparameters, number)
from .ngram import NgramGuard
from .update import NEG_INF, GainLike, costeer_gain, ftrl_reference, steer, steer_careful
from .variants import eos_probability, force_eos, top_probability, update_confidence_streak
from .sampling import GREEDY, Sampling, choose

__all__ = [
    "CoSteerConfig", "Variants", "MAX_GAIN", "MAX_T", "number", "check_range", "check_gain", "check_variants",
    "check_ngram", "SPLIT_NGRAM_GUARD", "gain_from_hyperparameters", "costeer_gain", "steer", "steer_careful", "ftrl_reference", "GainLike", "NEG_INF",
    "top_probability", "eos_probability", "update_confidence_streak", "force_eos", "NgramGuard",
    "Sampling", "GREEDY", "choose",
]
