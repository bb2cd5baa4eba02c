"""CoSteer's settings: the ONLY place that holds defaults and range checks.

Every adapter (Hugging Face processor, vLLM engine settings and request arguments, split mode,
CLI flags, evaluation harness) takes its defaults from :class:`CoSteerConfig` and
:class:`Variants` and checks values with the validators below, so a value accepted (or refused)
in one place is accepted (or refused) everywhere.

* :class:`CoSteerConfig`: the update's hyper-parameters (T, alpha, beta, lam, eta) or a direct
  ``strength`` (the closed-form gain).
* :class:`Variants`: AdaCoSteer gating (``gate_threshold``, ``gate_patience``) and the EOS guard.
* ``number`` / ``check_range`` / ``check_gain``: typed checks that refuse booleans, strings, NaN
  and infinities, naming the argument.

Example::

    >>> from costeer_processor.core import CoSteerConfig, Variants
    >>> round(CoSteerConfig().gain, 6)
    1.783257
    >>> Variants(gate_threshold=0.1).gate_patience
    3
    >>> Variants(gate_patience=True)
    Traceback (most recent call last):
    ...
    ValueError: gate_patience must be an integer, got bool True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

__all__ = [
    "CoSteerConfig",
    "Variants",
    "MAX_GAIN",
    "MAX_T",
    "number",
    "check_range",
    "check_gain",
    "gain_from_hyperparameters",
    "check_variants",
    "check_ngram",
    "SPLIT_NGRAM_GUARD",
]

PLAUSIBILITY_MODES = ("mask", "large")
OPTION_FIELDS = ("plausibility", "plausibility_mode", "delta_clip", "placebo", "ngram_guard")
MAX_NGRAM = 64
# The context n-gram guard's n where every generated token reaches a server (split mode, `costeer proxy`):
# chosen on the persona development set (docs/eval.md#the-context-n-gram-guard).
SPLIT_NGRAM_GUARD = 4
MAX_GAIN = 1000.0  # |g| above this turns rows into one-hot noise (and overflows in bf16)
MAX_T = 100_000


def number(name: str, value: Any, *, integer: bool = False, strict: bool = False) -> float | int:
    """A real, finite number (booleans and strings refused).

    ``integer`` also refuses 2.5; 2.0 is accepted (JSON and flags) unless ``strict`` (Python
    callers, where an ``int`` is expected).
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (integer and strict and not isinstance(value, int))):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def check_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """Raises ``ValueError`` naming ``name`` and the interval when ``value`` lies outside it."""
    bad = ((low is not None and (value < low or (low_open and value == low)))
           or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}{hint}")


def gain_from_hyperparameters(T: int, alpha: float, beta: float, lam: float, eta: float) -> float:
    """The closed-form gain ``g_T`` of the FTRL loop (pure Python, float64)."""
    g = 0.0
    G = 0.0
    for k in range(1, T + 1):
        G = G + alpha * g + beta
        g = (G + g / eta) / (k * lam + 1.0 / eta)
    return g


def check_gain(g: float, what: str) -> float:
    """Refuses gains that would break rows (non-finite or ``|g| > MAX_GAIN``)."""
    if not math.isfinite(g) or abs(g) > MAX_GAIN:
        raise ValueError(
            f"the CoSteer gain for {what} is {g!r}; |gain| must be at most {MAX_GAIN:g} "
            "(alpha > lam makes the gain grow with T: lower T or alpha, or pass a strength)")
    return g


@dataclass(frozen=True)
class CoSteerConfig:
    """Hyper-parameters of the CoSteer update (defaults: the official release and the paper).

    Args:
        T: number of FTRL inner steps per token (``1 <= T <= MAX_T``).
        alpha: weight of the ``p - ref`` term (``alpha > lam`` makes the gain grow with T).
        beta: weight of the local delta; the gain is linear in it.
        lam: regularisation towards the large model (``> 0``).
        eta: learning rate of the proximal term (``> 0``).
        strength: if set, the closed-form gain ``g`` itself, overriding the one derived from
            the five values above. ``strength=1.0`` is proxy-tuning-style arithmetic
            ``log_softmax(ref + delta)``; ``0.0`` switches steering off.

    Every value is checked here (booleans, strings, NaN and infinities are refused);
    :meth:`served_gain` adds the serving limit ``|g| <= MAX_GAIN``.

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
        set_ = object.__setattr__
        set_(self, "T", number("T", self.T, integer=True, strict=True))
        check_range("T", self.T, 1, MAX_T)
        for name in ("alpha", "beta", "lam", "eta"):
            set_(self, name, number(name, getattr(self, name)))
        check_range("lam", self.lam, 0.0, None, low_open=True)
        check_range("eta", self.eta, 0.0, None, low_open=True)
        if self.strength is not None:
            set_(self, "strength", number("strength", self.strength))

    def served_gain(self, where: str = "") -> float:
        """:attr:`gain`, refused when ``|g| > MAX_GAIN`` or non-finite (servers take requests from
        many users and refuse such gains with a 400; library calls accept any finite gain)."""
        what = (f"strength={self.strength!r}" if self.strength is not None else
                f"T={self.T}, alpha={self.alpha:g}, beta={self.beta:g}, lam={self.lam:g}, eta={self.eta:g}")
        try:
            return check_gain(self.gain, what)
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None

    @property
    def gain(self) -> float:
        """The scalar ``g`` of ``log_softmax(ref + g * delta)`` (``strength`` when set)."""
        if self.strength is not None:
            return float(self.strength)
        return gain_from_hyperparameters(self.T, self.alpha, self.beta, self.lam, self.eta)

    def replace(self, **changes) -> "CoSteerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _optional_fraction(name: str, value: Any, *, high_open: bool, allow_zero_off: bool) -> Optional[float]:
    if value is None:
        return None
    v = number(name, value)
    if allow_zero_off and v == 0:
        return None
    check_range(name, v, 0.0, 1.0, low_open=True, high_open=high_open,
                hint=" (0 switches it off)" if allow_zero_off else "")
    return v


@dataclass(frozen=True)
class Variants:
    """The release's two variants on top of the update, with their defaults.

    Args:
        gate_threshold: AdaCoSteer confidence gating, in ``(0, 1)``; ``None`` (default) = off.
            A row whose large model had ``1 - max p < gate_threshold`` for ``gate_patience``
            consecutive steps is left unsteered for the rest of its sequence.
        gate_patience: consecutive confident steps that switch a row off (integer ``>= 1``).
        eos_guard: in ``(0, 1]``; a row stops as soon as the large model's end-of-sequence
            probability exceeds it (``None`` = off).

        plausibility: in ``(0, 1]``; steer only among the tokens the large model itself finds
            plausible, ``p_L >= plausibility * max p_L`` (contrastive decoding's constraint; keeps a
            persona's topic out of unrelated answers). ``None`` (default) = off.
        plausibility_mode: ``"mask"`` (implausible tokens are impossible) or ``"large"`` (they keep
            the large model's own probability); see :mod:`costeer_processor.core.style`.
        delta_clip: ``> 0``; the delta is clamped to ``[-delta_clip, delta_clip]`` before the
            update, so no single token can be pushed by more than ``g * delta_clip`` nats.
        placebo: the without-context branch reads a neutral context of the same form and length
            instead of none, so the delta no longer carries "a context is present".
        ngram_guard: ``n >= 1``: a token that would complete a run of ``n`` consecutive tokens of
            the private context absent from the public prompt is not chosen
            (:class:`~costeer_processor.core.ngram.NgramGuard`); ``0`` = off; ``None`` (default) = the
            mode's default: :data:`SPLIT_NGRAM_GUARD` in split mode and ``costeer proxy`` (where every
            generated token goes to the server), off in the in-process HF and vLLM processors.

    :meth:`parse` is the lenient form for settings that come as JSON or flags, where ``0`` also
    means "off".
    """

    gate_threshold: Optional[float] = None
    gate_patience: int = 3
    eos_guard: Optional[float] = None
    plausibility: Optional[float] = None
    plausibility_mode: str = "mask"
    delta_clip: Optional[float] = None
    placebo: bool = False
    ngram_guard: Optional[int] = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "gate_threshold", _optional_fraction("gate_threshold", self.gate_threshold,
                                                        high_open=True, allow_zero_off=False))
        set_(self, "gate_patience", number("gate_patience", self.gate_patience, integer=True, strict=True))
        check_range("gate_patience", self.gate_patience, 1)
        set_(self, "eos_guard", _optional_fraction("eos_guard", self.eos_guard, high_open=False,
                                                   allow_zero_off=False))
        set_(self, "plausibility", _optional_fraction("plausibility", self.plausibility, high_open=False,
                                                      allow_zero_off=False))
        if self.plausibility_mode not in PLAUSIBILITY_MODES:
            raise ValueError(f"plausibility_mode must be one of {PLAUSIBILITY_MODES}, got {self.plausibility_mode!r}")
        if self.delta_clip is not None:
            set_(self, "delta_clip", number("delta_clip", self.delta_clip))
            check_range("delta_clip", self.delta_clip, 0.0, None, low_open=True)
        if not isinstance(self.placebo, bool):
            raise ValueError(f"placebo must be True or False, got {type(self.placebo).__name__} {self.placebo!r}")
        if self.ngram_guard is not None:
            set_(self, "ngram_guard", check_ngram("ngram_guard", self.ngram_guard))

    @property
    def steers_style(self) -> bool:
        """Whether any option beyond the plain update is on (plausibility, clipping, placebo, guard)."""
        return (self.plausibility is not None or self.delta_clip is not None or self.placebo
                or bool(self.ngram_guard))

    def with_ngram_default(self, n: int) -> "Variants":
        """``ngram_guard`` resolved: ``n`` (a mode's default) when it is ``None``, else unchanged."""
        return self if self.ngram_guard is not None else replace(self, ngram_guard=check_ngram("ngram_guard", n))

    def replace(self, **changes) -> "Variants":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def parse(cls, gate_threshold: Any = None, gate_patience: Any = None, eos_guard: Any = None, *,
              prefix: str = "", defaults: Optional["Variants"] = None, **options: Any) -> "Variants":
        """Like the constructor, but ``0`` switches gating / the guard off, ``None`` keeps ``defaults``,
        and error messages name ``prefix + field`` (e.g. ``costeer_gate_threshold``).

        ``options``: the other fields (``plausibility``, ``delta_clip``, ``placebo``, ``ngram_guard``,
        ``plausibility_mode``), by the same rules (``0`` = off; ``placebo`` also takes ``0``/``1``).
        """
        base = defaults or cls()
        unknown = set(options) - set(OPTION_FIELDS)
        if unknown:
            raise TypeError(f"unknown variant options {sorted(unknown)}; known: {list(OPTION_FIELDS)}")
        changes = {}
        for name, value in options.items():
            if value is None:
                continue
            if name == "placebo" and not isinstance(value, bool) and value in (0, 1):
                value = bool(value)
            elif name in ("plausibility", "delta_clip") and not isinstance(value, bool) and value == 0:
                value = None
            elif name == "ngram_guard":
                value = number(prefix + name, value, integer=True)
            changes[name] = value
        try:  # messages start with the field's name: prefixed, they name the argument the caller sent
            base = replace(base, **changes)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
        gate = (base.gate_threshold if gate_threshold is None else
                _optional_fraction(prefix + "gate_threshold", gate_threshold, high_open=True, allow_zero_off=True))
        guard = (base.eos_guard if eos_guard is None else
                 _optional_fraction(prefix + "eos_guard", eos_guard, high_open=False, allow_zero_off=True))
        patience = base.gate_patience
        if gate_patience is not None:
            patience = number(prefix + "gate_patience", gate_patience, integer=True)
            check_range(prefix + "gate_patience", patience, 1)
        return replace(base, gate_threshold=gate, gate_patience=int(patience), eos_guard=guard)


def check_ngram(name: str, n: Any) -> int:
    """A context n-gram guard's ``n``: an integer in ``[0, MAX_NGRAM]`` (0 = off)."""
    n = number(name, n, integer=True, strict=True)
    check_range(name, n, 0, MAX_NGRAM, hint=" (0 switches it off)")
    return int(n)


def check_variants(gate_threshold: Optional[float], gate_patience: int, eos_guard: Optional[float]) -> Variants:
    """Validates the AdaCoSteer gate and the EOS guard; returns them as :class:`Variants`."""
    return Variants(gate_threshold, gate_patience, eos_guard)
