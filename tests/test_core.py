import itertools
import math

import pytest
import torch

from costeer_processor import CoSteerConfig, costeer_gain, ftrl_reference, steer
from costeer_processor.core import eos_probability, force_eos, update_confidence_streak


def random_logits(rows, width, seed, mask_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width, generator=g) * 3
    if mask_frac:
        mask = torch.rand(rows, width, generator=g) < mask_frac
        mask[:, 0] = False  # keep one finite entry per row
        z = z.masked_fill(mask, float("-inf"))
    return z


def test_default_gain_matches_paper_closed_form():
    assert costeer_gain(CoSteerConfig()) == pytest.approx(1.783257, abs=1e-6)
    gains = [costeer_gain(CoSteerConfig(T=t)) for t in range(1, 6)]
    assert gains == pytest.approx([0.476, 0.732, 0.900, 1.025, 1.126], abs=1e-3)
    assert costeer_gain(CoSteerConfig(strength=1.0)) == 1.0
    # linear in beta
    assert costeer_gain(CoSteerConfig(beta=2.0)) == pytest.approx(2 * costeer_gain(CoSteerConfig()))


GRID = list(itertools.product([1, 3, 20], [0.0, 2.0, 3.0], [0.5, 1.0], [0.5, 2.0], [1.0, 10.0]))


@pytest.mark.parametrize("T,alpha,beta,lam,eta", GRID)
def test_closed_form_equals_reference_loop(T, alpha, beta, lam, eta):
    cfg = CoSteerConfig(T=T, alpha=alpha, beta=beta, lam=lam, eta=eta)
    large = random_logits(4, 50, 1, mask_frac=0.2)
    s_with, s_without = random_logits(4, 47, 2), random_logits(4, 47, 3)
    closed = steer(large, s_with, s_without, cfg)
    loop = ftrl_reference(large, s_with, s_without, cfg)
    assert closed.shape == (4, 50)
    assert not torch.isnan(closed).any()
    # masked entries and ids beyond the small model's width are -inf in both
    assert torch.equal(torch.isneginf(closed), torch.isneginf(loop))
    assert torch.isneginf(closed[:, 47:]).all()
    assert torch.isneginf(closed[torch.isneginf(large)]).all()
    finite = torch.isfinite(loop)
    torch.testing.assert_close(closed[finite], loop[finite], atol=2e-4, rtol=1e-4)


def test_small_model_wider_than_large():
    large = random_logits(2, 30, 4)
    s_with, s_without = random_logits(2, 40, 5), random_logits(2, 40, 6)
    out = steer(large, s_with, s_without)
    assert out.shape == (2, 30)
    torch.testing.assert_close(out, ftrl_reference(large, s_with, s_without), atol=2e-4, rtol=1e-4)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2), atol=1e-5)


def test_zero_delta_is_the_large_model():
    large = random_logits(3, 20, 7, mask_frac=0.3)
    small = random_logits(3, 20, 8)
    out = steer(large, small, small.clone())
    torch.testing.assert_close(out, torch.log_softmax(large, -1))


def test_nonfinite_delta_counts_as_zero_and_never_nan():
    large = random_logits(2, 10, 9)
    s_with = random_logits(2, 10, 10)
    s_without = random_logits(2, 10, 11)
    s_with[:, 3] = float("-inf")
    s_without[:, 3] = float("-inf")  # -inf - -inf = NaN in the raw delta
    out = steer(large, s_with, s_without)
    assert torch.isfinite(out).all()
    # token 3 moved only by the normaliser: its log-prob relative to ref shifts by a row constant
    shift = out - torch.log_softmax(large, -1)
    ref_delta = torch.log_softmax(s_with, -1) - torch.log_softmax(s_without, -1)
    assert not torch.isclose(shift[:, 3], shift[:, 0]).all() or torch.isclose(ref_delta[:, 0], torch.zeros(2)).all()
    fully_masked = torch.full((1, 10), float("-inf"))
    res = steer(fully_masked, s_with[:1], s_without[:1])
    assert not torch.isnan(res).any() and torch.isneginf(res).all()


def test_per_row_gain():
    large, s_with, s_without = random_logits(2, 12, 12), random_logits(2, 12, 13), random_logits(2, 12, 14)
    out = steer(large, s_with, s_without, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], torch.log_softmax(large[0], -1))
    delta = torch.log_softmax(s_with[1], -1) - torch.log_softmax(s_without[1], -1)
    torch.testing.assert_close(out[1], torch.log_softmax(torch.log_softmax(large[1], -1) + delta, -1))


def test_float32_output_from_bf16_inputs():
    large = random_logits(2, 16, 15).bfloat16()
    out = steer(large, random_logits(2, 16, 16).bfloat16(), random_logits(2, 16, 17).bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(T=0), r"T must be in \[1, "),
    (dict(T=2.5), "T must be an integer"),
    (dict(T=True), "T must be an integer, got bool"),
    (dict(lam=0.0), r"lam must be in \(0, "),
    (dict(eta=-1.0), r"eta must be in \(0, "),
    (dict(alpha=math.inf), "alpha must be finite"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(strength=float("inf")), "strength must be finite"),
    (dict(strength="1"), "strength must be a number, got str"),
    (dict(strength=True), "strength must be a number, got bool"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoSteerConfig(**kwargs)


def test_steer_rejects_bad_inputs():
    good = random_logits(2, 8, 18)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        steer(torch.full((2, 8), float("nan")), good, good)
    with pytest.raises(ValueError, match="batch mismatch"):
        steer(good[:1], good, good)
    with pytest.raises(ValueError, match="same shape"):
        steer(good, good, good[:, :5])
    with pytest.raises(ValueError, match="\\[batch, vocab\\]"):
        steer(good[0], good, good)
    with pytest.raises(TypeError, match="torch.Tensor"):
        steer(good.tolist(), good, good)
    with pytest.raises(ValueError, match="per-row gains"):
        steer(good, good, good, [1.0, 2.0, 3.0])


def test_eos_guard_and_confidence_streak():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert eos_probability(logits, [0]).tolist() == pytest.approx([math.exp(5) / (math.exp(5) + 2), 1 / 3])
    steered = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    guarded = force_eos(steered, logits, [0], 0.5)
    assert guarded[0].argmax() == 0 and torch.isneginf(guarded[0, 1:]).all()
    torch.testing.assert_close(guarded[1], steered[1])
    streak = update_confidence_streak(torch.tensor([2, 2]), logits, threshold=0.1)
    assert streak.tolist() == [3, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(64, 64), (70, 64), (64, 70)])
def test_one_pass_equals_the_careful_definition(dtype, widths):
    from costeer_processor.core import steer_careful

    vl, vs = widths
    large, zw, zo = (random_logits(5, v, s).to(dtype) for v, s in ((vl, 31), (vs, 32), (vs, 33)))
    large[1, 3] = float("-inf")  # a mask from another processor
    gains = torch.tensor([0.0, 1.0, 1.783, -2.0, 40.0])
    torch.testing.assert_close(steer(large, zw, zo, gains), steer_careful(large, zw, zo, gains), atol=2e-4, rtol=0)
    out = steer(large, zw, zo, 1.5)
    assert torch.isneginf(out[1, 3]) and not torch.isnan(out).any()


def test_one_pass_falls_back_on_non_finite_small_logits():
    from costeer_processor.core import steer_careful

    large, zw, zo = random_logits(3, 16, 41), random_logits(3, 16, 42), random_logits(3, 16, 43)
    zw[0, 2] = float("-inf")  # with-context branch masks a token: delta there counts as 0, not -inf
    zw[1, :] = float("-inf")
    zo[1, :] = float("-inf")  # a row with no small-model evidence at all
    large[2, :] = float("-inf")  # a fully masked row stays all -inf
    out = steer(large, zw, zo, 2.0)
    torch.testing.assert_close(out, steer_careful(large, zw, zo, 2.0))
    assert torch.isfinite(out[0, 2]) and torch.isneginf(out[2]).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out[1], torch.log_softmax(large[1], -1))


def test_gradients_flow_through_steer():
    large = random_logits(2, 16, 51).requires_grad_()
    out = steer(large, random_logits(2, 16, 52), random_logits(2, 16, 53), 1.5)
    out[:, 0].sum().backward()
    assert large.grad is not None and torch.isfinite(large.grad).all()


def test_eos_guard_takes_one_threshold_per_row():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    steered = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0]] * 3), -1)
    out = force_eos(steered, logits, [0], torch.tensor([0.5, float("inf"), 0.2]))
    assert out[0].argmax() == 0 and torch.isneginf(out[0, 1:]).all()  # p(EOS) 0.99 > 0.5: stopped
    torch.testing.assert_close(out[1], steered[1])  # inf: never stopped
    assert out[2].argmax() == 0  # 1/3 > 0.2: stopped
