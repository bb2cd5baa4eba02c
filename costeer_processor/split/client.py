"""The split-mode facade: :class:`SplitCoSteerClient`, and :func:`load_runner` / :func:`generate_split`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from ..core import CoSteerConfig, Variants
from ..core.config import check_range, number
from ..loading import eos_token_ids, load_model, load_tokenizer
from ..prompts import PromptLike
from ..small_model import SmallModelRunner, check_rows
from ..vocab import VocabularyMap
from .certify import Certifier
from .decode import Decoder, Sampling, SplitResult
from .protocol import PROBE_TEXT, Server, Vocab
from .transport import RetryPolicy, logger

__all__ = ["SplitCoSteerClient", "load_runner", "generate_split"]


class SplitCoSteerClient:
    """CoSteer with the large model behind an unmodified vLLM OpenAI server and the context on this device.

    Args:
        base_url: the server, e.g. ``http://10.0.0.5:8000`` (a trailing ``/v1`` is accepted).
        runner: the local :class:`~costeer_processor.SmallModelRunner` (small model + its tokenizer,
            which must be the served model's tokenizer unless ``large_tokenizer`` is given; checked
            on every new connection). Several clients may share one runner.
        model: the served model name; ``None`` takes the server's first (only) model.
        config: :class:`~costeer_processor.CoSteerConfig` (official defaults).
        top_logprobs: ``None`` asks for the full vocabulary of log-probs each step (exact CoSteer;
            the server needs ``--max-logprobs -1``); an integer ``k`` asks for the top ``k`` only
            and steers over those candidates, which is much less traffic on a 150k vocabulary.
        lookahead: most tokens the server proposes per round trip (``>= 1``; see
            :mod:`~costeer_processor.split.decode`).
        adaptive_lookahead: start at 2 proposals, double while all are accepted, fall back to just
            past the last accepted one otherwise. ``False`` always asks for ``lookahead``.
        variants: :class:`~costeer_processor.core.Variants`: AdaCoSteer gating, the EOS guard, the
            style options and the context n-gram guard (off by default). A gated request is
            finished by the server in one streaming request.
        eos_token_id: id(s) that end a generation (default:
            :func:`~costeer_processor.loading.eos_token_ids` of the served tokenizer).
        timeout: seconds per HTTP request before it counts as failed (and is retried).
        max_retries, backoff, backoff_max: the :class:`~.transport.RetryPolicy` for connection
            errors, timeouts and HTTP 5xx/429.
        verify_tokenizer: compare the server's ``/tokenize`` of :data:`~.protocol.PROBE_TEXT` with
            the local tokenizer on every new connection (the served model's name is always checked).
        api_key: sent as ``Authorization: Bearer``; ``headers``: any other headers.
        cache_salt: passed to vLLM so this client's prompts share prefix-cache entries only with
            requests using the same salt (hides cache-timing side channels from other tenants).
        overlap: run the small model while the server answers (``False`` only for benchmarks).
        certify, certify_levels: with ``top_logprobs=k`` and greedy decoding, prove each choice is
            the full-vocabulary one, asking for more candidates by rank where the proof fails
            (:mod:`~costeer_processor.split.certify`); ``certify=False`` steers over the top ``k`` only.
        large_tokenizer: the served model's tokenizer (object or folder) when it differs from the
            small model's: steering then runs on the intersection of the two vocabularies
            (:class:`~costeer_processor.VocabularyMap`) and prompts go to the server in the large
            model's chat template. Tokenizers are public: nothing about the context is involved.

    Example (skipped: it needs a running ``vllm serve``; ``tests/test_split.py`` runs it against a fake one)::

        >>> client = SplitCoSteerClient("http://127.0.0.1:8000", runner)  # doctest: +SKIP
        >>> client.generate("Suggest a dinner.", "I am vegan and love spicy food.", max_new_tokens=64).text  # doctest: +SKIP
        >>> for piece in client.stream("Plan my weekend.", "I love hiking."):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
    """

    last_result: Optional[SplitResult] = None

    def __init__(self, base_url: str, runner: SmallModelRunner, model: Optional[str] = None,
                 config: CoSteerConfig = CoSteerConfig(), *, top_logprobs: Optional[int] = None, lookahead: int = 4,
                 variants: Variants = Variants(), eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 timeout: float = 60.0, max_retries: int = RetryPolicy.max_retries,
                 backoff: float = RetryPolicy.backoff, backoff_max: float = RetryPolicy.backoff_max,
                 verify_tokenizer: bool = True, api_key: Optional[str] = None, headers: Optional[dict] = None,
                 cache_salt: Optional[str] = None, overlap: bool = True, certify: bool = True,
                 certify_levels: Sequence[int] = (1000, -1), adaptive_lookahead: bool = True,
                 large_tokenizer: Any = None):
        if not isinstance(runner, SmallModelRunner):
            raise TypeError(f"runner must be a SmallModelRunner, got {type(runner).__name__}")
        if not isinstance(config, CoSteerConfig):
            raise TypeError(f"config must be a CoSteerConfig, got {type(config).__name__}")
        if top_logprobs is not None:
            top_logprobs = number("top_logprobs", top_logprobs, integer=True)
            check_range("top_logprobs", top_logprobs, 1, hint=" (None asks for the full vocabulary)")
        lookahead = number("lookahead", lookahead, integer=True)
        check_range("lookahead", lookahead, 1)
        levels = tuple(number("certify_levels", x, integer=True) for x in certify_levels)
        if any(x < 1 and x != -1 for x in levels):
            raise ValueError(f"certify_levels must be integers >= 1 or -1 (full vocabulary), got {certify_levels}")
        if not isinstance(variants, Variants):
            raise TypeError(f"variants must be a Variants, got {type(variants).__name__}")
        retry = RetryPolicy(max_retries, backoff, backoff_max)
        self.runner, self.config = runner, config

        served, generation_config, vocab_map = runner.tokenizer, getattr(runner.model, "generation_config", None), None
        if large_tokenizer is not None:
            folder = large_tokenizer if isinstance(large_tokenizer, (str, os.PathLike)) else None
            if folder is not None:
                large_tokenizer = load_tokenizer(folder)
            elif not hasattr(large_tokenizer, "get_vocab"):
                raise TypeError(f"large_tokenizer must be a transformers tokenizer or a folder, got "
                                f"{type(large_tokenizer).__name__}")
            vocab_map = VocabularyMap.if_needed(large_tokenizer, runner.tokenizer)
            if vocab_map is not None:  # the small model's generation config speaks other ids
                served, generation_config = large_tokenizer, folder
                logger.info("split mode: different tokenizers (large %d tokens, small %d): steering on the %d "
                            "tokens they share", len(large_tokenizer), len(runner.tokenizer), vocab_map.size)
        self.tokenizer, self.vocab_map = served, vocab_map  # the served model's tokenizer: ids on the wire
        if eos_token_id is None:
            eos_token_id = eos_token_ids(served, generation_config)
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
        n_tokens = len(served)  # ids at or above this are not tokens of the served tokenizer
        width = max(int(runner.vocab_size) if vocab_map is None else vocab_map.large_vocab_size, n_tokens)
        vocab = Vocab(n_tokens, width)
        hdrs = dict(headers or {})
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        certifier = Certifier(config.gain, vocab, top_logprobs, levels, vocab_map) if (
            top_logprobs is not None and certify) else None
        self._server = Server(base_url, model=model, vocab=vocab, top_logprobs=top_logprobs,
                              stop_token_ids=self.eos_token_ids, retry=retry, timeout=timeout, headers=hdrs,
                              probe=None, mapped=vocab_map is not None, cache_salt=cache_salt)
        self._decoder = Decoder(runner, self._server, gain=config.gain, variants=variants,
                                eos_token_ids=self.eos_token_ids, served_tokenizer=served, vocab_map=vocab_map,
                                certifier=certifier, lookahead=lookahead, adaptive_lookahead=bool(adaptive_lookahead),
                                overlap=bool(overlap))
        if verify_tokenizer:
            probe = self._decoder.large_splicer.render(PROBE_TEXT)
            self._server.probe = (probe, served(probe, add_special_tokens=False)["input_ids"])
        self.base_url, self.variants, self.retry = self._server.base_url, variants, retry

    # ------------------------------------------------------------------ server state
    @property
    def model(self) -> Optional[str]:
        """The served model's name (known after the first connection when not given)."""
        return self._server.model

    @property
    def max_model_len(self) -> Optional[int]:
        return self._server.max_model_len

    @property
    def requests_made(self) -> int:
        """Completion requests sent by this client (all generations), for benchmarks."""
        return self._server.requests_made

    def connect(self) -> None:
        """Connects and checks the server: it serves the model, and ``/tokenize`` agrees with the tokenizer."""
        self._server.connect()

    def close(self) -> None:
        self._server.close()
        self._decoder.close()

    def __enter__(self) -> "SplitCoSteerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: PromptLike, context: str, max_new_tokens: int = 256, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None) -> SplitResult:
        """One steered generation (greedy by default; ``temperature``/``top_p`` sample the steered distribution)."""
        return self.generate_batch([prompt], [context], max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed)[0]

    def generate_batch(self, prompts: Sequence[PromptLike], contexts: Sequence[str], max_new_tokens: int = 256, *,
                       temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> list[SplitResult]:
        """Several generations at once: one batched completion request and one small-model forward per step."""
        seqs, sampling = self._start(prompts, contexts, max_new_tokens, temperature, top_p, seed)
        try:
            for _ in self._decoder.run(seqs, sampling, stream_handoff=False):
                pass
        finally:
            self._decoder.release(seqs)
        return [self._decoder.result(s) for s in seqs]

    def stream(self, prompt: PromptLike, context: str, max_new_tokens: int = 256, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: Optional[int] = None) -> Iterator[str]:
        """Yields the generated text piece by piece as tokens are accepted (incomplete UTF-8 is held back).

        After the iterator is exhausted, :attr:`last_result` holds the :class:`SplitResult`. No lock
        is held while the caller has a piece: an abandoned iterator blocks no other call.
        """
        seqs, sampling = self._start([prompt], [context], max_new_tokens, temperature, top_p, seed)
        seq, shown = seqs[0], ""
        try:
            for _ in self._decoder.run(seqs, sampling, stream_handoff=True):
                text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown):]
                shown = text
        finally:
            self._decoder.release(seqs)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
        self.last_result = self._decoder.result(seq)

    def _start(self, prompts, contexts, max_new_tokens, temperature, top_p, seed):
        check_rows(prompts, contexts)
        max_new_tokens = number("max_new_tokens", max_new_tokens, integer=True)
        check_range("max_new_tokens", max_new_tokens, 1)
        sampling = Sampling.make(temperature, top_p, seed)
        return self._decoder.start(prompts, contexts, max_new_tokens), sampling


# ---------------------------------------------------------------------------------- conveniences
def load_runner(small_model: Union[str, Path], *, dtype: str = "float32", context_position: str = "before",
                context_separator: str = "\n\n", **runner_kw) -> SmallModelRunner:
    """A :class:`SmallModelRunner` over a small-model folder (or a preset name of :mod:`costeer_processor.models`).

    The small model reads exactly the conversation the server reads, with the context spliced in
    (:mod:`costeer_processor.prompts`); no system prompt is added.
    """
    from ..models import resolve_model

    path = resolve_model(str(small_model), dtype=dtype)
    return SmallModelRunner(load_model(path, dtype), load_tokenizer(path), context_position=context_position,
                            context_separator=context_separator, **runner_kw)


def generate_split(base_url: str, large_model_name: Optional[str], small_model_dir: Union[str, Path, SmallModelRunner],
                   prompt: PromptLike, context: str, *, max_new_tokens: int = 256, dtype: str = "float32",
                   context_position: str = "before", config: CoSteerConfig = CoSteerConfig(),
                   temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None, stream: bool = False,
                   **client_kw) -> Union[SplitResult, Iterator[str]]:
    """One split-mode generation in one call (for the CLI's ``costeer generate --server URL``).

    Args:
        base_url: the vLLM server (``http://host:port``).
        large_model_name: the served model name (``None``: the server's only model).
        small_model_dir: the small model's folder or preset name (or a ready :class:`SmallModelRunner`).
        prompt, context: the public prompt and the private context (the context stays here).
        stream: return an iterator of text pieces instead of a :class:`SplitResult`.
        **client_kw: :class:`SplitCoSteerClient` options (``top_logprobs``, ``lookahead``,
            ``gate_threshold``, ``timeout``, ``max_retries``, ``api_key``...).
    """
    runner = small_model_dir if isinstance(small_model_dir, SmallModelRunner) else load_runner(
        small_model_dir, dtype=dtype, context_position=context_position)
    client = SplitCoSteerClient(base_url, runner, large_model_name, config, **client_kw)
    if stream:
        def pieces() -> Iterator[str]:
            try:
                yield from client.stream(prompt, context, max_new_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed)
            finally:
                client.close()
        return pieces()
    try:
        return client.generate(prompt, context, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    finally:
        client.close()
