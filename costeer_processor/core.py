"""The CoSteer update, framework-free (torch only).

Every adapter in this package (Hugging Face, vLLM V1, vLLM Model Runner V2, split mode)
calls :func:`steer`; this module is the one place where "the CoSteer update" lives.

Per step, with next-token logits ``z_L`` (large model), ``z_S+`` (small model with the
personal context) and ``z_S-`` (small model without it)::

    ref   = log_softmax(z_L)
    delta = log_softmax(z_S+) - log_softmax(z_S-)
    p_0 = ref, S_0 = 0
    for k in 1..T:                                    # FTRL inner loop
        S_k = S_{k-1} + alpha * (p_{k-1} - ref) + beta * delta
        p_k = log_softmax((k*lam*ref + S_k + p_{k-1}/eta) / (k*lam + 1/eta))

Every step is affine in log space and log_softmax only shifts a row by a constant, so
``p_T = log_softmax(ref + g_T * delta)`` with a scalar ``g_T`` that depends only on the
hyper-parameters (:func:`costeer_gain`). :func:`steer` uses that closed form;
:func:`ftrl_reference` keeps the literal loop as a test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "CoSteerConfig",
    "costeer_gain",
    "steer",
    "ftrl_reference",
    "gain_from_hyperparameters",
    "top_probability",
    "eos_probability",
    "update_confidence_streak",
    "force_eos",
]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class CoSteerConfig:
    """Hyper-parameters of the CoSteer update (defaults: the official release and the paper).

    Args:
        T: number of FTRL inner steps per token (``>= 1``).
        alpha: weight of the ``p - ref`` term (``alpha > lam`` makes the gain grow with T).
        beta: weight of the local delta; the gain is linear in it.
        lam: regularisation towards the large model (``> 0``).
        eta: learning rate of the proximal term (``> 0``).
        strength: if set, the closed-form gain ``g`` itself, overriding the one derived from
            the five values above. ``strength=1.0`` is proxy-tuning-style arithmetic
            ``log_softmax(ref + delta)``; ``0.0`` switches steering off.

    Example::

        >>> from costeer_processor import CoSteerConfig, costeer_gain
        >>> round(costeer_gain(CoSteerConfig()), 6)
        1.783257
        >>> costeer_gain(CoSteerConfig(strength=1.0))
        1.0
    """

    T: int = 20
    alpha: float = 2.0
    beta: float = 1.0
    lam: float = 2.0
    eta: float = 10.0
    strength: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.T, bool) or not isinstance(self.T, int):
            raise ValueError(f"CoSteer T must be an integer >= 1, got {self.T!r}")
        if self.T < 1:
            raise ValueError(f"CoSteer T must be >= 1, got {self.T}")
        for name in ("alpha", "beta", "lam", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CoSteer {name} must be a finite number, got {value!r}")
        if self.lam <= 0:
            raise ValueError(f"CoSteer lam must be > 0, got {self.lam}")
        if self.eta <= 0:
            raise ValueError(f"CoSteer eta must be > 0, got {self.eta}")
        if self.strength is not None:
            s = self.strength
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"CoSteer strength must be a finite number or None, got {s!r}")

    def replace(self, **changes) -> "CoSteerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def gain_from_hyperparameters(T: int, alpha: float, beta: float, lam: float, eta: float) -> float:
    """The closed-form gain ``g_T`` of the FTRL loop (pure Python, float64)."""
    g = 0.0
    G = 0.0
    for k in range(1, T + 1):
        G = G + alpha * g + beta
        g = (G + g / eta) / (k * lam + 1.0 / eta)
    return g


def costeer_gain(config: CoSteerConfig = CoSteerConfig()) -> float:
    """The scalar ``g`` such that CoSteer's output is ``log_softmax(ref + g * delta)``.

    1.783257 at the official defaults; ``config.strength`` when that is set.
    """
    if config.strength is not None:
        return float(config.strength)
    return gain_from_hyperparameters(config.T, config.alpha, config.beta, config.lam, config.eta)


GainLike = Union[CoSteerConfig, float, int, torch.Tensor, Sequence[float]]


def _gain_column(gain: GainLike, batch: int, device: torch.device) -> torch.Tensor:
    """Per-row gains as a ``[B, 1]`` float32 tensor."""
    if isinstance(gain, CoSteerConfig):
        gain = costeer_gain(gain)
    if isinstance(gain, (int, float)) and not isinstance(gain, bool):
        return torch.full((batch, 1), float(gain), dtype=torch.float32, device=device)
    g = torch.as_tensor(gain, dtype=torch.float32, device=device).reshape(-1)
    if g.numel() != batch:
        raise ValueError(f"got {g.numel()} per-row gains for a batch of {batch} rows")
    if not torch.isfinite(g).all():
        raise ValueError("per-row gains must be finite")
    return g.unsqueeze(1)


def _check_inputs(llm_logits: torch.Tensor, with_ctx: torch.Tensor, without_ctx: torch.Tensor) -> None:
    for name, t in (("llm_logits", llm_logits), ("small_logits_with_context", with_ctx),
                    ("small_logits_without_context", without_ctx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [batch, vocab], got shape {tuple(t.shape)}")
    if with_ctx.shape != without_ctx.shape:
        raise ValueError(
            "the two small-model branches must have the same shape, got "
            f"{tuple(with_ctx.shape)} and {tuple(without_ctx.shape)}"
        )
    if llm_logits.shape[0] != with_ctx.shape[0]:
        raise ValueError(
            f"batch mismatch: large model has {llm_logits.shape[0]} rows, small model {with_ctx.shape[0]}"
        )
    if torch.isnan(llm_logits).any() or torch.isposinf(llm_logits).any():
        raise ValueError("llm_logits holds NaN or +inf; CoSteer needs finite logits (-inf masks are fine)")


def _common_width_parts(llm_logits, with_ctx, without_ctx):
    width = min(llm_logits.shape[1], with_ctx.shape[1])
    ref = torch.log_softmax(llm_logits[:, :width].float(), dim=-1)
    delta = (torch.log_softmax(with_ctx[:, :width].float(), dim=-1)
             - torch.log_softmax(without_ctx[:, :width].float(), dim=-1))
    # A token that is -inf in both branches gives NaN (or +-inf): no evidence either way.
    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
    return width, ref, delta


def _pad_to_large_width(steered: torch.Tensor, large_width: int) -> torch.Tensor:
    """Ids the small model does not have stay impossible (-inf)."""
    if steered.shape[1] == large_width:
        return steered
    out = steered.new_full((steered.shape[0], large_width), NEG_INF)
    out[:, : steered.shape[1]] = steered
    return out


def steer(
    llm_logits: torch.Tensor,
    small_logits_with_context: torch.Tensor,
    small_logits_without_context: torch.Tensor,
    config: GainLike = CoSteerConfig(),
) -> torch.Tensor:
    """CoSteer's next-token log-probabilities for a batch, by the closed form.

    Args:
        llm_logits: ``[B, V_L]`` large-model logits (may hold ``-inf`` masks from other processors).
        small_logits_with_context: ``[B, V_S]`` small-model logits with the personal context.
        small_logits_without_context: ``[B, V_S]`` small-model logits without it.
        config: a :class:`CoSteerConfig`, a scalar gain, or one gain per row (``[B]``).

    Returns:
        ``[B, V_L]`` float32 log-probabilities. Steering runs on the common width
        ``min(V_L, V_S)``; ids beyond it are ``-inf``; entries masked (``-inf``) in
        ``llm_logits`` stay ``-inf``; a non-finite delta counts as 0; never NaN.

    Example::

        >>> import torch
        >>> from costeer_processor import steer, CoSteerConfig
        >>> large = torch.tensor([[2.0, 1.0, 0.0]])
        >>> with_ctx, without_ctx = torch.tensor([[0.0, 3.0, 0.0]]), torch.zeros(1, 3)
        >>> steer(large, with_ctx, without_ctx, CoSteerConfig()).argmax(-1).item()
        1
    """
    _check_inputs(llm_logits, small_logits_with_context, small_logits_without_context)
    width, ref, delta = _common_width_parts(llm_logits, small_logits_with_context, small_logits_without_context)
    gain = _gain_column(config, ref.shape[0], ref.device)
    steered = torch.log_softmax(ref + gain * delta, dim=-1)
    # A row with no finite entry at all (everything masked) would be NaN: keep it all -inf.
    steered = steered.masked_fill(torch.isnan(steered), NEG_INF)
    return _pad_to_large_width(steered, llm_logits.shape[1])


def ftrl_reference(
    llm_logits: torch.Tensor,
    small_logits_with_context: torch.Tensor,
    small_logits_without_context: torch.Tensor,
    config: CoSteerConfig = CoSteerConfig(),
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The release's T-step FTRL loop, literally; a test oracle for :func:`steer`.

    About T times slower than :func:`steer`. The only departure from the release: where
    ``ref`` is ``-inf`` the term ``p - ref`` would be ``-inf - -inf = NaN`` and poison the
    row, so it is taken as 0 there (masked entries stay ``-inf``). ``config.strength`` is
    ignored: the loop is defined by T, alpha, beta, lam and eta.
    """
    _check_inputs(llm_logits, small_logits_with_context, small_logits_without_context)
    width = min(llm_logits.shape[1], small_logits_with_context.shape[1])
    ref = torch.log_softmax(llm_logits[:, :width].to(dtype), dim=-1)
    delta = (torch.log_softmax(small_logits_with_context[:, :width].to(dtype), dim=-1)
             - torch.log_softmax(small_logits_without_context[:, :width].to(dtype), dim=-1))
    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
    masked = torch.isneginf(ref)
    c = config
    p = ref.clone()
    S = torch.zeros_like(ref)
    for k in range(1, c.T + 1):
        regret = torch.where(masked, torch.zeros_like(p), p - ref)
        S = S + c.alpha * regret + c.beta * delta
        p = torch.log_softmax((k * c.lam * ref + S + p / c.eta) / (k * c.lam + 1.0 / c.eta), dim=-1)
    p = p.masked_fill(torch.isnan(p), NEG_INF)
    return _pad_to_large_width(p.float(), llm_logits.shape[1])


def check_variants(gate_threshold: Optional[float], gate_patience: int, eos_guard: Optional[float]) -> None:
    """Validates the AdaCoSteer gate and the EOS guard (shared by the HF processor and split mode)."""
    def number(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float))

    if gate_threshold is not None and not (number(gate_threshold) and 0.0 < gate_threshold < 1.0):
        raise ValueError(f"gate_threshold must be a number in (0, 1), got {gate_threshold!r}")
    if isinstance(gate_patience, bool) or not isinstance(gate_patience, int) or gate_patience < 1:
        raise ValueError(f"gate_patience must be an integer >= 1, got {gate_patience!r}")
    if eos_guard is not None and not (number(eos_guard) and 0.0 < eos_guard <= 1.0):
        raise ValueError(f"eos_guard must be a number in (0, 1], got {eos_guard!r}")


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
              threshold: float) -> torch.Tensor:
    """EOS guard: rows whose large model gives EOS probability > ``threshold`` must stop now.

    Such rows get log-prob 0 on their most likely EOS id and ``-inf`` elsewhere, so steering
    cannot stretch an answer past where the large model would end it.
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
