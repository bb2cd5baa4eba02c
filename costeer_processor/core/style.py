"""Steer the style, not the topic: options of the steering step (torch only, batched).

A persona as context ("I'm an ER surgeon. I read your replies on my phone between patients, so I
skip anything long.") changes the small model's next-token distribution mostly through its
*topic* (surgery, patients) and only a little through the *style* it implies (short answers).
``delta = log_softmax(z_S+) - log_softmax(z_S-)`` carries both, so plain CoSteer drifts into the
persona's world. The functions below are the pieces of three remedies; each is a pure function on
already-sliced ``[batch, vocab]`` tensors, off by default, and batched (no loop over rows):

* **Plausibility constraint** (as in contrastive decoding, Li et al. 2023): steer only among the
  tokens the large model itself finds plausible, ``p_L >= alpha * max p_L``
  (:func:`plausible_mask`, :func:`constrain_to_plausible`). A topic word the large model would
  never write for this question cannot be pushed in.
* **Delta clipping**: ``clamp(delta, -c, c)`` (:func:`clip_delta`, :func:`steer_clipped`): no
  single token can gain or lose more than ``g * c`` nats, so a few persona words with a huge
  delta cannot take over the row.
* **Placebo contrast**: the without-context branch reads a neutral context of the same length
  and form (:func:`placebo_context`), so "a first-person preamble is present" cancels out of
  the delta and what is left is what *this* context changes.

:func:`steer_styled` chains clipping and the constraint. Width and masking rules are those of
:func:`costeer_processor.core.update.steer`: steering runs on the common width
``min(V_L, V_S)``, ids beyond it are ``-inf``, ``-inf`` entries of the large logits stay ``-inf``,
a non-finite delta counts as 0, the output is float32 and never NaN, and large logits holding NaN
or ``+inf`` are refused. This module imports nothing from :mod:`.update` (so ``update`` may import
it).

Example::

    >>> import torch
    >>> from costeer_processor.core.style import constrain_to_plausible, steer_clipped
    >>> large = torch.tensor([[3.0, 2.5, -4.0]])          # token 2 is implausible for the large model
    >>> with_ctx, without_ctx = torch.tensor([[0.0, 0.0, 9.0]]), torch.zeros(1, 3)
    >>> steered = steer_clipped(large, with_ctx, without_ctx, 1.783257)
    >>> steered.argmax(-1).item()                          # plain steering picks the persona's token
    2
    >>> constrain_to_plausible(steered, large, 0.1).argmax(-1).item()
    0
    >>> steer_clipped(large, with_ctx, without_ctx, 1.783257, clip=1.0).argmax(-1).item()
    0
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Union

import torch

from .config import PLAUSIBILITY_MODES, CoSteerConfig
from .update import NEG_INF

__all__ = [
    "PLAUSIBILITY_MODES",
    "NEUTRAL_CLAUSES",
    "plausible_mask",
    "constrain_to_plausible",
    "clip_delta",
    "steer_clipped",
    "steer_styled",
    "placebo_context",
]


RowValues = Union[float, int, torch.Tensor, Sequence[float], None]


# --------------------------------------------------------------------------- helpers
def _row_column(value: RowValues, batch: int, device: torch.device, name: str, *, high: float) -> Optional[torch.Tensor]:
    """``value`` as a ``[B, 1]`` float32 column, checked to lie in ``[0, high]``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or one per row, got bool {value!r}")
    if isinstance(value, (int, float)):
        v = float(value)
        if math.isnan(v) or not 0.0 <= v <= high:
            raise ValueError(f"{name} must be in [0, {high:g}] (0 switches it off), got {value!r}")
        return torch.full((batch, 1), v, dtype=torch.float32, device=device)
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} per-row values of {name} for a batch of {batch} rows")
    if not bool(((t >= 0) & (t <= high)).all()):  # NaN fails both comparisons
        raise ValueError(f"{name} must be in [0, {high:g}] per row (0 switches it off), got {t.tolist()}")
    return t.unsqueeze(1)


def _gain_column(gain, batch: int, device: torch.device) -> torch.Tensor:
    """Per-row gains as ``[B, 1]`` float32 (a :class:`CoSteerConfig`, a number, or one per row)."""
    if isinstance(gain, CoSteerConfig):
        gain = gain.gain
    if isinstance(gain, bool):
        raise ValueError(f"gain must be a number, got bool {gain!r}")
    if isinstance(gain, (int, float)):
        if not math.isfinite(gain):
            raise ValueError(f"gain must be finite, got {gain!r}")
        return torch.full((batch, 1), float(gain), dtype=torch.float32, device=device)
    g = torch.as_tensor(gain, dtype=torch.float32, device=device).reshape(-1)
    if g.numel() != batch:
        raise ValueError(f"got {g.numel()} per-row gains for a batch of {batch} rows")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("per-row gains must be finite")
    return g.unsqueeze(1)


def _check_2d(**tensors: torch.Tensor) -> None:
    batch = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [batch, vocab], got shape {tuple(t.shape)}")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"batch mismatch: {name} has {t.shape[0]} rows, expected {batch}")
        batch = t.shape[0]


def _check_large_finite(llm_logits: torch.Tensor) -> None:
    if bool(torch.isnan(llm_logits).any()) or bool(torch.isposinf(llm_logits).any()):
        raise ValueError("llm_logits holds NaN or +inf; CoSteer needs finite logits (-inf masks are fine)")


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` cut or padded with ``-inf`` to ``width`` columns (always a new tensor)."""
    if x.shape[1] >= width:
        return x[:, :width].clone()
    out = x.new_full((x.shape[0], width), NEG_INF)
    out[:, : x.shape[1]] = x
    return out


def _plausible(z: torch.Tensor, alpha_col: Optional[torch.Tensor]) -> torch.Tensor:
    """The plausibility test on float32 logits (``log_softmax`` shifts a row, so logits do)."""
    finite = torch.isfinite(z)
    if alpha_col is None:
        return finite
    top = z.amax(dim=-1, keepdim=True)
    # NaN (an all -inf row: -inf - -inf) compares False; log(0) = -inf keeps every finite entry.
    return (z - top >= torch.log(alpha_col)) & finite


# --------------------------------------------------------------------------- plausibility
def plausible_mask(llm_logits: torch.Tensor, alpha: RowValues) -> torch.Tensor:
    """Which tokens the large model finds plausible: ``p_L >= alpha * max p_L``, per row.

    Computed in log space, ``logp_L >= log(alpha) + max logp_L`` (on the logits, which differ from
    ``logp_L`` by a per-row constant). ``-inf``, NaN and ``+inf`` entries are never plausible, so
    a row with no finite entry has none.

    Args:
        llm_logits: ``[B, V_L]`` large-model logits.
        alpha: a number or one per row (``[B]``), in ``[0, 1]``; ``alpha = 1`` keeps the argmax
            (and ties), ``0`` or ``None`` keeps every finite entry (the constraint is off).

    Returns:
        ``[B, V_L]`` bool.
    """
    _check_2d(llm_logits=llm_logits)
    a = _row_column(alpha, llm_logits.shape[0], llm_logits.device, "alpha", high=1.0)
    return _plausible(llm_logits.float(), a)


def constrain_to_plausible(steered_logprobs: torch.Tensor, llm_logits: torch.Tensor, alpha: RowValues,
                           mode: str = "mask") -> torch.Tensor:
    """Keep steering among the tokens the large model finds plausible (contrastive decoding's constraint).

    With ``W = min(V_L, V)`` the common width and ``s = steered_logprobs[:, :W]``, the row's
    *support* ``S = {i < W : s_i > -inf and z_L_i finite}`` is where steering happened (for
    :func:`~costeer_processor.core.update.steer`'s output: the large model's unmasked ids the small
    model also has). On it, ``ref = log_softmax(z_L)`` over ``S`` and
    ``P = {i in S : ref_i >= log(alpha) + max_{j in S} ref_j}`` (:func:`plausible_mask`; never
    empty when ``S`` is not)::

        mode "mask":   out_i = s_i - logsumexp_{j in P} s_j                              for i in P
                       out_i = -inf                                                      otherwise
        mode "large":  out_i = s_i - logsumexp_{j in P} s_j + logsumexp_{j in P} ref_j   for i in P
                       out_i = ref_i                                                     for i in S, not in P
                       out_i = -inf                                                      outside S

    i.e. "mask" renormalises the steered distribution over ``P``; "large" gives every implausible
    token the large model's own probability and lets the plausible ones share the large model's
    mass on ``P``, ``p_L(P) = sum_{j in P} p_L_j``, in proportion to the steered distribution
    (``p_L_i`` off ``P``, ``p_L(P) * p_s_i / p_s(P)`` on ``P``). Every row sums to 1.

    Ids the steered row rules out (``-inf``: masks, ids beyond the small vocabulary) stay ``-inf``
    in both modes, so passing :func:`steer`'s ``[B, V_L]`` output or its ``[B, V_S]`` common-width
    slice gives the same result. A row with an empty support is all ``-inf``; rows with ``alpha``
    0 (or ``alpha=None`` for all rows) are returned untouched (``steered_logprobs`` cut or
    ``-inf``-padded to ``V_L``). Never NaN.

    Args:
        steered_logprobs: ``[B, V]`` log-probabilities (e.g. :func:`~costeer_processor.core.update.steer`'s output).
        llm_logits: ``[B, V_L]`` large-model logits; NaN / ``+inf`` refused (``ValueError``).
        alpha: a number or one per row (``[B]``) in ``[0, 1]``; 0 = off for that row; ``None`` = off.
        mode: ``"mask"`` or ``"large"``.

    Returns:
        ``[B, V_L]`` float32 log-probabilities (a new tensor).
    """
    _check_2d(steered_logprobs=steered_logprobs, llm_logits=llm_logits)
    if mode not in PLAUSIBILITY_MODES:
        raise ValueError(f"mode must be one of {PLAUSIBILITY_MODES}, got {mode!r}")
    batch, large_width = llm_logits.shape
    width = min(large_width, steered_logprobs.shape[1])
    a = _row_column(alpha, batch, llm_logits.device, "alpha", high=1.0)
    s = steered_logprobs[:, :width].float()
    if a is None or not bool((a > 0).any()):
        return _to_width(s, large_width)
    _check_large_finite(llm_logits)
    z = llm_logits[:, :width].float()
    z = z.masked_fill(~(s > NEG_INF), NEG_INF)  # the support (a NaN in s counts as ruled out)
    keep = _plausible(z, a)
    s_p = s.masked_fill(~keep, NEG_INF)
    lse_s = torch.logsumexp(s_p, dim=-1, keepdim=True)
    if mode == "mask":
        out = (s_p - lse_s).masked_fill(~keep, NEG_INF)
    else:
        ref = torch.log_softmax(z, dim=-1)
        lse_ref = torch.logsumexp(ref.masked_fill(~keep, NEG_INF), dim=-1, keepdim=True)  # log p_L(P)
        out = torch.where(keep, s_p - lse_s + lse_ref, ref)
    out = torch.where(a > 0, out, s)
    out = out.masked_fill(torch.isnan(out), NEG_INF)  # rows with an empty support
    return _to_width(out, large_width)


# --------------------------------------------------------------------------- clipping
def clip_delta(delta: torch.Tensor, clip: RowValues) -> torch.Tensor:
    """``clamp(delta, -c, c)`` per row; non-finite entries count as 0 first (as in ``steer_careful``).

    Args:
        delta: ``[B, V]`` ``log_softmax(z_S+) - log_softmax(z_S-)``.
        clip: ``c``, a number or one per row (``[B]``), ``c >= 0``; ``0``, ``inf`` or ``None``
            mean no clipping for that row (``0`` switches a variant off everywhere in this package).

    Returns:
        ``[B, V]`` float32 (a new tensor).
    """
    _check_2d(delta=delta)
    d = delta.float()
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    c = _row_column(clip, d.shape[0], d.device, "clip", high=math.inf)
    if c is None:
        return d
    c = torch.where(c > 0, c, torch.full_like(c, math.inf))
    return torch.clamp(d, min=-c, max=c)


def steer_clipped(llm_logits: torch.Tensor, small_logits_with_context: torch.Tensor,
                  small_logits_without_context: torch.Tensor, gain=CoSteerConfig(),
                  clip: RowValues = None) -> torch.Tensor:
    """``log_softmax(ref + g * clamp(delta, -c, c))``, by the definition.

    ``ref = log_softmax(z_L)``, ``delta = log_softmax(z_S+) - log_softmax(z_S-)`` on the common
    width ``min(V_L, V_S)``; a non-finite delta counts as 0; ``-inf`` entries of ``z_L`` stay
    ``-inf``; a row with no finite large logit is all ``-inf``; ids beyond the common width are
    ``-inf``; never NaN. With ``clip`` off (``None``, 0 or ``inf``) this is
    :func:`~costeer_processor.core.update.steer_careful`.

    Args:
        gain: a :class:`CoSteerConfig`, a number, or one gain per row (``[B]``).
        clip: ``c`` (see :func:`clip_delta`).

    Returns:
        ``[B, V_L]`` float32 log-probabilities.
    """
    _check_2d(llm_logits=llm_logits, small_logits_with_context=small_logits_with_context,
              small_logits_without_context=small_logits_without_context)
    if small_logits_with_context.shape != small_logits_without_context.shape:
        raise ValueError("the two small-model branches must have the same shape, got "
                         f"{tuple(small_logits_with_context.shape)} and {tuple(small_logits_without_context.shape)}")
    _check_large_finite(llm_logits)
    batch, large_width = llm_logits.shape
    width = min(large_width, small_logits_with_context.shape[1])
    ref = torch.log_softmax(llm_logits[:, :width].float(), dim=-1)
    delta = (torch.log_softmax(small_logits_with_context[:, :width].float(), dim=-1)
             - torch.log_softmax(small_logits_without_context[:, :width].float(), dim=-1))
    delta = clip_delta(delta, clip)
    g = _gain_column(gain, batch, llm_logits.device)
    steered = torch.log_softmax(ref + g * delta, dim=-1)
    steered = steered.masked_fill(torch.isnan(steered), NEG_INF)
    return _to_width(steered, large_width)


def steer_styled(llm_logits: torch.Tensor, small_logits_with_context: torch.Tensor,
                 small_logits_without_context: torch.Tensor, gain=CoSteerConfig(), *, clip: RowValues = None,
                 plausibility: RowValues = None, mode: str = "mask") -> torch.Tensor:
    """:func:`steer_clipped` then :func:`constrain_to_plausible` (the large model's ``alpha`` test).

    With both options off this is ``steer_careful``; the placebo and the n-gram guard act on the
    small model's inputs and on the chosen tokens, not here.
    """
    steered = steer_clipped(llm_logits, small_logits_with_context, small_logits_without_context, gain, clip)
    return constrain_to_plausible(steered, llm_logits, plausibility, mode)


# --------------------------------------------------------------------------- placebo
#: First-person clauses that say nothing about a topic, a profession or a preferred style (no
#: length, tone, device, mood or hobby words); :func:`placebo_context` builds its sentences from them.
NEUTRAL_CLAUSES = (
    "I have a question",
    "I am asking it today",
    "this is my own message",
    "I am the person asking",
    "I would like an answer to it",
    "I will read what you write",
    "my question comes right after this note",
    "I am sending it to you now",
    "I put this note before my question",
    "that is all I want to say first",
)
_SENTENCE = re.compile(r"[^.!?\n]*[^.!?\s][^.!?\n]*(?:[.!?]+|(?=\n)|$)")


def placebo_context(context: str) -> str:
    """A neutral context of the same form as ``context``: same number of sentences, about the same length.

    What the without-context branch reads in the placebo variant, so that the delta compares the
    personal context with another first-person preamble rather than with nothing. The choice:

    * ``context`` is split into sentences (runs ending in ``.``, ``!``, ``?`` or a line end; a
      line break between sentences is kept, other separators become one space);
    * each sentence becomes one sentence of :data:`NEUTRAL_CLAUSES`, taken in a fixed rotation
      (no clause repeats before all were used) and joined by ``", and "`` while that brings the
      sentence's character length closer to the original's; it starts with a capital and ends
      with ``"."``;
    * deterministic (no randomness; the same context gives the same placebo), first person, and
      free of topic and style: no profession, place, device, length, tone or mood word.

    An empty or blank ``context`` gives ``""``.

    Example::

        >>> placebo_context("I'm a paramedic on night shifts. I read answers on my phone between calls.")
        'I have a question, and I am asking it today. This is my own message, and I am the person asking.'
    """
    parts = []
    for m in _SENTENCE.finditer(context):
        text = m.group(0).strip()
        if text:
            parts.append((text, context[m.end():m.end() + 1] == "\n"))
    out, k, n = [], 0, len(NEUTRAL_CLAUSES)
    for text, newline_after in parts:
        target = len(text)
        sentence = NEUTRAL_CLAUSES[k % n] + "."
        k += 1
        while True:
            longer = sentence[:-1] + ", and " + NEUTRAL_CLAUSES[k % n] + "."
            if abs(len(longer) - target) >= abs(len(sentence) - target):
                break
            sentence = longer
            k += 1
        out.append(sentence[0].upper() + sentence[1:])
        out.append("\n" if newline_after else " ")
    return "".join(out[:-1])
