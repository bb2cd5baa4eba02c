"""The small model that holds the personal contexts: two branches per request, one forward per step.

:class:`SmallModelRunner` keeps, for every live request, two sequences in ONE batched
KV cache: the small model's prompt *with* the personal context and the same prompt
*without* it. Each step it advances every row by the token the large model really
emitted and returns both branches' next-token logits. Requests join, leave and are
re-synchronised at any step (continuous batching), keyed by any hashable id.

Layout: every branch row lives in fixed-size blocks of a packed KV pool
(:class:`~costeer_processor.packed_kv.PackedRows`), so memory and attention work follow the sum
of row lengths, and joining or leaving copies nobody else's cache. A decode step is a single
``[2n, 1]`` forward (both rows of every advancing request) with explicit positions. New
requests are prefilled in separate forwards (with the model's own attention), in chunks of at
most ``max_prefill_tokens`` tokens, and written into free blocks.

Threads: one runner may be shared; every public method that reads or changes its state holds
``runner.lock`` (an ``RLock``), so concurrent callers are served one at a time and get what a
sequential run gives. The packed attention is selected once, at construction
(:func:`~costeer_processor.packed_kv.use_packed_attention`), and never switched per forward, so
the model's own forwards elsewhere are unaffected.

Failures: a ``step`` that raises leaves nothing half-done (see :meth:`SmallModelRunner.step`);
rows and blocks taken by a failed prefill are freed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .core.config import check_range, number
from .kv_cache import ContextCache
from .packed_kv import PackedRows, use_packed_attention
from .prompts import ContextBudget, ContextSplicer, ContextTooLongError, PromptLike  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

def check_rows(prompts: Sequence, contexts: Sequence[str]) -> None:
    """One context per prompt, as lists of at least one row (shared by the HF processor and split mode).

    An empty or over-long context is refused later, when the runner encodes it.
    """
    if isinstance(contexts, str) or isinstance(prompts, str):
        raise TypeError("prompts and contexts must be lists (one entry per batch row), not a single string")
    if len(prompts) != len(contexts):
        raise ValueError(f"got {len(prompts)} prompts but {len(contexts)} contexts; give one context per prompt")
    if not contexts:
        raise ValueError("no rows: give at least one prompt and one context")
    for i, c in enumerate(contexts):
        if not isinstance(c, str):
            raise TypeError(f"context {i} must be a string, got {type(c).__name__}")


class BranchIds(list):
    """The with-context token ids, plus ``shared``: how many leading ids are the reusable prefix
    (chat template start + context), the part the :class:`~costeer_processor.kv_cache.ContextCache`
    keeps. A plain list works everywhere (nothing is reused then)."""

    shared: int = 0


@dataclass
class _Request:
    ids_with: list[int]
    ids_without: list[int]
    shared: int = 0  # leading ids_with that form the reusable context prefix
    salt: Optional[Hashable] = None
    fed: list[int] = field(default_factory=list)  # generated ids already in the cache
    rows: Optional[tuple[int, int]] = None  # (with, without) row ids in the packed cache, once prefilled


class SmallModelRunner:
    """Runs both CoSteer branches of many requests through one small causal LM.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), put in eval mode.
        tokenizer: its tokenizer (with a chat template for chat prompts).
        context_position / context_separator: see :class:`~costeer_processor.prompts.ContextSplicer`.
        max_context_tokens: longest with-context prompt accepted (default: the model's window);
            the rule is :class:`~costeer_processor.prompts.ContextBudget`.
        context_cache_mb: memory cap of the reusable context-prefix cache
            (:class:`~costeer_processor.kv_cache.ContextCache`, ``context_position="before"`` only);
            ``0`` switches it off.
        max_prefill_tokens: the most prompt tokens (with-context plus without-context rows, before
            any context-cache saving) one prefill chunk runs; a single larger request runs alone.

    The runner selects its packed attention on ``model`` once
    (:func:`~costeer_processor.packed_kv.use_packed_attention`); the model's own forwards are unchanged.

    Example::

        >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
        >>> tok = build_tiny_tokenizer()
        >>> runner = SmallModelRunner(build_tiny_model(tok), tok)
        >>> with_ids, without_ids = runner.encode_branches("Suggest a dinner.", context="I am vegan.")
        >>> runner.add("req-0", with_ids, without_ids)
        >>> z_with, z_without = runner.step([("req-0", [])])  # logits after the prompt
        >>> z_next = runner.step([("req-0", [int(z_with[0].argmax())])])  # one decode step, both branches
        >>> runner.stats()["cached_rows"], z_with.shape == z_without.shape
        (1, True)
        >>> runner.remove("req-0")
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_position: str = "before",
        context_separator: str = "\n\n",
        max_context_tokens: Optional[int] = None,
        context_cache_mb: float = 256,
        max_prefill_tokens: int = 8192,
    ):
        context_cache_mb = number("context_cache_mb", context_cache_mb)
        check_range("context_cache_mb", context_cache_mb, 0)
        max_prefill_tokens = number("max_prefill_tokens", max_prefill_tokens, integer=True)
        check_range("max_prefill_tokens", max_prefill_tokens, 1)
        self.lock = threading.RLock()  # held by every public method that reads or changes the state
        self.max_prefill_tokens = max_prefill_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.splicer = ContextSplicer(tokenizer, context_position, context_separator)
        self.budget = ContextBudget.for_model(tokenizer, model.config, max_context_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._requests: dict[Hashable, _Request] = {}
        self._store = PackedRows(model.config, next(model.parameters()).dtype, self.device)
        use_packed_attention(model)  # once: nothing is switched per forward
        self._last: Optional[torch.Tensor] = None  # [row ids, V] logits after each row's last fed token
        self.forward_count = 0  # batched forwards run (for benchmarks and tests)
        self.prefill_tokens = 0  # tokens run through prefill forwards (a context-cache hit saves most)
        self.context_cache = ContextCache(int(context_cache_mb * 2**20))

    # ------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_context(self, context: str) -> None:
        """Refuses a context that is not a string, is empty, or certainly cannot fit (no tokenising)."""
        if not isinstance(context, str):
            raise TypeError(f"context must be a string, got {type(context).__name__}")
        if not context.strip():
            raise ValueError("context is empty; pass a non-empty personal context (or do not steer this request)")
        self.budget.check_text(context, what="the context")

    def branch_ids_from_text(self, prompt_text: str, context: str) -> tuple[list[int], list[int]]:
        """Token ids of both branches for an already-templated prompt text."""
        self.check_context(context)
        shared_text, rest = self.splicer.splice_parts(prompt_text, context)
        with_text = shared_text + rest
        self.budget.check_text(with_text)
        with_ids = BranchIds(self.encode_text(with_text))
        self.budget.check_tokens(len(with_ids))
        if shared_text and self.context_cache.enabled:
            with_ids.shared = common_prefix_length(with_ids, self.encode_text(shared_text))
        return with_ids, self.encode_text(prompt_text)

    def encode_branches(self, prompt: PromptLike, context: str) -> tuple[list[int], list[int]]:
        """Token ids of both branches for a user prompt (string or chat messages), rendered as is."""
        return self.branch_ids_from_text(self.splicer.render(prompt), context)

    @property
    def max_context_tokens(self) -> int:
        return self.budget.limit

    # ------------------------------------------------------------------ bookkeeping
    def add(self, key: Hashable, ids_with: Sequence[int], ids_without: Sequence[int], *,
            salt: Optional[Hashable] = None) -> None:
        """Registers a request; its prompt is prefilled at its first :meth:`step`.

        ``salt`` (e.g. vLLM's ``cache_salt``) is part of the context-cache key: requests with
        different salts never share cached context KV.
        """
        if not ids_with or not ids_without:
            raise ValueError("both branch prompts need at least one token")
        shared = min(getattr(ids_with, "shared", 0), len(ids_with) - 1)  # at least one token is run
        request = _Request(list(ids_with), list(ids_without), max(shared, 0), salt)
        with self.lock:
            if key in self._requests:
                self.remove(key)
            self._requests[key] = request

    def remove(self, key: Hashable) -> None:
        """Forgets a request and frees its cache rows (no-op for unknown keys)."""
        with self.lock:
            self._release([key])
            self._requests.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self._release(list(self._requests))
            self._requests.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self.lock:
            return key in self._requests

    def __len__(self) -> int:
        with self.lock:
            return len(self._requests)

    @property
    def cached_rows(self) -> int:
        """Requests whose branches currently sit in the KV cache."""
        with self.lock:
            return len(self._store) // 2

    @property
    def kv_tokens(self) -> int:
        """Tokens held in the packed KV cache (the sum of the cached rows' lengths)."""
        with self.lock:
            return self._store.tokens()

    def stats(self) -> dict:
        """Requests, cached rows, KV tokens and bytes, forwards, prefill tokens, context-cache figures.

        ``kv_bytes`` is what the pools hold (free blocks included); ``kv_bytes_needed`` is
        ``kv_tokens`` x bytes per token, the floor any layout needs.
        """
        with self.lock:
            store = self._store
            return {"requests": len(self._requests), "cached_rows": len(store) // 2, "kv_tokens": store.tokens(),
                    "kv_bytes": store.nbytes(), "kv_bytes_needed": store.tokens() * store.bytes_per_token(),
                    "forwards": self.forward_count, "prefill_tokens": self.prefill_tokens,
                    "context_cache": self.context_cache.stats()}

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits of both branches for each ``(key, generated_ids)``.

        ``generated_ids`` is the request's full output so far (the large model's real tokens);
        the runner feeds whatever it has not seen yet. A request whose history disagrees with
        what was fed (preemption, a new generate call) is re-prefilled from its prompt.

        Returns ``(with_context, without_context)``, each ``[len(batch), V_small]`` in the
        small model's dtype.

        The requests advancing by one token are decoded in one forward; the new (or re-synced)
        ones are then prefilled in separate forwards, chunk by chunk (``max_prefill_tokens``).
        If it raises, nothing is half-done: every request already decoded or prefilled in this
        call holds exactly what was fed to it (a retry returns its logits without recomputing),
        the failing chunk's requests and those after it hold no rows, and every other request is
        as it was. So a retry with a subset of the batch is safe, e.g. the new requests one at a time.
        """
        with self.lock:
            return self._step(batch)

    def _step(self, batch):
        if not batch:
            empty = torch.empty(0, self.vocab_size, device=self.device)
            return empty, empty
        decode: dict[Hashable, int] = {}
        fresh: dict[Hashable, None] = {}  # ordered, each key once
        generated: dict[Hashable, list[int]] = {}
        for key, ids in batch:
            req = self._requests.get(key)
            if req is None:
                raise KeyError(f"request {key!r} was never added to the small-model runner")
            ids = list(ids)
            if generated.setdefault(key, ids) != ids:
                raise ValueError(f"request {key!r} appears twice in the batch with different histories")
            n = len(req.fed)
            if req.rows is not None and len(ids) == n + 1 and ids[:n] == req.fed:
                decode[key] = ids[-1]
            elif req.rows is not None and ids == req.fed:
                continue  # nothing new: the last logits are still right
            else:
                fresh[key] = None
        self._release([k for k in fresh if self._requests[k].rows is not None])
        if decode:
            self._decode(decode)
        for chunk in self._chunks(list(fresh), generated):
            self._prefill(chunk, generated)
        rows = torch.tensor([self._requests[k].rows for k, _ in batch], device=self.device)
        return self._last[rows[:, 0]], self._last[rows[:, 1]]

    def _chunks(self, keys: list[Hashable], generated: dict[Hashable, list[int]]):
        """Consecutive groups of ``keys`` of at most ``max_prefill_tokens`` prompt tokens (a larger request alone)."""
        chunk: list[Hashable] = []
        size = 0
        for key in keys:
            req = self._requests[key]
            n = len(req.ids_with) + len(req.ids_without) + 2 * len(generated[key])
            if chunk and size + n > self.max_prefill_tokens:
                yield chunk
                chunk, size = [], 0
            chunk.append(key)
            size += n
        if chunk:
            yield chunk

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        self.forward_count += 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _decode(self, tokens: dict[Hashable, int]) -> None:
        """One ``[2n, 1]`` forward over the packed cache: both rows of every advanced request."""
        reqs = [self._requests[k] for k in tokens]
        rows = torch.tensor([r.rows for r in reqs], device=self.device).flatten()
        ids = torch.tensor(list(tokens.values()), device=self.device).repeat_interleave(2)
        self.forward_count += 1
        logits = self._store.decode(self.model, rows, ids)  # raises: every row as it was
        try:
            self._last[rows] = logits.to(self._last.dtype)
        except BaseException:  # the cache holds the token but its logits are lost: re-prefill next time
            self._release(tokens)
            raise
        for req, tok in zip(reqs, tokens.values()):
            req.fed.append(tok)

    def _prefill(self, keys: list[Hashable], generated: dict[Hashable, list[int]]) -> None:
        """Prefills new requests (two left-padded forwards: with-context rows, then the shorter
        without-context rows, each padded only to its own longest) and packs them into blocks.

        With-context rows whose context prefix is in the
        :class:`~costeer_processor.kv_cache.ContextCache` start from its KV and run only the rest.
        All or nothing: if anything raises, the requests hold no rows and nothing they took is kept.
        """
        reqs = [self._requests[key] for key in keys]
        fed = [list(generated[key]) for key in keys]
        parts = [self._prefill_with_context(reqs, fed),
                 self._prefill_rows([r.ids_without + f for r, f in zip(reqs, fed)])]
        added: list[list[int]] = []  # a failed forward above leaves no rows
        try:
            for cache, mask, _ in parts:
                added.append(self._store.add(cache, mask))  # a failed add frees what it took
            rows = torch.tensor(added, device=self.device)  # [2, n]
            self._grow_last(int(rows.max()) + 1, parts[0][2].dtype)
            for branch, (_, _, logits) in enumerate(parts):
                self._last[rows[branch]] = logits.to(self._last.dtype)
        except BaseException:  # nor does a failed write: free every row written here, then re-raise
            self._drop_rows([r for branch in added for r in branch])
            raise
        for req, ids, pair in zip(reqs, fed, rows.T.tolist()):
            req.fed, req.rows = ids, tuple(pair)

    def _grow_last(self, rows: int, dtype: torch.dtype) -> None:
        """Room in the last-logits table for row ids below ``rows`` (amortised growth)."""
        if self._last is None or self._last.shape[0] < rows:
            grown = torch.empty((rows + max(8, rows // 4), self.vocab_size), dtype=dtype, device=self.device)
            if self._last is not None:
                grown[:self._last.shape[0]] = self._last
            self._last = grown

    def _prefill_with_context(self, reqs: list[_Request], fed: list[list[int]]):
        """The with-context rows: reused context KV where the cache has it, one forward for the rest."""
        cc = self.context_cache
        cache_keys = [cc.key(r.ids_with[:r.shared], r.salt) if cc.enabled and r.shared else None for r in reqs]
        hits = [cc.get(k) if k is not None else None for k in cache_keys]
        skip = [r.shared if hit is not None else 0 for r, hit in zip(reqs, hits)]
        past = _stack_prefixes(hits, skip) if any(skip) else None
        cache, mask, logits = self._prefill_rows([r.ids_with[n:] + f for r, f, n in zip(reqs, fed, skip)], past, skip)
        width = mask.shape[1]
        for r, (req, f, key, n) in enumerate(zip(reqs, fed, cache_keys, skip)):
            if key is None or n:
                continue  # nothing to keep, or it came from the cache
            start = width - (len(req.ids_with) + len(f))
            cc.put(key, [(layer.keys[r:r + 1, :, start:start + req.shared].clone(),
                          layer.values[r:r + 1, :, start:start + req.shared].clone()) for layer in cache.layers])
        return cache, mask, logits

    def _prefill_rows(self, seqs: list[list[int]], past=None, offsets: Optional[list[int]] = None):
        """One left-padded forward over ``seqs``; ``past`` = (cache, mask) of already-computed prefixes
        of ``offsets[i]`` tokens each (right-aligned, masked holes before and after them)."""
        width = max(len(s) for s in seqs)
        dev = self.device
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, device=dev)
            mask[r, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # full-attention layers: every column is kept for the packed cache
        if past is not None:
            cache, past_mask = past
            positions = positions + torch.tensor(offsets, device=dev)[:, None]
            mask = torch.cat([past_mask, mask], dim=1)
        logits = self._forward(ids, mask, positions, cache)
        self.prefill_tokens += int(mask[:, -width:].sum())
        return cache, mask, logits

    # ------------------------------------------------------------------ speculation
    # Several tokens per row in one forward, and rollback of rejected positions
    # (:mod:`costeer_processor.speculative`).
    @torch.inference_mode()
    def extend(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds each request the ``k`` generated ids it has not seen (the same ``k`` for every request,
        each already prefilled) in ONE ``[2n, k]`` forward; returns ``(with_context, without_context)``,
        each ``[len(batch), k, V_small]``: the logits after each fed id.

        ``generated_ids`` is the request's full output so far, as for :meth:`step`. If it raises,
        every request is as it was. Example::

            >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
            >>> tok = build_tiny_tokenizer()
            >>> runner = SmallModelRunner(build_tiny_model(tok), tok)
            >>> runner.add("r", *runner.encode_branches("Suggest a dinner.", "I am vegan."))
            >>> _ = runner.step([("r", [])])
            >>> z_with, z_without = runner.extend([("r", [40, 41, 42])])  # three tokens, one forward
            >>> one_by_one = runner.truncate("r", 0) or [runner.step([("r", [40, 41, 42][:i + 1])])[0][0]
            ...                                            for i in range(3)]
            >>> z_with.shape[:2], bool(torch.allclose(z_with[0], torch.stack(one_by_one), atol=1e-4))
            (torch.Size([1, 3]), True)
            >>> runner.remove("r")
        """
        with self.lock:
            if not batch:
                empty = torch.empty(0, 0, self.vocab_size, device=self.device)
                return empty, empty
            reqs, new = [], []
            for key, ids in batch:
                req = self._requests.get(key)
                if req is None or req.rows is None:
                    raise KeyError(f"request {key!r} is not prefilled in the small-model runner (step it first)")
                ids = list(ids)
                if ids[:len(req.fed)] != req.fed or len(ids) == len(req.fed):
                    raise ValueError(f"request {key!r}: extend needs the ids fed so far plus at least one new id")
                if any(r is req for r in reqs):
                    raise ValueError(f"request {key!r} appears twice in the batch")
                reqs.append(req)
                new.append(ids[len(req.fed):])
            k = len(new[0])
            if any(len(n) != k for n in new):
                raise ValueError("extend feeds the same number of new ids to every request in one call")
            rows = torch.tensor([r.rows for r in reqs], device=self.device).flatten()
            ids = torch.tensor(new, device=self.device).repeat_interleave(2, dim=0)
            self.forward_count += 1
            logits = self._store.extend(self.model, rows, ids)  # raises: every row as it was
            try:
                self._last[rows] = logits[:, -1].to(self._last.dtype)
            except BaseException:
                self._release([key for key, _ in batch])
                raise
            for req, n in zip(reqs, new):
                req.fed = req.fed + n
            return logits[0::2], logits[1::2]

    def truncate(self, key: Hashable, n_generated: int,
                 logits: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Rolls both branches of ``key`` back to having fed its first ``n_generated`` generated ids.

        Blocks wholly past the new end are freed, the rest is exactly what a request that was never
        fed more holds (no re-prefill). ``logits``: the ``(with, without)`` next-token logits after the
        last kept id (speculation has them); without them the last kept token is fed again (one
        ``[2, 1]`` forward) so that :meth:`step` returns correct logits. A request that is not in the
        cache only forgets the ids (it prefills at its next step); unknown keys raise ``KeyError``.
        """
        self.truncate_many([(key, n_generated, logits)])

    @torch.inference_mode()
    def truncate_many(self, items: Sequence[tuple[Hashable, int, Optional[tuple[torch.Tensor, torch.Tensor]]]]
                      ) -> None:
        """:meth:`truncate` for several ``(key, n_generated, logits)`` at once (one cache update, and at most
        one forward for those given without logits). Everything is checked before anything changes."""
        with self.lock:
            reqs = []
            for key, n, logits in items:
                req = self._requests[key]
                if not 0 <= n <= len(req.fed):
                    raise ValueError(f"cannot truncate request {key!r} to {n} ids: it was fed {len(req.fed)}")
                reqs.append(req)
            given, again, drop = [], [], []
            for (key, n, logits), req in zip(items, reqs):
                if (n == len(req.fed) and logits is None) or req.rows is None:
                    req.fed = req.fed[:n]
                elif logits is not None:
                    given.append((req, n, logits))
                elif min(len(req.ids_with), len(req.ids_without)) + n < 2:  # nothing to feed again from
                    drop.append(key)
                    req.fed = req.fed[:n]
                else:
                    again.append((req, n))
            self._release(drop)  # these prefill at their next step
            if given:
                rows = torch.tensor([r.rows for r, _, _ in given], device=self.device).flatten()
                self._store.truncate(rows, torch.tensor([m for r, n, _ in given for m in _branch_lengths(r, n)]))
                self._last[rows] = torch.stack([z for _, _, logits in given for z in logits]).to(self._last.dtype)
                for req, n, _ in given:
                    req.fed = req.fed[:n]
            if again:
                rows = torch.tensor([r.rows for r, _ in again], device=self.device).flatten()
                self._store.truncate(rows, torch.tensor([m - 1 for r, n in again for m in _branch_lengths(r, n)]))
                last = [t for r, n in again for t in ((r.ids_with + r.fed[:n])[-1], (r.ids_without + r.fed[:n])[-1])]
                for req, n in again:
                    req.fed = req.fed[:n]
                self.forward_count += 1
                try:
                    z = self._store.decode(self.model, rows, torch.tensor(last, device=self.device))
                    self._last[rows] = z.to(self._last.dtype)
                except BaseException:  # the rows are one token short of their ids: prefill next time
                    self._release([k for (k, _, _), r in zip(items, reqs) if any(r is a for a, _ in again)])
                    raise

    def _release(self, keys: Iterable[Hashable]) -> None:
        rows = []
        for key in keys:
            req = self._requests.get(key)
            if req is not None and req.rows is not None:
                rows += req.rows
                req.rows = None
        self._drop_rows(rows)

    def _drop_rows(self, rows: list[int]) -> None:
        self._store.drop(rows)
        if not len(self._store):
            self._last = None  # idle: no logits table either


def _branch_lengths(req: _Request, n_generated: int) -> tuple[int, int]:
    """Tokens of the request's (with, without) rows once ``n_generated`` generated ids are fed."""
    return len(req.ids_with) + n_generated, len(req.ids_without) + n_generated


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _stack_prefixes(hits, lengths: list[int]):
    """Cached prefix KV of some rows as one right-aligned, left-padded past cache and its mask."""
    rows, width = len(hits), max(lengths)
    first = next(h for h in hits if h is not None)
    cache = DynamicCache()
    dev = first[0][0].device
    mask = torch.zeros((rows, width), dtype=torch.long, device=dev)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    for i, (k0, v0) in enumerate(first):
        keys = k0.new_zeros((rows, k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((rows, v0.shape[1], width, v0.shape[3]))
        for r, (hit, n) in enumerate(zip(hits, lengths)):
            if hit is not None:
                keys[r, :, width - n:] = hit[i][0][0]
                values[r, :, width - n:] = hit[i][1][0]
        cache.update(keys, values, i)
    return cache, mask
