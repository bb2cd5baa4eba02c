"""The admission check in vLLM's frontend: a steered request that cannot be served is refused with a 400.

vLLM calls a processor's ``validate_params(sampling_params)`` in the frontend process (the API
server, or the process of an offline ``LLM``), which never builds the processor: a ``ValueError``
there becomes an HTTP 400 (``VLLMValidationError`` offline). :func:`validate_sampling_params`
checks the ``costeer_*`` arguments (:func:`~costeer_processor.vllm.settings.parse_request_args`)
and whether the context fits the small model, counted exactly as the engine's
:class:`~costeer_processor.SmallModelRunner` will count it: :class:`BranchBuilder` is the runner's
tokenization without the model, fed through the same :class:`~costeer_processor.prompts.PromptBridge`.

The hook receives only the SamplingParams; the engine settings and the prompt ids are read from
the vLLM frame that calls it (:func:`caller_engine_context`; every read of vLLM internals lives in
:mod:`~costeer_processor.vllm.compat`, checked at start-up). The request's ``cache_salt`` is handed to
the engine for its small-model context cache; when it cannot be read, the request's cache entry is
its own (:data:`UNSHARED_SALT`), never shared across tenants. The check **fails closed**: with the
settings but no prompt ids it checks the context alone (the same rule, on what is known); when it
cannot run at all for a steered request, the request is refused rather than admitted unchecked.
A context that cannot fit whatever its tokens (a 20 MB paste) is refused before it is tokenised
(:meth:`~costeer_processor.prompts.ContextBudget.check_text`).

Example (a tiny model saved on the spot; inside vLLM the config and prompt ids come from its frame)::

    >>> import tempfile
    >>> from types import SimpleNamespace
    >>> from costeer_processor.testing import save_tiny_pair
    >>> large, small = save_tiny_pair(tempfile.mkdtemp())
    >>> cfg = SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(large)),
    ...                       additional_config={"costeer": {"small_model": str(small), "max_context_tokens": 64}})
    >>> check_request({"costeer_context": "I am vegan."}, cfg, prompt_ids=None)
    >>> check_request({"costeer_context": "word " * 100}, cfg, prompt_ids=None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: costeer_context: ... over the limit of 64; shorten the context
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Optional, Sequence

from ..kv_cache import ContextCache
from ..loading import CoSteerModelError, load_tokenizer
from ..prompts import ContextBudget, ContextSplicer, PromptBridge
from ..small_model import SmallModelRunner
from . import compat
from .compat import CallerContext
from .settings import (SALT_ARG, EngineSettings, check_argument_names, costeer_items, parse_request_args,
                       resolve_small_model, settings_from_vllm_config)

__all__ = ["BranchBuilder", "CallerContext", "FrontendChecker", "UNSHARED_SALT", "caller_engine_context",
           "carry_cache_salt", "check_request", "checker_for", "validate_sampling_params"]

_CANNOT = "CoSteer cannot check costeer_context here"
# The salt of a steered request whose cache_salt cannot be read (+ a random suffix): its small model's
# context cache is its own, so two tenants never share it when vLLM's layout hides the real salt.
UNSHARED_SALT = "costeer-unshared-"

compat.startup_check()  # once per process, when vLLM loads the processor class: loud warnings, never silent


class BranchBuilder:
    """The small-model runner's own tokenization (the same methods and budget), without the model."""

    encode_text = SmallModelRunner.encode_text
    check_context = SmallModelRunner.check_context
    branch_ids_from_text = SmallModelRunner.branch_ids_from_text
    max_context_tokens = SmallModelRunner.max_context_tokens
    context_cache = ContextCache(0)  # the frontend only counts tokens: no KV to reuse

    def __init__(self, tokenizer, settings: EngineSettings, small_config: Any):
        self.tokenizer = tokenizer
        self.splicer = ContextSplicer(tokenizer, settings.context_position, settings.context_separator)
        self.budget = ContextBudget.for_model(tokenizer, small_config, settings.max_context_tokens)


class FrontendChecker:
    """Context-length checks for one engine: the small tokenizer, and the large one to read prompts.

    ``large_tokenizer_path=None`` (the engine config was not visible): the context alone is checked.
    """

    def __init__(self, settings: EngineSettings, large_tokenizer_path: Optional[str], tok_kwargs: dict):
        from transformers import AutoConfig

        path = resolve_small_model(settings)
        small_tok = load_tokenizer(path)
        self.builder = BranchBuilder(small_tok, settings, AutoConfig.from_pretrained(str(path)))
        self.bridge = None
        if large_tokenizer_path:
            large_tok = load_tokenizer(large_tokenizer_path, **tok_kwargs)
            self.bridge = PromptBridge(large_tok, self.builder.splicer, settings.wants_vocab_map(large_tok, small_tok))
        self._lock = threading.Lock()  # the server validates from several threads; fast tokenizers are not re-entrant

    def check(self, context: str, prompt_ids: Optional[Sequence[int]]) -> None:
        """Raises ``ValueError("costeer_context: ...")`` when ``context`` (with the prompt, if known) cannot fit."""
        try:
            self.builder.check_context(context)  # no tokenising: a context that cannot fit whatever its tokens
            with self._lock:
                known = prompt_ids is not None and self.bridge is not None
                self.builder.branch_ids_from_text(self.bridge(prompt_ids) if known else "", context)
        except ValueError as e:
            raise ValueError(f"costeer_context: {e}") from None


_checkers: dict[tuple, FrontendChecker] = {}
_checkers_lock = threading.Lock()


def checker_for(settings: EngineSettings, vllm_config: Any) -> FrontendChecker:
    """The (cached) checker for these settings and this engine; ``ValueError`` when none can be built."""
    if not settings.small_model:
        reason = ("the engine settings name no small model" if vllm_config is not None else
                  "vLLM's engine config is not visible from validate_params and COSTEER_SMALL_MODEL is not set")
        raise ValueError(f"{_CANNOT}: {reason}")
    model_config = getattr(vllm_config, "model_config", None)
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
                try:
                    checker = _checkers[key] = FrontendChecker(settings, tok_path, tok_kwargs)
                except (ValueError, OSError, CoSteerModelError) as e:  # unusable model folder or tokenizer
                    raise ValueError(f"{_CANNOT}: {e}") from None
    return checker


def caller_engine_context() -> CallerContext:
    """(vllm_config, prompt token ids, cache_salt, found) of the vLLM frame validating this request;
    ``None`` for what is not visible.

    ``validate_params`` is a classmethod that receives only the SamplingParams; the rest is read
    from vLLM's ``InputProcessor.process_inputs`` frame by :func:`.compat.caller_context` (the one
    place that knows vLLM's layout, checked at start-up: :func:`.compat.startup_check`). When that
    layout changes, :func:`validate_sampling_params` checks what it still can, or refuses the request.
    """
    return compat.caller_context(depth=2)


def validate_sampling_params(sampling_params: Any) -> None:
    """The processors' ``validate_params``: free when the request carries no ``costeer_*`` key.

    Raises ``ValueError`` (a 400) for bad arguments, near misses of an argument's name
    (``"Costeer_context"``: :func:`~.settings.near_miss_keys`), a context that does not fit, or a
    steered request whose context cannot be checked here.
    """
    extra = getattr(sampling_params, "extra_args", None)
    if not extra:
        return
    check_argument_names(extra)  # a misspelt costeer key would otherwise run unsteered
    if costeer_items(extra):
        caller = caller_engine_context()
        check_request(extra, caller.vllm_config, caller.prompt_ids)
        if caller.found and compat.status()["cache_salt_readable"]:
            carry_cache_salt(extra, caller.cache_salt)
        else:  # the tenant is unknown: this request's context cache is its own (never shared)
            if not caller.found:
                compat.note_frame_missing()
            carry_cache_salt(extra, UNSHARED_SALT + uuid.uuid4().hex)


def carry_cache_salt(extra_args: dict, salt: Optional[str]) -> None:
    """Hands the request's ``cache_salt`` to the engine (its processors see only SamplingParams).

    Written under :data:`~costeer_processor.vllm.settings.SALT_ARG` on every steered request (and
    removed when it has none), so a client cannot set another value than its own ``cache_salt``.
    vLLM validates the params before it copies them for the request, so prompts sharing one
    SamplingParams object each carry their own salt.
    """
    if salt:
        extra_args[SALT_ARG] = salt
    else:
        extra_args.pop(SALT_ARG, None)


def check_request(extra_args: Any, vllm_config: Any, prompt_ids: Optional[Sequence[int]]) -> None:
    """:func:`validate_sampling_params` with the engine config and prompt ids given (``None``: not known)."""
    settings = (settings_from_vllm_config(vllm_config) if vllm_config is not None
                else EngineSettings.from_sources({}))
    args = parse_request_args(extra_args, settings)
    if args is not None:
        checker_for(settings, vllm_config).check(args.context, prompt_ids)
