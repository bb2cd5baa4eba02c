"""Style-not-topic options of the steering step (core/style.py): each exact against its formula.

References are straightforward float64 row loops in probability space, written from the formulas
in the docstrings; inputs carry -inf masks, an all -inf large row, tokens -inf in one or both small
branches, and a large vocabulary wider than the small one.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from costeer_processor.core import CoSteerConfig, steer, steer_careful
from costeer_processor.core import style
from costeer_processor.core.style import (NEUTRAL_CLAUSES, clip_delta, constrain_to_plausible, placebo_context,
                                          plausible_mask, steer_clipped, steer_styled)

B, V_L, V_S = 6, 40, 32
PERSONAS = Path(__file__).resolve().parents[1] / "costeer_processor" / "eval" / "data" / "persona_dev.jsonl"


def logits(seed: int = 0):
    """(z_L [B, V_L], z_S+ [B, V_S], z_S- [B, V_S]) with masks of every kind."""
    g = torch.Generator().manual_seed(seed)
    z_l = torch.randn(B, V_L, generator=g) * 3
    z_w = torch.randn(B, V_S, generator=g) * 3
    z_wo = torch.randn(B, V_S, generator=g) * 3
    z_l[torch.rand(B, V_L, generator=g) < 0.2] = -math.inf  # other processors' masks
    z_l[4] = -math.inf  # a row with nothing allowed
    z_w[0, :3] = -math.inf  # -inf in the with-context branch only ...
    z_wo[1, 3:6] = -math.inf  # ... in the without-context branch only ...
    z_w[2, 6:9] = z_wo[2, 6:9] = -math.inf  # ... and in both (NaN delta: counts as 0)
    return z_l, z_w, z_wo


def log_softmax64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return torch.full_like(x, -math.inf)
    m = finite.max()
    return x - (m + torch.log(torch.exp(x - m).sum()))


def ref_plausible(z: torch.Tensor, alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, margin) per row: logp >= log(alpha) + max logp, finite entries only."""
    mask = torch.zeros(z.shape, dtype=torch.bool)
    margin = torch.full(z.shape, math.inf, dtype=torch.float64)
    for b in range(z.shape[0]):
        lp = log_softmax64(z[b])
        fin = torch.isfinite(lp)
        if not fin.any():
            continue
        a = float(alpha[b]) if isinstance(alpha, (list, torch.Tensor)) else float(alpha)
        thr = (math.log(a) if a > 0 else -math.inf) + lp[fin].max().item()
        for i in range(z.shape[1]):
            if fin[i]:
                mask[b, i] = lp[i].item() >= thr
                margin[b, i] = abs(lp[i].item() - thr)
    return mask, margin


def ref_constrain(s: torch.Tensor, z: torch.Tensor, alpha, mode: str) -> torch.Tensor:
    width = min(z.shape[1], s.shape[1])
    out = torch.full((z.shape[0], z.shape[1]), -math.inf, dtype=torch.float64)
    for b in range(z.shape[0]):
        a = float(alpha[b]) if isinstance(alpha, (list, torch.Tensor)) else float(alpha)
        row = s[b, :width].double()
        if a == 0:
            out[b, :width] = row
            continue
        S = [i for i in range(width) if row[i] > -math.inf and math.isfinite(z[b, i])]
        if not S:
            continue
        zs = torch.full((width,), -math.inf, dtype=torch.float64)
        zs[S] = z[b, S].double()
        ref = log_softmax64(zs)
        top = max(ref[i].item() for i in S)
        P = [i for i in S if ref[i].item() >= math.log(a) + top]
        mass_s = sum(math.exp(row[i]) for i in P)
        p_large = sum(math.exp(ref[i]) for i in P)
        for i in S:
            if i in P:
                out[b, i] = math.log(math.exp(row[i]) / mass_s * (1.0 if mode == "mask" else p_large))
            elif mode == "large":
                out[b, i] = ref[i]
    return out


def ref_steer_clipped(z_l, z_w, z_wo, gain, clip) -> torch.Tensor:
    width = min(z_l.shape[1], z_w.shape[1])
    out = torch.full(z_l.shape, -math.inf, dtype=torch.float64)
    for b in range(z_l.shape[0]):
        ref = log_softmax64(z_l[b, :width])
        d = log_softmax64(z_w[b, :width]) - log_softmax64(z_wo[b, :width])
        d[~torch.isfinite(d)] = 0.0
        c = clip if not isinstance(clip, (list, torch.Tensor)) else float(clip[b])
        if c is not None and 0 < c < math.inf:
            d = d.clamp(-c, c)
        g = gain if not isinstance(gain, (list, torch.Tensor)) else float(gain[b])
        out[b, :width] = log_softmax64(ref + g * d)
    return out


def assert_no_near_tie(margin: torch.Tensor) -> None:
    """No entry within 1e-5 of the threshold, so float32 and float64 decide alike (0 = the max itself at alpha 1)."""
    assert not ((margin < 1e-5) & (margin > 0)).any()


def assert_same_logprobs(got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got.double()[fin], want[fin], atol=atol, rtol=0)


def assert_rows_sum_to_one(x: torch.Tensor) -> None:
    alive = torch.isfinite(x).any(-1)
    assert torch.allclose(x[alive].double().exp().sum(-1), torch.ones(int(alive.sum()), dtype=torch.float64), atol=1e-5)


# --------------------------------------------------------------------------- plausible_mask
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 1e-3, 0.0, [0.0, 0.2, 1.0, 0.05, 0.3, 0.7]])
def test_plausible_mask_is_the_log_space_test(alpha):
    z_l, _, _ = logits(1)
    got = plausible_mask(z_l, torch.tensor(alpha) if isinstance(alpha, list) else alpha)
    want, margin = ref_plausible(z_l, alpha)
    assert got.dtype == torch.bool and got.shape == z_l.shape
    assert_no_near_tie(margin)  # in this draw: the comparison is exact
    assert torch.equal(got, want)
    assert not got[torch.isneginf(z_l)].any() and not got[4].any()  # -inf never plausible
    assert got[[0, 1, 2, 3, 5]].any(-1).all()  # the argmax always is


def test_plausible_mask_alpha_one_keeps_ties_and_none_keeps_every_finite_entry():
    z = torch.tensor([[1.0, 3.0, 3.0, -math.inf], [0.0, 0.0, 0.0, 0.0]])
    assert plausible_mask(z, 1.0).tolist() == [[False, True, True, False], [True] * 4]
    assert torch.equal(plausible_mask(z, None), torch.isfinite(z))
    assert torch.equal(plausible_mask(z.bfloat16(), 1.0), plausible_mask(z, 1.0))


# --------------------------------------------------------------------------- constrain_to_plausible
@pytest.mark.parametrize("mode", ["mask", "large"])
@pytest.mark.parametrize("alpha", [0.3, 0.02, 1.0, [0.1, 0.0, 0.5, 1e-3, 0.2, 0.0]])
def test_constrain_to_plausible_matches_its_formula(mode, alpha):
    z_l, z_w, z_wo = logits(2)
    steered = steer(z_l, z_w, z_wo, CoSteerConfig())
    a = torch.tensor(alpha) if isinstance(alpha, list) else alpha
    got = constrain_to_plausible(steered, z_l, a, mode)
    want = ref_constrain(steered, z_l, alpha, mode)
    assert_no_near_tie(ref_plausible(z_l[:, :V_S], alpha)[1])
    assert_same_logprobs(got, want)
    assert_rows_sum_to_one(got)
    assert torch.isneginf(got[:, V_S:]).all()  # ids the small model does not have
    assert torch.isneginf(got[torch.isneginf(z_l)]).all()  # masks stay masked
    assert torch.isneginf(got[4]).all()  # nothing allowed stays nothing allowed


@pytest.mark.parametrize("mode", ["mask", "large"])
def test_constrain_on_the_common_width_when_steered_is_narrower(mode):
    z_l, z_w, z_wo = logits(3)
    steered = steer_careful(z_l, z_w, z_wo, 1.5)[:, :V_S]  # [B, V_S]: the caller sliced it
    got = constrain_to_plausible(steered, z_l, 0.1, mode)
    assert got.shape == (B, V_L)
    assert_same_logprobs(got, ref_constrain(steered, z_l, 0.1, mode))
    # the large model's own tokens beyond the small vocabulary: -inf, as steer does
    assert torch.isneginf(got[:, V_S:]).all()


def test_per_row_off_rows_are_untouched_and_all_off_is_a_copy():
    z_l, z_w, z_wo = logits(4)
    steered = steer(z_l, z_w, z_wo, CoSteerConfig())
    alpha = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.0, 0.1])
    for mode in ("mask", "large"):
        got = constrain_to_plausible(steered, z_l, alpha, mode)
        assert torch.equal(got[alpha == 0], steered[alpha == 0])
        assert not torch.equal(got[1], steered[1])
    for off in (None, 0.0, torch.zeros(B)):
        same = constrain_to_plausible(steered, z_l, off)
        assert torch.equal(same, steered) and same.data_ptr() != steered.data_ptr()


def test_large_mode_keeps_the_large_models_probability_off_the_plausible_set():
    z_l, z_w, z_wo = logits(5)
    steered = steer(z_l, z_w, z_wo, 3.0)
    keep = plausible_mask(z_l[:, :V_S], 0.1)
    ref = torch.log_softmax(z_l[:, :V_S], -1)
    got = constrain_to_plausible(steered, z_l, 0.1, "large")[:, :V_S]
    live = torch.isfinite(z_l).any(-1, keepdim=True)  # row 4 has no finite logit (ref is NaN there)
    assert_same_logprobs(got[~keep & live], ref[~keep & live].double(), atol=1e-6)
    # on P: the large model's mass there, shared in proportion to the steered distribution
    p_got, p_ref, p_st = got.exp(), ref.exp(), steered[:, :V_S].exp()
    rows = torch.tensor([0, 1, 2, 3, 5])
    mass_ref = (p_ref * keep).sum(-1)[rows]
    assert torch.allclose((p_got * keep).sum(-1)[rows], mass_ref, atol=1e-6)
    ratio = (p_got / p_st)[rows][keep[rows]]
    per_row = (mass_ref / (p_st * keep).sum(-1)[rows]).repeat_interleave(keep[rows].sum(-1))
    assert torch.allclose(ratio, per_row, rtol=1e-4)


@pytest.mark.parametrize("mode", ["mask", "large"])
def test_ids_the_steered_row_rules_out_stay_out(mode):
    z_l = torch.tensor([[4.0, 3.5, -2.0, -3.0], [1.0, 0.0, -1.0, -5.0]])
    steered = torch.log_softmax(torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]]), -1)
    steered[0, 0] = -math.inf  # another processor banned the large model's favourite
    got = constrain_to_plausible(steered, z_l, 0.3, mode)
    assert_same_logprobs(got, ref_constrain(steered, z_l, 0.3, mode))
    assert torch.isneginf(got[0, 0]) and torch.isfinite(got[0, 1])  # P is relative to the best allowed id
    if mode == "large":  # what is left of the large model on ids 1..3, renormalised
        assert torch.allclose(got[0, 2:], torch.log_softmax(z_l[0, 1:], -1)[1:])
    else:
        assert got[0].tolist() == [-math.inf, 0.0, -math.inf, -math.inf]
    # steer's [B, V_L] output and its common-width slice give the same result
    z_l, z_w, z_wo = logits(11)
    full = steer(z_l, z_w, z_wo, CoSteerConfig())
    assert torch.equal(constrain_to_plausible(full, z_l, 0.1, mode), constrain_to_plausible(full[:, :V_S], z_l, 0.1, mode))


def test_constrain_refuses_bad_arguments():
    z_l, z_w, z_wo = logits(6)
    s = steer(z_l, z_w, z_wo)
    for bad, msg in [(1.5, "alpha must be in [0, 1]"), (-0.1, "alpha must be in [0, 1]"),
                     (math.nan, "alpha must be in [0, 1]"), (torch.tensor([0.1, 2.0, 0, 0, 0, 0]), "per row"),
                     (torch.tensor([0.1, 0.2]), "2 per-row values of alpha for a batch of 6"), (True, "bool")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            constrain_to_plausible(s, z_l, bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        constrain_to_plausible(s, z_l, 0.1, "topk")
    bad_large = z_l.clone()
    bad_large[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        constrain_to_plausible(s, bad_large, 0.1)
    with pytest.raises(ValueError, match="batch mismatch"):
        constrain_to_plausible(s[:2], z_l, 0.1)


# --------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("clip", [None, 0.0, math.inf, 0.5, 2.0, [0.0, 0.3, math.inf, 1.0, 0.1, 5.0]])
@pytest.mark.parametrize("gain", [1.783257, 3.0, [0.0, 1.0, 1.783257, 2.0, 5.0, -1.0]])
def test_steer_clipped_matches_its_definition(clip, gain):
    z_l, z_w, z_wo = logits(7)
    c = torch.tensor(clip) if isinstance(clip, list) else clip
    g = torch.tensor(gain) if isinstance(gain, list) else gain
    got = steer_clipped(z_l, z_w, z_wo, g, c)
    assert got.shape == (B, V_L)
    assert_same_logprobs(got, ref_steer_clipped(z_l, z_w, z_wo, gain, clip))
    assert_rows_sum_to_one(got)
    assert torch.isneginf(got[:, V_S:]).all() and torch.isneginf(got[4]).all()
    assert torch.isneginf(got[torch.isneginf(z_l)]).all()


def test_steer_clipped_without_clipping_is_the_update():
    z_l, z_w, z_wo = logits(8)
    for cfg in (CoSteerConfig(), 1.0, torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 0.5])):
        want = steer_careful(z_l, z_w, z_wo, cfg)
        for off in (None, 0.0, math.inf):
            assert torch.allclose(steer_clipped(z_l, z_w, z_wo, cfg, off), want, atol=1e-6)
            assert torch.allclose(steer_styled(z_l, z_w, z_wo, cfg, clip=off), want, atol=1e-6)
        assert torch.equal(torch.isneginf(steer(z_l, z_w, z_wo, cfg)), torch.isneginf(want))


def test_clip_delta_bounds_every_token_and_zeroes_non_finite_entries():
    d = torch.tensor([[3.0, -4.0, 0.2, math.nan], [math.inf, -math.inf, 9.0, -0.5]])
    assert clip_delta(d, 1.0).tolist() == [[1.0, -1.0, pytest.approx(0.2), 0.0], [0.0, 0.0, 1.0, -0.5]]
    assert clip_delta(d, torch.tensor([0.0, 2.0])).tolist() == [[3.0, -4.0, pytest.approx(0.2), 0.0],
                                                               [0.0, 0.0, 2.0, -0.5]]
    with pytest.raises(ValueError, match=re.escape("clip must be in [0, inf]")):
        clip_delta(d, -1.0)
    # a clipped delta moves no token by more than g * c nats against the large model
    z_l, z_w, z_wo = logits(9)
    ref = torch.log_softmax(z_l[:, :V_S], -1)
    moved = steer_clipped(z_l, z_w, z_wo, 2.0, 0.25)[:, :V_S] - ref
    fin = torch.isfinite(moved)
    spread = torch.stack([r[f].max() - r[f].min() for r, f in zip(moved, fin) if f.any()])
    assert (spread <= 2 * 2.0 * 0.25 + 1e-5).all()


# --------------------------------------------------------------------------- both, never NaN
@pytest.mark.parametrize("mode", ["mask", "large"])
def test_steer_styled_is_clip_then_constrain_and_never_nan(mode):
    z_l, z_w, z_wo = logits(10)
    got = steer_styled(z_l, z_w, z_wo, 1.783257, clip=1.0, plausibility=0.05, mode=mode)
    want = ref_constrain(ref_steer_clipped(z_l, z_w, z_wo, 1.783257, 1.0).float(), z_l, 0.05, mode)
    assert_same_logprobs(got, want)
    # hostile inputs: bf16, +inf / NaN small logits, all -inf everywhere
    z_w2 = z_w.clone()
    z_w2[3, 0], z_w2[5, 1] = math.inf, math.nan
    for a, b, c in [(z_l.bfloat16(), z_w.bfloat16(), z_wo.bfloat16()), (z_l, z_w2, z_wo),
                    (torch.full((2, 5), -math.inf), torch.full((2, 5), -math.inf), torch.zeros(2, 5))]:
        out = steer_styled(a, b, c, 3.0, clip=0.5, plausibility=0.1, mode=mode)
        assert not torch.isnan(out).any() and out.dtype == torch.float32


# --------------------------------------------------------------------------- placebo
def _persona_contexts():
    return [json.loads(line)["context"] for line in PERSONAS.read_text().splitlines() if line.strip()]


def _sentences(text):
    return [m.group(0).strip() for m in style._SENTENCE.finditer(text) if m.group(0).strip()]


@pytest.mark.parametrize("context", _persona_contexts() + [
    "I am vegan and I love spicy food.", "Short.", "One! Two? Three.\nA fourth line without a stop",
    "I'm a very talkative person who likes to hear every single detail about absolutely everything, always. Really."])
def test_placebo_has_the_contexts_form_and_no_content(context):
    p = placebo_context(context)
    assert p == placebo_context(context)  # deterministic
    assert len(_sentences(p)) == len(_sentences(context))
    assert context.count("\n") == p.count("\n")
    longest = max(len(c) for c in NEUTRAL_CLAUSES) + len(", and ")
    assert abs(len(p) - len(context)) <= longest, (p, context)
    assert all(s[0].isupper() and s.endswith(".") for s in _sentences(p))
    assert re.search(r"\b(I|my)\b", p)  # first person
    neutral_words = {w for c in NEUTRAL_CLAUSES for w in re.findall(r"[a-z]+", c.lower())} | {"and"}
    assert set(re.findall(r"[a-z]+", p.lower())) <= neutral_words


def test_placebo_carries_no_persona_term():
    for line in PERSONAS.read_text().splitlines():
        row = json.loads(line)
        p = placebo_context(row["context"]).lower()
        assert not any(re.search(r"(?<!\w)" + re.escape(t.lower()), p) for t in row["leak_terms"])
    assert placebo_context("") == "" and placebo_context("   \n ") == ""
