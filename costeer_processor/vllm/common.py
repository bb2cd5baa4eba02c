"""What the vLLM adapters (V1 and Model Runner V2) share: settings, validation, the small model, the per-step work.

The two adapters in :mod:`costeer_processor.vllm.v1` and :mod:`costeer_processor.vllm.v2` only
translate vLLM's batch bookkeeping (row indices, request slots) into calls on
:class:`SteeringEngine`, which owns the :class:`~costeer_processor.SmallModelRunner` and applies
:func:`~costeer_processor.core.steer` to the steered rows of a logits tensor.

Engine-wide settings come from ``additional_config["costeer"]`` with ``COSTEER_<KEY>`` environment
variables as fallback (:class:`EngineSettings`); per-request arguments come flat from
``SamplingParams.extra_args`` (``vllm_xargs`` on the OpenAI server) and are checked by
:func:`validate_sampling_params` (a ``ValueError`` there becomes an HTTP 400).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import itertools
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from ..core import CoSteerConfig, force_eos, gain_from_hyperparameters, steer, top_probability
from ..small_model import ContextSplicer, SmallModelRunner
from ..vocab import ChatTemplateInverter, VocabularyMap

try:  # vLLM's logger tree, so messages show up formatted like the engine's own
    from vllm.logger import init_logger

    logger = init_logger("vllm.costeer")
except Exception:  # pragma: no cover - vLLM missing
    import logging

    logger = logging.getLogger("costeer_processor.vllm")

__all__ = [
    "ARG_PREFIX",
    "REQUEST_ARGS",
    "ENGINE_KEYS",
    "EngineSettings",
    "RequestArgs",
    "parse_request_args",
    "validate_sampling_params",
    "resolve_small_model",
    "SteeringEngine",
    "Handle",
    "MAX_GAIN",
]

ARG_PREFIX = "costeer_"
CONFIG_KEY = "costeer"
ENV_PREFIX = "COSTEER_"
MAX_GAIN = 1000.0  # |g| above this turns rows into one-hot noise (and overflows in bf16)
MAX_T = 100_000

# Per-request arguments (flat, in SamplingParams.extra_args / vllm_xargs) -> kind.
REQUEST_ARGS: dict[str, str] = {
    "costeer_context": "str",
    "costeer_strength": "float",
    "costeer_T": "int",
    "costeer_alpha": "float",
    "costeer_beta": "float",
    "costeer_lam": "float",
    "costeer_eta": "float",
    "costeer_gate_threshold": "float",
    "costeer_gate_patience": "int",
    "costeer_eos_guard": "float",
}


# ---------------------------------------------------------------------------------------------
# Value checks (shared by engine-wide settings and per-request arguments)
# ---------------------------------------------------------------------------------------------
def _number(name: str, value: Any, *, integer: bool = False) -> float | int:
    """A real number (bools and strings refused); ``integer`` also refuses 2.5 (2.0 is fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        return int(value)
    return float(value)


def _check_range(name: str, value: float, low: Optional[float], high: Optional[float],
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    bad = ((low is not None and (value < low or (low_open and value == low)))
           or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}{hint}")


def _check_gate_threshold(name: str, v: Optional[float], allow_off: bool) -> Optional[float]:
    if v is None:
        return None
    v = _number(name, v)
    if allow_off and v == 0:
        return None
    _check_range(name, v, 0.0, 1.0, low_open=True, high_open=True,
                 hint=" (0 switches gating off)" if allow_off else "")
    return v


def _check_eos_guard(name: str, v: Optional[float], allow_off: bool) -> Optional[float]:
    if v is None:
        return None
    v = _number(name, v)
    if allow_off and v == 0:
        return None
    _check_range(name, v, 0.0, 1.0, low_open=True, hint=" (0 switches the guard off)" if allow_off else "")
    return v


def _check_patience(name: str, v: Any) -> int:
    v = _number(name, v, integer=True)
    _check_range(name, v, 1, None)
    return int(v)


def _gain(T: int, alpha: float, beta: float, lam: float, eta: float, strength: Optional[float],
          where: str) -> float:
    """The closed-form gain, refusing values that would break rows (non-finite or huge)."""
    if strength is not None:
        g = float(strength)
        what = f"strength={strength!r}"
    else:
        try:
            CoSteerConfig(T=T, alpha=alpha, beta=beta, lam=lam, eta=eta)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        g = gain_from_hyperparameters(T, alpha, beta, lam, eta)
        what = f"T={T}, alpha={alpha:g}, beta={beta:g}, lam={lam:g}, eta={eta:g}"
    if not math.isfinite(g) or abs(g) > MAX_GAIN:
        raise ValueError(
            f"{where}: the CoSteer gain for {what} is {g!r}; |gain| must be at most {MAX_GAIN:g} "
            "(alpha > lam makes the gain grow with T: lower T or alpha, or pass a strength)")
    return g


# ---------------------------------------------------------------------------------------------
# Engine-wide settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    """Engine-wide CoSteer settings (``additional_config["costeer"]``, fallback ``COSTEER_<KEY>`` env vars).

    Attributes:
        small_model: local folder of the small model (or a preset name understood by
            ``costeer_processor.models.resolve_model`` when that module is installed).
        dtype: small-model dtype (``float32``, ``bfloat16``, ``float16``); default float32 when the
            large model runs float32, else bfloat16.
        device: small-model device; default: the engine's device.
        threads: torch threads for the small model's forward inside the engine process
            (vLLM's CPU backend binds its own OpenMP threads; the multiprocess engine runs torch
            with 1 thread unless told otherwise). Default: leave as is.
        T, alpha, beta, lam, eta, strength: default CoSteer hyper-parameters (see
            :class:`~costeer_processor.CoSteerConfig`).
        max_context_tokens: longest small-model prompt *with* the context (tokens); default the
            small model's window (``max_position_embeddings``).
        context_position: ``"before"`` or ``"after"`` the user's text in the last user turn.
        context_separator: text between context and user text.
        gate_threshold, gate_patience: AdaCoSteer gating defaults (off unless threshold set).
        eos_guard: default EOS guard threshold (off unless set).
        vocab_map: ``"auto"`` (default): when the small model's tokenizer differs from the large
            model's, steer on the intersection of the two vocabularies (the release's "map"
            variant; the size is logged at startup) and give the small model the conversation in
            its own chat template; ``"off"``: refuse different tokenizers at startup; ``"on"``:
            always take the mapped path (for tests: it must equal the plain one on one tokenizer).
    """

    small_model: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    threads: Optional[int] = None
    T: int = 20
    alpha: float = 2.0
    beta: float = 1.0
    lam: float = 2.0
    eta: float = 10.0
    strength: Optional[float] = None
    max_context_tokens: Optional[int] = None
    context_position: str = "before"
    context_separator: str = "\n\n"
    gate_threshold: Optional[float] = None
    gate_patience: int = 3
    eos_guard: Optional[float] = None
    vocab_map: str = "auto"

    def __post_init__(self) -> None:
        where = "CoSteer engine settings"
        set_ = functools.partial(object.__setattr__, self)
        if self.small_model is not None and (not isinstance(self.small_model, (str, os.PathLike))
                                             or not str(self.small_model).strip()):
            raise ValueError(f"{where}: small_model must be a non-empty path or name, got {self.small_model!r}")
        if self.small_model is not None:
            set_("small_model", str(self.small_model))
        if self.dtype is not None and str(self.dtype).replace("torch.", "") not in _DTYPES:
            raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.threads is not None:
            set_("threads", _number("threads", self.threads, integer=True))
            _check_range("threads", self.threads, 1, None)
        set_("T", _number("T", self.T, integer=True))
        for name in ("alpha", "beta", "lam", "eta"):
            set_(name, _number(name, getattr(self, name)))
        if self.strength is not None:
            set_("strength", _number("strength", self.strength))
        _gain(self.T, self.alpha, self.beta, self.lam, self.eta, self.strength, where)
        if self.max_context_tokens is not None:
            set_("max_context_tokens", _number("max_context_tokens", self.max_context_tokens, integer=True))
            _check_range("max_context_tokens", self.max_context_tokens, 1, None)
        if self.context_position not in ("before", "after"):
            raise ValueError(f"{where}: context_position must be 'before' or 'after', got {self.context_position!r}")
        if not isinstance(self.context_separator, str):
            raise ValueError(f"{where}: context_separator must be a string, got {self.context_separator!r}")
        set_("gate_threshold", _check_gate_threshold("gate_threshold", self.gate_threshold, allow_off=True))
        set_("gate_patience", _check_patience("gate_patience", self.gate_patience))
        set_("eos_guard", _check_eos_guard("eos_guard", self.eos_guard, allow_off=True))
        mode = self.vocab_map
        if isinstance(mode, bool):  # JSON true / false
            mode = "on" if mode else "off"
        elif isinstance(mode, str):
            mode = mode.strip().lower()
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"{where}: vocab_map must be 'auto', 'on' or 'off', got {self.vocab_map!r}")
        set_("vocab_map", mode)

    @property
    def default_gain(self) -> float:
        return _gain(self.T, self.alpha, self.beta, self.lam, self.eta, self.strength, "CoSteer engine settings")

    @classmethod
    def from_sources(cls, additional_config: Optional[Mapping[str, Any]] = None,
                     environ: Optional[Mapping[str, str]] = None) -> "EngineSettings":
        """``additional_config["costeer"]`` first, then ``COSTEER_<KEY>`` variables, then defaults."""
        environ = os.environ if environ is None else environ
        block: Mapping[str, Any] = {}
        if additional_config:
            block = additional_config.get(CONFIG_KEY) or {}
            if not isinstance(block, Mapping):
                raise ValueError(f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {block!r}')
        unknown = [k for k in block if k not in ENGINE_KEYS]
        if unknown:
            raise ValueError(f'unknown key(s) in additional_config["{CONFIG_KEY}"]: '
                             + ", ".join(_with_suggestion(k, ENGINE_KEYS) for k in unknown)
                             + f"; known keys: {', '.join(ENGINE_KEYS)}")
        values: dict[str, Any] = {}
        for key in ENGINE_KEYS:
            if key in block and block[key] is not None:
                values[key] = block[key]
                continue
            raw = environ.get(ENV_PREFIX + key.upper())
            if raw is not None and raw.strip() != "":
                values[key] = _from_env(key, raw)
        return cls(**values)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float": torch.float32, "half": torch.float16}
ENGINE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(EngineSettings))
_ENV_KINDS = {"threads": int, "T": int, "alpha": float, "beta": float, "lam": float, "eta": float,
              "strength": float, "max_context_tokens": int, "gate_threshold": float, "gate_patience": int,
              "eos_guard": float}


def _from_env(key: str, raw: str) -> Any:
    kind = _ENV_KINDS.get(key)
    if kind is None:
        return raw
    try:
        return kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX}{key.upper()}={raw!r} is not a valid "
                         f"{kind.__name__}") from None


def _with_suggestion(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower()]
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def settings_from_vllm_config(vllm_config: Any) -> EngineSettings:
    return EngineSettings.from_sources(getattr(vllm_config, "additional_config", None) or {})


# ---------------------------------------------------------------------------------------------
# Per-request arguments
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestArgs:
    """One request's resolved CoSteer arguments (engine defaults filled in)."""

    context: str
    gain: float
    gate_threshold: Optional[float]
    gate_patience: int
    eos_guard: Optional[float]


def costeer_items(extra_args: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    if not extra_args:
        return {}
    return {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(ARG_PREFIX)}


def parse_request_args(extra_args: Optional[Mapping[str, Any]],
                       defaults: EngineSettings = EngineSettings()) -> Optional[RequestArgs]:
    """Checks and resolves a request's ``costeer_*`` arguments; ``None`` when it is not steered.

    Raises ``ValueError`` naming the argument for unknown ``costeer_*`` keys, wrong types,
    non-finite or out-of-range values, a missing or empty ``costeer_context`` next to other
    ``costeer_*`` keys. (The context's token length is checked by :class:`BranchBuilder`.)
    """
    items = costeer_items(extra_args)
    if not items:
        return None
    unknown = [k for k in items if k not in REQUEST_ARGS]
    if unknown:
        raise ValueError("unknown CoSteer argument(s) " + ", ".join(_with_suggestion(k, REQUEST_ARGS)
                                                                 for k in unknown)
                         + f"; known: {', '.join(REQUEST_ARGS)}")
    if "costeer_context" not in items or items["costeer_context"] is None:
        raise ValueError("costeer_context is required when other costeer_* arguments are given "
                         f"(got {', '.join(sorted(items))})")
    context = items["costeer_context"]
    if not isinstance(context, str):
        raise ValueError(f"costeer_context must be a string, got {type(context).__name__}")
    if not context.strip():
        raise ValueError("costeer_context is empty; pass a non-empty personal context (or leave "
                         "costeer_context out to generate without steering)")

    def get(name: str, integer: bool = False):
        v = items.get(name)
        return None if v is None else _number(name, v, integer=integer)

    T = get("costeer_T", integer=True)
    if T is not None:
        _check_range("costeer_T", T, 1, MAX_T)
    alpha, beta, lam, eta = (get(f"costeer_{n}") for n in ("alpha", "beta", "lam", "eta"))
    if lam is not None:
        _check_range("costeer_lam", lam, 0.0, None, low_open=True)
    if eta is not None:
        _check_range("costeer_eta", eta, 0.0, None, low_open=True)
    strength = get("costeer_strength")
    if strength is not None:
        _check_range("costeer_strength", strength, -MAX_GAIN, MAX_GAIN)
        gain = float(strength)
    elif any(v is not None for v in (T, alpha, beta, lam, eta)):
        # Explicit hyper-parameters win over an engine-wide default strength.
        gain = _gain(T if T is not None else defaults.T, alpha if alpha is not None else defaults.alpha,
                     beta if beta is not None else defaults.beta, lam if lam is not None else defaults.lam,
                     eta if eta is not None else defaults.eta, None, "costeer_T/alpha/beta/lam/eta")
    else:
        gain = defaults.default_gain

    gate = defaults.gate_threshold
    if "costeer_gate_threshold" in items:
        gate = _check_gate_threshold("costeer_gate_threshold", items["costeer_gate_threshold"], allow_off=True)
    patience = defaults.gate_patience
    if "costeer_gate_patience" in items:
        patience = _check_patience("costeer_gate_patience", items["costeer_gate_patience"])
    guard = defaults.eos_guard
    if "costeer_eos_guard" in items:
        guard = _check_eos_guard("costeer_eos_guard", items["costeer_eos_guard"], allow_off=True)
    return RequestArgs(context=context, gain=gain, gate_threshold=gate, gate_patience=patience, eos_guard=guard)


# ---------------------------------------------------------------------------------------------
# Small model: where it is, loading, tokenizer checks, the runner's tokenization without a model
# ---------------------------------------------------------------------------------------------
def resolve_small_model(name_or_path: str, dtype: Optional[str] = None) -> Path:
    """A local folder for ``name_or_path``: through ``costeer_processor.models.resolve_model`` if present."""
    try:
        from .. import models  # noqa: F401  (written separately; optional)
    except ImportError as e:
        if getattr(e, "name", None) not in ("costeer_processor.models", None):
            raise
        models = None
    resolver = getattr(models, "resolve_model", None) if models is not None else None
    if resolver is not None:
        try:
            path = Path(resolver(name_or_path, **({"dtype": dtype} if dtype else {})))
        except Exception as e:
            raise ValueError(f"CoSteer: cannot resolve the small model {name_or_path!r}: {e}") from e
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"CoSteer: the small model {name_or_path!r} is not a model folder ({path} has no config.json). "
            'Set additional_config={"costeer": {"small_model": "/path/to/small"}} or COSTEER_SMALL_MODEL '
            "to a transformers model folder sharing the large model's tokenizer")
    return path


def _require_small_model(settings: EngineSettings) -> str:
    if not settings.small_model:
        raise ValueError(
            "CoSteer needs a small model: pass additional_config={\"costeer\": {\"small_model\": \"/path\"}} "
            "(server: --additional-config '{\"costeer\": {\"small_model\": \"/path\"}}') or set COSTEER_SMALL_MODEL")
    return settings.small_model


def torch_dtype(name: Optional[str], large_dtype: Any) -> torch.dtype:
    if name:
        return _DTYPES[str(name).replace("torch.", "")]
    return torch.float32 if large_dtype in (torch.float32, "float32") else torch.bfloat16


def load_tokenizer(path: os.PathLike | str, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def wants_vocab_map(settings: EngineSettings, large_tok, small_tok) -> bool:
    """Whether steering takes the mapped path: ``on``, or ``auto`` with two different vocabularies."""
    return settings.vocab_map == "on" or (settings.vocab_map == "auto"
                                          and large_tok.get_vocab() != small_tok.get_vocab())


def vocabulary_map_for(settings: EngineSettings, large_tok, small_tok, large_name: str,
                       small_name: str) -> Optional[VocabularyMap]:
    """The id map the settings ask for (``None``: one shared tokenizer, the plain path)."""
    if wants_vocab_map(settings, large_tok, small_tok):
        return VocabularyMap.for_pair(large_tok, small_tok)
    check_same_tokenizer(large_tok, small_tok, large_name, small_name)  # refuses two vocabularies under "off"
    return None


def check_same_tokenizer(large_tok, small_tok, large_name: str, small_name: str) -> None:
    """Refuses a small model whose vocabulary differs from the large model's (id by id)."""
    large_vocab, small_vocab = large_tok.get_vocab(), small_tok.get_vocab()
    if large_vocab == small_vocab:
        return
    only_large = sorted(set(large_vocab) - set(small_vocab))[:3]
    only_small = sorted(set(small_vocab) - set(large_vocab))[:3]
    moved = [t for t in large_vocab if t in small_vocab and large_vocab[t] != small_vocab[t]][:3]
    raise ValueError(
        f"CoSteer: the small model's tokenizer ({small_name}, {len(small_vocab)} tokens) does not match the "
        f"large model's ({large_name}, {len(large_vocab)} tokens) and vocab_map is 'off'; set it to 'auto' to "
        f"steer on the intersection of the vocabularies. Examples: only in large {only_large}, only in small "
        f"{only_small}, different ids {moved}")


def max_context_tokens_for(settings: EngineSettings, small_config: Any) -> int:
    if settings.max_context_tokens:
        return int(settings.max_context_tokens)
    return int(getattr(small_config, "max_position_embeddings", None) or (1 << 30))


class BranchBuilder:
    """The small-model runner's own tokenization (same methods), without loading the model.

    The frontend (API server) process uses it to reject over-long contexts with the exact token
    count the engine's :class:`~costeer_processor.SmallModelRunner` would compute.
    """

    encode_text = SmallModelRunner.encode_text
    branch_ids_from_text = SmallModelRunner.branch_ids_from_text

    def __init__(self, tokenizer, settings: EngineSettings, max_context_tokens: int):
        self.tokenizer = tokenizer
        self.splicer = ContextSplicer(tokenizer, settings.context_position, settings.context_separator)
        self.max_context_tokens = max_context_tokens


def prompt_text(tokenizer, prompt_ids: Sequence[int]) -> str:
    """The large model's prompt ids back to text (special tokens kept)."""
    return tokenizer.decode(list(prompt_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class PromptBridge:
    """The large model's prompt ids -> the text the small model reads.

    One tokenizer: the decoded text as it is. Different families: the conversation is recovered
    from the large model's chat template (:class:`~costeer_processor.vocab.ChatTemplateInverter`)
    and rendered with the small model's own template; a prompt that no template produced (raw
    completion text) goes over as text.
    """

    def __init__(self, large_tokenizer, small_splicer: ContextSplicer, translate: bool):
        self.large_tokenizer = large_tokenizer
        self.small_splicer = small_splicer
        self.inverter = ChatTemplateInverter(large_tokenizer) if translate else None

    def __call__(self, prompt_ids: Sequence[int]) -> str:
        text = prompt_text(self.large_tokenizer, prompt_ids)
        if self.inverter is None or not self.inverter.usable:
            return text
        messages = self.inverter.parse(text)
        small_tok = self.small_splicer.tokenizer
        if messages is None or getattr(small_tok, "chat_template", None) is None:
            return text
        # exactly the recovered messages (no default system prompt added: the large model had none)
        return small_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# validate_params (runs in the frontend process, which never instantiates the processor)
# ---------------------------------------------------------------------------------------------
class _FrontendChecker:
    """Context-length checks in the frontend: the small tokenizer + the large one for prompts."""

    def __init__(self, settings: EngineSettings, large_tokenizer_path: Optional[str], tok_kwargs: dict):
        from transformers import AutoConfig

        path = resolve_small_model(_require_small_model(settings), settings.dtype)
        small_tok = load_tokenizer(path)
        self.builder = BranchBuilder(small_tok, settings,
                                     max_context_tokens_for(settings, AutoConfig.from_pretrained(str(path))))
        self.large_tok = load_tokenizer(large_tokenizer_path, **tok_kwargs) if large_tokenizer_path else small_tok
        self.bridge = PromptBridge(self.large_tok, self.builder.splicer,
                                   wants_vocab_map(settings, self.large_tok, small_tok))
        self._lock = threading.Lock()  # the server may validate from several threads; fast tokenizers are not re-entrant

    def check(self, context: str, prompt_ids: Optional[Sequence[int]]) -> None:
        with self._lock:
            text = self.bridge(prompt_ids) if prompt_ids is not None else ""
            try:
                self.builder.branch_ids_from_text(text, context)
            except ValueError as e:
                raise ValueError(f"costeer_context: {e}") from None


_checkers: dict[tuple, _FrontendChecker] = {}
_checkers_lock = threading.Lock()


def _caller_engine_context() -> tuple[Any, Optional[list[int]]]:
    """(vllm_config, prompt token ids) of the vLLM frame validating this request, if visible.

    ``validate_params`` is a classmethod that receives only the SamplingParams; vLLM 0.32 calls it
    from ``InputProcessor._validate_params`` inside ``InputProcessor.process_inputs(request_id,
    prompt, params, ...)``, where ``self.vllm_config`` holds ``additional_config`` and ``prompt``
    the already tokenized prompt. Nothing breaks when that layout changes: the check falls back
    to ``COSTEER_*`` variables and to the context alone.
    """
    cfg, prompt_ids = None, None
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(30):
            if frame is None:
                break
            local = frame.f_locals
            owner = local.get("self")
            if cfg is None and owner is not None:
                candidate = getattr(owner, "vllm_config", None)
                if candidate is not None and hasattr(candidate, "model_config"):
                    cfg = candidate
            if prompt_ids is None and frame.f_code.co_name == "process_inputs":
                prompt = local.get("prompt")
                ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
                if isinstance(ids, list) and all(isinstance(t, int) for t in ids[:4]):
                    prompt_ids = ids
            if cfg is not None and prompt_ids is not None:
                break
            frame = frame.f_back
    finally:
        del frame
    if cfg is None:
        try:
            from vllm.config import get_current_vllm_config_or_none

            cfg = get_current_vllm_config_or_none()
        except Exception:
            cfg = None
    return cfg, prompt_ids


def validate_sampling_params(sampling_params: Any) -> None:
    """The processors' ``validate_params``: cheap when the request carries no ``costeer_*`` key."""
    extra = getattr(sampling_params, "extra_args", None)
    if not costeer_items(extra):
        return
    cfg, prompt_ids = _caller_engine_context()
    settings = settings_from_vllm_config(cfg) if cfg is not None else EngineSettings.from_sources({})
    args = parse_request_args(extra, settings)
    if args is None or not settings.small_model:
        return
    model_config = getattr(cfg, "model_config", None)
    tok_path = getattr(model_config, "tokenizer", None) or getattr(model_config, "model", None)
    tok_kwargs = {}
    if model_config is not None:
        tok_kwargs = {"trust_remote_code": bool(getattr(model_config, "trust_remote_code", False))}
        if getattr(model_config, "tokenizer_revision", None):
            tok_kwargs["revision"] = model_config.tokenizer_revision
    key = (settings, tok_path, tuple(sorted(tok_kwargs.items())))
    checker = _checkers.get(key)
    if checker is None:
        with _checkers_lock:
            checker = _checkers.get(key)
            if checker is None:
                checker = _checkers[key] = _FrontendChecker(settings, tok_path, tok_kwargs)
    checker.check(args.context, prompt_ids)


# ---------------------------------------------------------------------------------------------
# The per-step work, shared by both adapters
# ---------------------------------------------------------------------------------------------
_keys = itertools.count()


@dataclass(eq=False)
class Handle:
    """One steered request as the processor sees it (the adapters map rows / slots to handles)."""

    params: Any  # the request's SamplingParams (identity survives preemption in one process)
    args: RequestArgs
    key: int = field(default_factory=lambda: next(_keys))
    branches: Optional[tuple[list[int], list[int]]] = None
    active: bool = True
    streak: int = 0
    in_runner: bool = False

    @property
    def needs_prompt(self) -> bool:
        return self.active and self.branches is None

    @property
    def fresh(self) -> bool:
        return self.active and self.streak == 0


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Runs the block with ``n`` torch threads (vLLM's CPU worker stubs out torch.set_num_threads)."""
    if not n or torch.get_num_threads() == n:
        yield
        return
    setter = getattr(torch._C, "_set_num_threads", torch.set_num_threads)
    old = torch.get_num_threads()
    setter(n)
    try:
        yield
    finally:
        setter(old)


class SteeringEngine:
    """The small model, the large tokenizer and the steering step; one per vLLM processor instance.

    Args:
        settings: engine-wide settings.
        large_tokenizer: the large model's tokenizer (decodes prompt ids).
        runner: a :class:`~costeer_processor.SmallModelRunner` over the small model.
        eos_token_ids: ids that end a sequence (for the EOS guard).
        vocab_map: the id map when the two tokenizers differ (``None``: one shared tokenizer).
    """

    PARK_LIMIT = 4096

    def __init__(self, settings: EngineSettings, large_tokenizer, runner: SmallModelRunner,
                 eos_token_ids: Sequence[int], vocab_map: Optional[VocabularyMap] = None):
        self.settings = settings
        self.large_tokenizer = large_tokenizer
        self.runner = runner
        self.vocab_map = vocab_map
        self.bridge = PromptBridge(large_tokenizer, runner.splicer, translate=vocab_map is not None)
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids if t is not None})
        self.threads = settings.threads
        # Gated / partly-gated requests that left the batch (preempted or unscheduled): their
        # AdaCoSteer state comes back when the same SamplingParams object comes back.
        self._parked: OrderedDict[int, Handle] = OrderedDict()
        self._warned: set[str] = set()
        self.steps = 0  # apply calls that ran the small model (tests / benchmarks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vllm_config(cls, vllm_config: Any, device: Any) -> "SteeringEngine":
        """Loads the small model named by the settings; clear errors when it is missing or mismatched."""
        from transformers import AutoModelForCausalLM

        settings = settings_from_vllm_config(vllm_config)
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("CoSteer cannot run with speculative decoding (every drafted position would need "
                             "its own small-model step); start the engine without a speculative config")
        small_name = _require_small_model(settings)
        mc = vllm_config.model_config
        path = resolve_small_model(small_name, settings.dtype)
        tok_kwargs = {"trust_remote_code": bool(getattr(mc, "trust_remote_code", False))}
        if getattr(mc, "tokenizer_revision", None):
            tok_kwargs["revision"] = mc.tokenizer_revision
        large_tok = load_tokenizer(mc.tokenizer, **tok_kwargs)
        small_tok = load_tokenizer(path)
        vmap = vocabulary_map_for(settings, large_tok, small_tok, str(mc.tokenizer), str(path))
        dtype = torch_dtype(settings.dtype, getattr(mc, "dtype", None))
        dev = torch.device(settings.device) if settings.device else torch.device(device)
        with torch_threads(settings.threads):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev).eval()
        small_vocab = int(model.get_output_embeddings().weight.shape[0])
        if small_vocab < len(small_tok):
            raise ValueError(f"CoSteer: the small model has {small_vocab} output rows for a tokenizer of "
                             f"{len(small_tok)} tokens")
        runner = SmallModelRunner(model, small_tok, context_position=settings.context_position,
                                  context_separator=settings.context_separator,
                                  max_context_tokens=max_context_tokens_for(settings, model.config))
        eos = [large_tok.eos_token_id]
        try:
            gen = mc.try_get_generation_config() or {}
            g_eos = gen.get("eos_token_id")
            eos += list(g_eos) if isinstance(g_eos, (list, tuple)) else [g_eos]
        except Exception:
            pass
        logger.info("CoSteer: small model %s (%s, %s, %d params), default gain %.6g, context %s, "
                    "max %d context tokens", path, dtype, dev, sum(p.numel() for p in model.parameters()),
                    settings.default_gain, settings.context_position, runner.max_context_tokens)
        if vmap is not None:
            inverter = ChatTemplateInverter(large_tok)
            logger.info("CoSteer: different tokenizers (large %d tokens, small %d): steering on the %d tokens "
                        "they share; the small model reads prompts in %s", len(large_tok), len(small_tok),
                        vmap.size, "its own chat template" if inverter.usable
                        else "the large model's template (it could not be inverted)")
        return cls(settings, large_tok, runner, eos, vmap)

    # ------------------------------------------------------------------ requests
    def open(self, params: Any, prompt_ids: Optional[Sequence[int]] = None) -> Optional[Handle]:
        """A handle for a request entering the batch, or ``None`` when it is not steered.

        Never raises: a request that fails here (it passed the frontend but not the engine) runs
        unsteered and the reason is logged.
        """
        extra = getattr(params, "extra_args", None)
        if not costeer_items(extra):
            return None
        parked = self._parked.pop(id(params), None)
        if parked is not None and parked.params is params:
            return parked
        try:
            args = parse_request_args(extra, self.settings)
        except ValueError as e:
            self._warn_once(f"bad-args:{e}", "CoSteer: request left unsteered: %s", e)
            return None
        if args is None:
            return None
        handle = Handle(params=params, args=args)
        if prompt_ids is not None:
            self.set_prompt(handle, prompt_ids)
        return handle

    def set_prompt(self, handle: Handle, prompt_ids: Sequence[int]) -> None:
        try:
            handle.branches = self.runner.branch_ids_from_text(self.bridge(prompt_ids), handle.args.context)
        except ValueError as e:
            logger.warning("CoSteer: request left unsteered: %s", e)
            handle.active = False

    def close(self, handle: Handle) -> None:
        """The request left the batch (finished, preempted or not scheduled): free its small-model rows."""
        self.suspend(handle)
        if not handle.fresh:  # only non-trivial AdaCoSteer state is worth remembering
            self._parked[id(handle.params)] = handle
            while len(self._parked) > self.PARK_LIMIT:
                self._parked.popitem(last=False)

    def suspend(self, handle: Handle) -> None:
        """Frees the small-model rows but keeps the handle (it re-prefills if it comes back)."""
        if handle.in_runner:
            self.runner.remove(handle.key)
            handle.in_runner = False

    def _switch_off(self, handle: Handle) -> None:
        handle.active = False
        self.suspend(handle)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: Sequence[int], handles: Sequence[Handle],
              outputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Steers ``logits[rows[i]]`` for ``handles[i]`` whose generated ids so far are ``outputs[i]``.

        One batched small-model forward for all rows. Rows whose large logits hold NaN/+inf, whose
        output list still holds -1 placeholders, or whose request was gated off are left as they are.
        """
        live = [(r, h, o) for r, h, o in zip(rows, handles, outputs) if h.active and h.branches is not None]
        if not live:
            return logits
        dev = logits.device
        index = torch.tensor([r for r, _, _ in live], device=dev, dtype=torch.long)
        large = logits.index_select(0, index)

        # AdaCoSteer: u = 1 - max p; `patience` confident steps in a row switch a request off for good
        # (checked before steering this step, as in the HF processor).
        gated = [j for j, (_, h, _) in enumerate(live) if h.args.gate_threshold is not None]
        if gated:
            sub = large[gated]
            thr = torch.tensor([live[j][1].args.gate_threshold for j in gated], dtype=torch.float32, device=dev)
            streak = torch.tensor([live[j][1].streak for j in gated], dtype=torch.long, device=dev)
            confident = (1.0 - top_probability(sub)) < thr
            new = torch.where(confident, streak + 1, torch.zeros_like(streak)).tolist()
            for j, s in zip(gated, new):
                h = live[j][1]
                h.streak = int(s)
                if h.streak >= h.args.gate_patience:
                    self._switch_off(h)

        bad_rows = (torch.isnan(large) | torch.isposinf(large)).any(dim=-1).tolist()
        keep, small_outputs = [], []
        for j, (r, h, out) in enumerate(live):
            if not h.active:
                continue
            if bad_rows[j]:
                self._warn_once("nonfinite", "CoSteer: large-model logits with NaN/+inf in a steered row; "
                                "that row is left unsteered for the step (logged once)")
                continue
            if out and min(out) < 0:
                self._warn_once("placeholder", "CoSteer: output ids still hold -1 placeholders (async "
                                "scheduling); the row is left unsteered for that step (logged once)")
                continue
            if self.vocab_map is not None:
                try:
                    out = self.vocab_map.to_small(out)
                except ValueError as e:  # an unsteered step chose a token the small model lacks
                    self._warn_once(f"unmapped:{h.key}", "CoSteer: request switched off: %s", e)
                    self._switch_off(h)
                    continue
            keep.append(j)
            small_outputs.append(out)
        if not keep:
            return logits
        chosen = [live[j] for j in keep]
        try:
            for _, h, _ in chosen:
                if not h.in_runner:
                    self.runner.add(h.key, *h.branches)
                    h.in_runner = True
            with torch_threads(self.threads):
                z_with, z_without = self.runner.step([(h.key, out) for (_, h, _), out in zip(chosen, small_outputs)])
        except Exception:
            logger.exception("CoSteer: the small model failed; the %d request(s) of this step continue "
                             "unsteered", len(chosen))
            for _, h, _ in chosen:
                self._switch_off(h)
            return logits
        self.steps += 1
        sub_index = torch.tensor(keep, device=dev, dtype=torch.long)
        large_kept = large.index_select(0, sub_index) if len(keep) != len(live) else large
        gains = torch.tensor([h.args.gain for _, h, _ in chosen], dtype=torch.float32, device=dev)
        steer_fn = self.vocab_map.steer if self.vocab_map is not None else steer
        steered = steer_fn(large_kept, z_with.to(dev), z_without.to(dev), gains)
        guards = {h.args.eos_guard for _, h, _ in chosen if h.args.eos_guard is not None}
        for thr in guards:
            sel = [i for i, (_, h, _) in enumerate(chosen) if h.args.eos_guard == thr]
            if len(sel) == len(chosen):
                steered = force_eos(steered, large_kept, self.eos_token_ids, thr)
            else:
                si = torch.tensor(sel, device=dev, dtype=torch.long)
                steered[si] = force_eos(steered[si], large_kept[si], self.eos_token_ids, thr)
        logits.index_copy_(0, index.index_select(0, sub_index), steered.to(logits.dtype))
        return logits
