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

from typing import Sequence, Union

import torch

from .config import CoSteerConfig, gain_from_hyperparameters

__all__ = ["costeer_gain", "steer", "steer_careful", "ftrl_reference", "gain_from_hyperparameters", "GainLike", "NEG_INF"]

NEG_INF = float("-inf")


def costeer_gain(config: CoSteerConfig = CoSteerConfig()) -> float:
    """The scalar ``g`` such that CoSteer's output is ``log_softmax(ref + g * delta)``.

    1.783257 at the official defaults; ``config.strength`` when that is set.
    """
    return config.gain


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


def _check_shapes(llm_logits: torch.Tensor, with_ctx: torch.Tensor, without_ctx: torch.Tensor) -> None:
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


def _check_large_finite(llm_logits: torch.Tensor) -> None:
    if torch.isnan(llm_logits).any() or torch.isposinf(llm_logits).any():
        raise ValueError("llm_logits holds NaN or +inf; CoSteer needs finite logits (-inf masks are fine)")


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
    """CoSteer's next-token log-probabilities for a batch, by the closed form, in one pass.

    ``log_softmax`` only shifts a row by a constant, so
    ``log_softmax(ref + g * delta) == log_softmax(z_L + g * (z_S+ - z_S-))``: one fused
    expression and one normalisation instead of three ``log_softmax`` calls. Rows where the
    shortcut could differ from the definition (a non-finite small-model difference, a row of
    ``-inf``, NaN / +inf large logits) are detected and the batch is recomputed by the
    careful three-``log_softmax`` path, so the rules below hold exactly (two cheap per-row
    reductions decide: the sum of the difference and the max of the result).

    Args:
        llm_logits: ``[B, V_L]`` large-model logits (may hold ``-inf`` masks from other processors).
        small_logits_with_context: ``[B, V_S]`` small-model logits with the personal context.
        small_logits_without_context: ``[B, V_S]`` small-model logits without it.
        config: a :class:`CoSteerConfig`, a scalar gain, or one gain per row (``[B]``).

    Returns:
        ``[B, V_L]`` float32 log-probabilities. Steering runs on the common width
        ``min(V_L, V_S)``; ids beyond it are ``-inf``; entries masked (``-inf``) in
        ``llm_logits`` stay ``-inf``; a non-finite delta counts as 0; never NaN.
        Raises ``ValueError`` when ``llm_logits`` holds NaN or +inf. Inputs that require grad take
        the careful path (the one-pass form writes in place), so gradients flow as before.

    Example::

        >>> import torch
        >>> from costeer_processor import steer, CoSteerConfig
        >>> large = torch.tensor([[2.0, 1.0, 0.0]])
        >>> with_ctx, without_ctx = torch.tensor([[0.0, 3.0, 0.0]]), torch.zeros(1, 3)
        >>> steer(large, with_ctx, without_ctx, CoSteerConfig()).argmax(-1).item()
        1
    """
    _check_shapes(llm_logits, small_logits_with_context, small_logits_without_context)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (llm_logits, small_logits_with_context,
                                                                 small_logits_without_context)):
        return steer_careful(llm_logits, small_logits_with_context, small_logits_without_context, config)
    width = min(llm_logits.shape[1], small_logits_with_context.shape[1])
    gain = _gain_column(config, llm_logits.shape[0], llm_logits.device)
    with_ctx = small_logits_with_context[:, :width]
    without_ctx = small_logits_without_context[:, :width]
    if with_ctx.dtype == torch.float32:
        diff = torch.sub(with_ctx, without_ctx)
    else:  # bf16 / fp16 small model: subtract in float32
        diff = with_ctx.float().sub_(without_ctx)
    total = diff.sum(dim=-1)  # finite iff every entry of the difference is (a cheap, vectorised reduction)
    x = torch.addcmul(llm_logits[:, :width], gain, diff, out=diff)  # z_L + g * (z_S+ - z_S-), in float32
    top = x.amax(dim=-1)
    # Rows the shortcut could get wrong: a non-finite difference (delta counts as 0 there), NaN / +inf
    # large logits (refused) or a row with no finite entry (all -inf): the careful path decides.
    if not bool(torch.isfinite(torch.stack([total, top])).all()):
        return steer_careful(llm_logits, small_logits_with_context, small_logits_without_context, gain)
    # normalised in place: x is this call's own buffer (a second 150k-wide allocation per row costs
    # as much as the arithmetic on a CPU: fresh pages)
    return _pad_to_large_width(torch.ops.aten._log_softmax.out(x, -1, False, out=x), llm_logits.shape[1])


def steer_careful(
    llm_logits: torch.Tensor,
    small_logits_with_context: torch.Tensor,
    small_logits_without_context: torch.Tensor,
    config: GainLike = CoSteerConfig(),
) -> torch.Tensor:
    """:func:`steer` by its definition (three ``log_softmax`` calls, explicit masking).

    The path :func:`steer` falls back to for rows with non-finite values; also the baseline
    that ``benchmarks/bench_update.py`` measures the one-pass form against.
    """
    _check_shapes(llm_logits, small_logits_with_context, small_logits_without_context)
    _check_large_finite(llm_logits)
    width = min(llm_logits.shape[1], small_logits_with_context.shape[1])
    ref = torch.log_softmax(llm_logits[:, :width].float(), dim=-1)
    delta = (torch.log_softmax(small_logits_with_context[:, :width].float(), dim=-1)
             - torch.log_softmax(small_logits_without_context[:, :width].float(), dim=-1))
    # A token that is -inf in both branches gives NaN (or +-inf): no evidence either way.
    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
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
    _check_shapes(llm_logits, small_logits_with_context, small_logits_without_context)
    _check_large_finite(llm_logits)
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
