"""The release's variants on top of the update: AdaCoSteer confidence gating and the EOS guard.

Batched helpers used by every adapter; the settings themselves (thresholds, patience) live in
:class:`~costeer_processor.core.config.Variants`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .update import NEG_INF

__all__ = ["top_probability", "eos_probability", "update_confidence_streak", "force_eos"]



def top_probability(llm_logits: torch.Tensor) -> torch.Tensor:
    """``max softmax(z_L)`` per row (AdaCoSteer's confidence is ``1 - this``)."""
    return torch.softmax(llm_logits.float(), dim=-1).amax(dim=-1)


def eos_probability(llm_logits: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """Large-model probability of ending the sequence now, per row (sum over EOS ids)."""
    probs = torch.softmax(llm_logits.float(), dim=-1)
    ids = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=llm_logits.device)
    ids = ids[ids < probs.shape[1]]
    return probs.index_select(1, ids).sum(dim=-1)


def update_confidence_streak(streak: torch.Tensor, llm_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """AdaCoSteer bookkeeping: consecutive steps each row's large model was confident.

    A step is confident when ``u = 1 - max softmax(z_L) < threshold``; any other step resets
    the streak. A row whose streak reaches ``patience`` is switched off for good by the caller.
    """
    confident = (1.0 - top_probability(llm_logits)) < threshold
    return torch.where(confident, streak + 1, torch.zeros_like(streak))


def force_eos(logprobs: torch.Tensor, llm_logits: torch.Tensor, eos_token_ids: Sequence[int],
              threshold: Union[float, torch.Tensor]) -> torch.Tensor:
    """EOS guard: rows whose large model gives EOS probability > ``threshold`` must stop now.

    ``threshold`` is one value or one per row (``[B]``; ``inf`` leaves a row alone). Such rows get
    log-prob 0 on their most likely EOS id and ``-inf`` elsewhere, so steering cannot stretch an
    answer past where the large model would end it.
    """
    if not eos_token_ids or logprobs.shape[0] == 0:
        return logprobs
    stop = eos_probability(llm_logits, eos_token_ids) > threshold
    if not bool(stop.any()):
        return logprobs
    ids = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=logprobs.device)
    ids = ids[ids < logprobs.shape[1]]
    best_eos = ids[llm_logits.index_select(1, ids).argmax(dim=-1)]
    forced = torch.full_like(logprobs, NEG_INF)
    forced.scatter_(1, best_eos[:, None], 0.0)
    return torch.where(stop[:, None], forced, logprobs)
