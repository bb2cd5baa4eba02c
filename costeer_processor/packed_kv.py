"""The small model's decode-time KV cache: every branch row packed into fixed-size blocks.

CoSteer's small model keeps two rows per request (with and without the personal context) whose
lengths differ by the context (a LongLaMP profile: ~2,000 tokens against ~50). A batch that
shares one padded sequence axis holds and attends over ``rows x longest row``; here each row owns
blocks of :data:`BLOCK` tokens in one pool per layer (``[blocks, kv_heads, BLOCK, head_dim]``),
so memory and attention work follow the SUM of row lengths, and a request joins (its prefill
written into free blocks) or leaves (its blocks freed) without copying anyone else's cache.

A decode step is one ``[rows, 1]`` forward of the model whose cache hands each layer a
:class:`PackedKV` instead of key/value tensors. :func:`use_packed_attention` selects, ONCE per
model, an attention implementation registered with transformers' ``AttentionInterface`` that
dispatches on its inputs: :func:`packed_attention` when the key is a :class:`PackedKV`, the
model's original implementation (``sdpa``, ``eager``, ...) otherwise, with the original's mask
function registered under the same name. Nothing is switched per forward, so the model's own
forwards (prefill, or any other caller, in any thread) are computed exactly as before.

:func:`packed_attention` scores each pool block against its owner row's query in ONE batched
matmul over the blocks (nothing is gathered from the cache), and the softmax is combined across
each row's blocks as in flash-decoding (per-row max, then sums, with ``index_add``). The order of
a row's blocks does not matter: positions live in the keys (RoPE) and in
:attr:`PackedRows.block_start` (for sliding-window layers). Scores are formed in the pool's dtype
and normalised in float32, like transformers' eager attention. Unfilled columns get weight 0;
since ``0 x inf = NaN``, a block's VALUES are zeroed when the block is taken (its keys need no
clearing: their scores are overwritten with ``-inf``), so nothing a previous owner left can reach
a new one.

Prefill is not done here: new rows are prefilled with the model's own attention into an ordinary
``DynamicCache`` and then written into blocks with :meth:`PackedRows.add`, which either writes
every row or (when it raises) holds nothing more than before.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Callable, Optional

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["BLOCK", "ATTENTION", "PackedRows", "PackedKV", "packed_attention", "use_packed_attention",
           "check_supported"]

BLOCK = 32  # tokens per block: wasted columns per row average BLOCK / 2
ATTENTION = "costeer_packed"
_SUPPORTED_LAYERS = {"full_attention", "sliding_attention"}


def check_supported(config: PretrainedConfig) -> None:
    """Refuses models whose attention the packed cache cannot run (clear error, at load time)."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= _SUPPORTED_LAYERS:
        raise ValueError(f"the small model ({config.model_type}) has {sorted(kinds - _SUPPORTED_LAYERS)} layers; "
                         "CoSteer's small-model runner supports full and sliding-window attention models")
    for name in ("attn_logit_softcapping", "attention_sink"):
        if getattr(config, name, None):
            raise ValueError(f"the small model ({config.model_type}) uses {name}, which the packed "
                             "decode attention does not implement")


class _Step:
    """One decode forward's block map, shared by all layers: which step row owns each block, and
    which of its columns hold keys (plus, per sliding window, the columns still inside it)."""

    def __init__(self, row_of_block: torch.Tensor, filled: torch.Tensor, key_pos: torch.Tensor,
                 query_pos: torch.Tensor, rows: int):
        self.row_of_block, self.rows = row_of_block, rows
        self._filled, self._key_pos, self._query_pos = filled, key_pos, query_pos
        self._invalid: dict[Optional[int], torch.Tensor] = {}

    def invalid(self, window: Optional[int]) -> torch.Tensor:
        """``[blocks, BLOCK]`` True where a column must not be attended (empty, or outside ``window``)."""
        if window not in self._invalid:
            bad = ~self._filled
            if window is not None:
                q = torch.cat([self._query_pos, self._query_pos.new_zeros(1)])[self.row_of_block]
                bad = bad | (self._key_pos <= q[:, None] - window)
            self._invalid[window] = bad
        return self._invalid[window]


class PackedKV:
    """What a layer's cache update hands to :func:`packed_attention`: its pool and the step's block map."""

    __slots__ = ("pool", "step")

    def __init__(self, pool: torch.Tensor, step: _Step):
        self.pool, self.step = pool, step


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     sliding_window=None, **kwargs):
    """One query token per row against that row's blocks (``query``: ``[rows, heads, 1, head_dim]``).

    Returns ``([rows, 1, heads, head_dim], None)`` like transformers' attention functions.
    """
    if isinstance(key, PackedKV) and isinstance(key.step, _ExtendStep):
        return _extend_attention(query, key, value, scaling, sliding_window)
    if not isinstance(key, PackedKV) or query.shape[2] != 1:
        raise TypeError("packed_attention runs only inside PackedRows.decode (one token per row)")
    step = key.step
    rows, heads, _, dim = query.shape
    kv_heads = key.pool.shape[1]
    groups = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    index = step.row_of_block  # [blocks]; rows of other requests point at a dummy row (= rows)
    q = query.reshape(rows, kv_heads, groups, dim)
    q = torch.cat([q, q.new_zeros(1, kv_heads, groups, dim)])[index]  # [blocks, kv, g, D]
    scores = torch.matmul(q, key.pool.transpose(-1, -2)).float().mul_(scaling)  # [blocks, kv, g, B]
    scores.masked_fill_(step.invalid(sliding_window)[:, None, None, :], -math.inf)
    expand = index[:, None, None].expand(-1, kv_heads, groups)
    top = scores.new_full((rows + 1, kv_heads, groups), -math.inf)
    top.scatter_reduce_(0, expand, scores.amax(-1), "amax")
    top.masked_fill_(top == -math.inf, 0.0)  # blocks with nothing to attend add exp(-inf) = 0
    weights = scores.sub_(top[index][..., None]).exp_()
    total = scores.new_zeros((rows + 1, kv_heads, groups)).index_add_(0, index, weights.sum(-1))
    partial = torch.matmul(weights.to(value.pool.dtype), value.pool)  # [blocks, kv, g, D]
    out = partial.new_zeros((rows + 1, kv_heads, groups, dim), dtype=torch.float32)
    out.index_add_(0, index, partial.float())
    out = out[:rows] / total[:rows, ..., None]
    return out.to(query.dtype).reshape(rows, 1, heads, dim), None


class _ExtendStep(_Step):
    """:meth:`PackedRows.extend`'s block map: ``k`` query tokens per row, causal among the new ones."""

    def invalid(self, window: Optional[int]) -> torch.Tensor:
        """``[blocks, k, BLOCK]`` True where query ``i`` must not attend a column (empty, later, outside ``window``)."""
        if window not in self._invalid:
            qp = self._query_pos  # [rows, k]
            q = torch.cat([qp, qp.new_zeros(1, qp.shape[1])])[self.row_of_block][:, :, None]  # [blocks, k, 1]
            keys = self._key_pos[:, None, :]
            bad = ~self._filled[:, None, :] | (keys > q)
            if window is not None:
                bad = bad | (keys <= q - window)
            self._invalid[window] = bad
        return self._invalid[window]


def _extend_attention(query, key, value, scaling, sliding_window):
    """:func:`packed_attention` for ``k`` query tokens per row (``query``: ``[rows, heads, k, head_dim]``).

    The same flash-decoding combination over each row's blocks, with the query axis kept beside the
    head groups, and a causal mask by position (a new token sees the row's past and the new tokens
    up to itself). Returns ``([rows, k, heads, head_dim], None)``.
    """
    step = key.step
    rows, heads, k, dim = query.shape
    kv_heads = key.pool.shape[1]
    groups = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    index = step.row_of_block
    q = query.reshape(rows, kv_heads, groups * k, dim)
    q = torch.cat([q, q.new_zeros(1, kv_heads, groups * k, dim)])[index]  # [blocks, kv, g*k, D]
    scores = torch.matmul(q, key.pool.transpose(-1, -2)).float().mul_(scaling)  # [blocks, kv, g*k, B]
    blocks, width = scores.shape[0], scores.shape[-1]
    scores = scores.view(blocks, kv_heads, groups, k, width)
    scores.masked_fill_(step.invalid(sliding_window)[:, None, None], -math.inf)
    expand = index[:, None, None, None].expand(-1, kv_heads, groups, k)
    top = scores.new_full((rows + 1, kv_heads, groups, k), -math.inf)
    top.scatter_reduce_(0, expand, scores.amax(-1), "amax")
    top.masked_fill_(top == -math.inf, 0.0)
    weights = scores.sub_(top[index][..., None]).exp_()
    total = scores.new_zeros((rows + 1, kv_heads, groups, k)).index_add_(0, index, weights.sum(-1))
    partial = torch.matmul(weights.view(blocks, kv_heads, groups * k, width).to(value.pool.dtype), value.pool)
    out = partial.new_zeros((rows + 1, kv_heads, groups * k, dim), dtype=torch.float32)
    out.index_add_(0, index, partial.float())
    out = out[:rows].view(rows, kv_heads, groups, k, dim) / total[:rows, ..., None]
    return out.to(query.dtype).permute(0, 3, 1, 2, 4).reshape(rows, k, heads, dim), None


AttentionInterface.register(ATTENTION, packed_attention)

_REGISTER = threading.Lock()
_EAGER: dict[type, Callable] = {}  # attention module class -> its modeling file's eager_attention_forward


def _original_attention(module, original: str) -> Callable:
    """The function ``original`` names for ``module``, as the model itself would pick it."""
    if original != "eager":
        return ALL_ATTENTION_FUNCTIONS[original]
    fn = _EAGER.get(type(module))
    if fn is None:  # transformers' "eager" is each modeling file's own eager_attention_forward
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise TypeError(f"cannot find the eager attention of {type(module).__name__}")
        _EAGER[type(module)] = fn
    return fn


def _dispatcher(original: str) -> Callable:
    def attention(module, query, key, value, *args, **kwargs):
        if isinstance(key, PackedKV):
            return packed_attention(module, query, key, value, *args, **kwargs)
        return _original_attention(module, original)(module, query, key, value, *args, **kwargs)

    attention.__name__ = attention.__qualname__ = f"costeer_packed_or_{original}"
    return attention


def use_packed_attention(model) -> str:
    """Selects, once, the attention under which :meth:`PackedRows.decode` can run ``model``; returns its name.

    The selected implementation (``"costeer_packed:<original>"``) runs :func:`packed_attention` on a
    :class:`PackedKV` and the model's original implementation on anything else, and masks are built
    by the original's mask function: the model's ordinary forwards give exactly what they gave
    before. Idempotent; safe to call while other threads run the model. Flash-attention and hub
    kernels read the implementation's name at run time and are refused (load the small model with
    ``attn_implementation="sdpa"``).
    """
    current = model.config._attn_implementation or "eager"
    if current.startswith(ATTENTION + ":"):
        return current
    if "flash" in current or "/" in current or current.startswith("paged") or current == ATTENTION:
        raise ValueError(f"the small model uses attn_implementation={current!r}, which CoSteer's packed decode "
                         "cannot wrap; load it with attn_implementation='sdpa' (or 'eager')")
    if current != "eager" and current not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"the small model's attention implementation {current!r} is not registered")
    name = f"{ATTENTION}:{current}"
    with _REGISTER:
        if name not in ALL_ATTENTION_FUNCTIONS:
            if current in ALL_MASK_ATTENTION_FUNCTIONS:  # else no mask is built, as for the original
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
            AttentionInterface.register(name, _dispatcher(current))
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"the small model ({type(model).__name__}) cannot change its attention implementation "
                         "(it does not use transformers' AttentionInterface), so the packed decode cannot run it")
    return name


class _StepCache:
    """The ``past_key_values`` of a decode forward: writes each layer's new column, returns its pool."""

    def __init__(self, store: "PackedRows", step: _Step, blocks: torch.Tensor, offsets: torch.Tensor, used: int):
        self.store, self.step, self.blocks, self.offsets, self.used = store, step, blocks, offsets, used

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        keys[self.blocks, :, self.offsets] = key_states[:, :, -1]
        values[self.blocks, :, self.offsets] = value_states[:, :, -1]
        return PackedKV(keys[:self.used], self.step), PackedKV(values[:self.used], self.step)


class _ExtendCache(_StepCache):
    """The ``past_key_values`` of an extend forward: writes each layer's ``k`` new columns per row."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        keys[self.blocks, :, self.offsets] = key_states.transpose(1, 2).to(keys.dtype)  # [rows, k, kv, D]
        values[self.blocks, :, self.offsets] = value_states.transpose(1, 2).to(values.dtype)
        return PackedKV(keys[:self.used], self.step), PackedKV(values[:self.used], self.step)


class PackedRows:
    """Rows of KV in blocks of ``block`` tokens: add prefilled rows, drop rows, decode one token per row.

    Rows are stable integer ids (from :meth:`add`), so dropping one renumbers nothing. Pools grow
    by 1/16 when full (an amortised copy); freed blocks are reused lowest-first, so the blocks in use
    stay at the front of the pool and a step only scores ``[:high-water]``. A block's values are
    zeroed when it is taken, and :meth:`add` is all or nothing. One caller at a time: the
    :class:`~costeer_processor.small_model.SmallModelRunner` holds its lock around every call.

    Example::

        >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
        >>> from transformers import DynamicCache
        >>> tok = build_tiny_tokenizer(); model = build_tiny_model(tok)
        >>> ids = torch.tensor([[5, 6, 7, 8]]); cache = DynamicCache()
        >>> _ = model(input_ids=ids, past_key_values=cache)
        >>> store = PackedRows(model.config, torch.float32, torch.device("cpu"), block=2)
        >>> rows = store.add(cache, torch.ones(1, 4, dtype=torch.long))
        >>> logits = store.decode(model, torch.tensor(rows), torch.tensor([9]))
        >>> full = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits[:, -1]
        >>> bool(torch.allclose(logits, full, atol=1e-5)), store.tokens(), store.blocks_in_use()
        (True, 5, 3)
    """

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device, *, block: int = BLOCK):
        check_supported(config)
        self.config, self.block, self.dtype, self.device = config, block, dtype, device
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.keys: list[torch.Tensor] = []  # per layer [blocks, kv_heads, block, head_dim]
        self.values: list[torch.Tensor] = []
        self.owner: torch.Tensor  # [blocks] row id, -1 = free
        self.fill: torch.Tensor  # [blocks] columns holding keys
        self.block_start: torch.Tensor  # [blocks] position of column 0
        self.tail: torch.Tensor  # [row ids] the block the row's next token goes to
        self.length: torch.Tensor  # [row ids] tokens so far (the next position id)
        self._free_rows: list[int]
        self._live_rows: set[int]
        self._used: int  # high-water mark of blocks in use
        self._reset()

    # ------------------------------------------------------------------ figures
    def tokens(self) -> int:
        """Tokens held (the sum of the live rows' lengths)."""
        return int(self.fill.sum())

    def blocks_in_use(self) -> int:
        return int((self.owner >= 0).sum())

    def nbytes(self) -> int:
        """Bytes of the pools (every allocated block, free ones included)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bytes_per_token(self) -> int:
        return 2 * len(self.layer_types) * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def __len__(self) -> int:
        return len(self._live_rows)

    # ------------------------------------------------------------------ allocation
    def _grow_blocks(self, need: int) -> None:
        """Room for ``need`` blocks; all or nothing (a failed allocation leaves the pools as they were)."""
        old = self.owner.numel()
        if need <= old:
            return
        cap = need + max(4, need // 16)
        shape = (cap, self.kv_heads, self.block, self.head_dim)
        grown = []
        for pools in (self.keys, self.values):
            grown.append([])
            for i in range(len(self.layer_types)):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    new[:old] = pools[i]
                grown[-1].append(new)
        pad = lambda t, v: torch.cat([t, t.new_full((cap - old,), v)])  # noqa: E731
        owner, fill, block_start = pad(self.owner, -1), pad(self.fill, 0), pad(self.block_start, 0)
        self.keys, self.values = grown
        self.owner, self.fill, self.block_start = owner, fill, block_start

    def _take_blocks(self, n: int) -> torch.Tensor:
        """``n`` free block ids, lowest first (the pool grows if needed), their values zeroed.

        Zeroing here, once per block taken, costs what writing the block's KV costs anyway; masking
        values in the kernel instead would touch every block of the pool at every step. The caller
        marks the blocks' owner; until then they are still free.
        """
        free = (self.owner < 0).nonzero()[:, 0]
        if free.numel() < n:
            self._grow_blocks(self.owner.numel() + n - free.numel())
            free = (self.owner < 0).nonzero()[:, 0]
        taken = free[:n]
        if n:
            for pool in self.values:  # weight 0 x a stale inf/NaN would be NaN; stale keys are masked to -inf
                pool.index_fill_(0, taken, 0)
            self._used = max(self._used, int(taken[-1]) + 1)
        return taken

    def _take_rows(self, n: int) -> list[int]:
        """``n`` row ids (freed ones first); all or nothing."""
        reused = self._free_rows[len(self._free_rows) - min(n, len(self._free_rows)):][::-1]
        extra = n - len(reused)
        start = self.tail.numel()
        if extra:
            tail = torch.cat([self.tail, self.tail.new_full((extra,), -1)])
            length = torch.cat([self.length, self.length.new_zeros(extra)])
            self.tail, self.length = tail, length
        del self._free_rows[len(self._free_rows) - len(reused):]
        rows = reused + list(range(start, start + extra))
        self._live_rows.update(rows)
        return rows

    # ------------------------------------------------------------------ rows in and out
    @torch.inference_mode()
    def add(self, cache, mask: torch.Tensor) -> list[int]:
        """Writes prefilled rows into blocks and returns their row ids.

        ``cache``: a transformers cache of full-attention layers (``[m, kv_heads, W, head_dim]`` each);
        ``mask``: ``[m, W]``, 1 where a column holds one of the row's tokens (holes allowed), in order.
        If it raises, every row and block it took is free again.
        """
        mask = mask.to(self.device).bool()
        m = mask.shape[0]
        lengths = mask.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("every packed row needs at least one token")
        per_row = (lengths + self.block - 1) // self.block
        blocks = self._take_blocks(int(per_row.sum()))
        rows: list[int] = []
        try:
            rows = self._take_rows(m)
            self._write(cache, mask, lengths, per_row, blocks, rows)
        except BaseException:
            self.owner[blocks], self.fill[blocks] = -1, 0  # taken from the free blocks: free again
            self.drop(rows)
            self._settle()
            raise
        return rows

    def _write(self, cache, mask, lengths, per_row, blocks, rows) -> None:
        row_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        first = torch.cumsum(per_row, 0) - per_row  # index into `blocks` of each row's first block
        src_row, src_col = mask.nonzero(as_tuple=True)  # row-major: each row's tokens in order
        rank = torch.arange(src_row.numel(), device=self.device) - (torch.cumsum(lengths, 0) - lengths)[src_row]
        dst_block = blocks[first[src_row] + rank // self.block]
        dst_col = rank % self.block
        for i, layer in enumerate(cache.layers):
            self.keys[i][dst_block, :, dst_col] = layer.keys[src_row, :, src_col].to(self.dtype)
            self.values[i][dst_block, :, dst_col] = layer.values[src_row, :, src_col].to(self.dtype)
        owner_rows = torch.repeat_interleave(row_ids, per_row)
        nth = torch.arange(blocks.numel(), device=self.device) - torch.repeat_interleave(first, per_row)
        self.owner[blocks] = owner_rows
        self.block_start[blocks] = nth * self.block
        self.fill[blocks] = torch.clamp(torch.repeat_interleave(lengths, per_row) - nth * self.block, max=self.block)
        self.tail[row_ids] = blocks[first + per_row - 1]
        self.length[row_ids] = lengths

    @torch.inference_mode()
    def drop(self, rows) -> None:
        """Frees the rows' blocks (no other row moves)."""
        rows = [r for r in rows if r in self._live_rows]
        if not rows:
            return
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        freed = torch.isin(self.owner, ids)
        self.owner[freed], self.fill[freed] = -1, 0
        self.tail[ids], self.length[ids] = -1, 0
        self._live_rows.difference_update(rows)
        self._free_rows.extend(rows)
        self._settle()

    def _settle(self) -> None:
        """After blocks were freed: lowers the high-water mark, or holds no KV memory at all when idle."""
        if not self._live_rows:
            self._reset()
            return
        live = (self.owner[:self._used] >= 0).nonzero()
        self._used = int(live[-1]) + 1 if live.numel() else 0

    def clear(self) -> None:
        self.drop(list(self._live_rows))

    def _reset(self) -> None:
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        self.keys, self.values = [], []
        self.owner = self.fill = self.block_start = self.tail = self.length = empty
        self._free_rows, self._live_rows, self._used = [], set(), 0

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def decode(self, model, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One forward of ``model`` feeding ``ids[i]`` to row ``rows[i]``; returns ``[len(rows), V]`` logits.

        The model runs under :func:`use_packed_attention` (selected on first use). A forward that
        raises leaves every row as it was (nothing counts until it returns).
        """
        use_packed_attention(model)
        full = self.fill[self.tail[rows]] >= self.block
        if bool(full.any()):
            grown = rows[full]
            fresh = self._take_blocks(grown.numel())
            self.owner[fresh], self.fill[fresh], self.block_start[fresh] = grown, 0, self.length[grown]
            self.tail[grown] = fresh
        blocks = self.tail[rows]
        offsets = self.fill[blocks]
        used = self._used
        fill = self.fill.clone()
        fill[blocks] += 1
        lookup = torch.full((self.tail.numel() + 1,), rows.numel(), dtype=torch.long, device=self.device)
        lookup[rows] = torch.arange(rows.numel(), device=self.device)
        columns = torch.arange(self.block, device=self.device)
        positions = self.length[rows]
        step = _Step(lookup[self.owner[:used]], columns < fill[:used, None],
                     self.block_start[:used, None] + columns, positions, rows.numel())
        ready = torch.ones((rows.numel(), 1, 1, 1), dtype=torch.bool, device=self.device)  # 4D: no mask is built
        out = model(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=ready,
                    past_key_values=_StepCache(self, step, blocks, offsets, used), use_cache=True, logits_to_keep=1)
        self.fill = fill
        self.length[rows] += 1
        return out.logits[:, -1, :]

    # ------------------------------------------------------------------ speculation: several tokens, rollback
    @torch.inference_mode()
    def extend(self, model, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One forward of ``model`` feeding ``ids[i, :]`` (``k`` tokens) to row ``rows[i]``; returns
        ``[len(rows), k, V]`` logits (after each fed token).

        A multi-query :func:`packed_attention` (causal among the new tokens); ``k = 1`` computes what
        :meth:`decode` computes. A forward that raises leaves every row as it was.
        """
        use_packed_attention(model)
        n, k = ids.shape
        tail = self.tail[rows]
        start, fill = self.block_start[tail], self.fill[tail]
        spill = (fill + k - self.block).clamp(min=0)  # new tokens past the tail block
        extra = (spill + self.block - 1) // self.block
        fresh = self._take_blocks(int(extra.sum()))
        first = torch.cumsum(extra, 0) - extra
        owner_rows = torch.repeat_interleave(rows, extra)
        nth = torch.arange(fresh.numel(), device=self.device) - torch.repeat_interleave(first, extra)
        saved = (self.tail.clone(), self.fill.clone(), self._used)
        self.owner[fresh] = owner_rows
        self.block_start[fresh] = torch.repeat_interleave(start, extra) + (nth + 1) * self.block
        self.fill[fresh] = 0
        col = fill[:, None] + torch.arange(k, device=self.device)  # [n, k] column counted from the tail's start
        over = col // self.block  # 0: the tail block, m >= 1: the m-th fresh block of the row
        pick = (first[:, None] + over - 1).clamp(min=0)
        blocks = torch.where(over == 0, tail[:, None], fresh[pick] if fresh.numel() else tail[:, None])
        offsets = col % self.block
        fill_after = self.fill.clone()
        fill_after[tail] = torch.clamp(fill + k, max=self.block)
        fill_after[fresh] = torch.clamp(spill.repeat_interleave(extra) - nth * self.block, max=self.block)
        used = self._used
        lookup = torch.full((self.tail.numel() + 1,), n, dtype=torch.long, device=self.device)
        lookup[rows] = torch.arange(n, device=self.device)
        columns = torch.arange(self.block, device=self.device)
        positions = self.length[rows][:, None] + torch.arange(k, device=self.device)
        step = _ExtendStep(lookup[self.owner[:used]], columns < fill_after[:used, None],
                           self.block_start[:used, None] + columns, positions, n)
        ready = torch.ones((n, 1, k, 1), dtype=torch.bool, device=self.device)  # 4D: no mask is built
        try:
            out = model(input_ids=ids, position_ids=positions, attention_mask=ready,
                        past_key_values=_ExtendCache(self, step, blocks, offsets, used), use_cache=True,
                        logits_to_keep=k)
        except BaseException:  # give the fresh blocks back; clear what the forward wrote past the fill
            self.owner[fresh], self.fill[fresh] = -1, 0
            self.tail, self.fill, self._used = saved
            self._clear_tails(rows)
            self._settle()
            raise
        if extra.numel() and int(extra.max()) > 0:
            last = first + extra - 1
            has = extra > 0
            self.tail[rows[has]] = fresh[last[has]]
        self.fill = fill_after
        self.length[rows] += k
        return out.logits

    @torch.inference_mode()
    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Rolls each row in ``rows`` back to its first ``lengths[i]`` tokens (at least one): blocks wholly
        past the new end are freed, the block holding the last kept token becomes the tail, and its
        columns past the end get zero values (as a freshly taken block), so the row holds exactly what
        a row that never went further holds."""
        rows, lengths = rows.to(self.device), lengths.to(self.device)
        if bool((lengths < 1).any()) or bool((lengths > self.length[rows]).any()):
            raise ValueError("truncate keeps between 1 token and the row's length")
        lookup = torch.full((self.tail.numel(),), -1, dtype=torch.long, device=self.device)
        lookup[rows] = lengths
        used = self.owner >= 0
        keep_to = torch.where(used, lookup[self.owner.clamp(min=0)], -1)  # [blocks] new length of the owner
        touched = used & (keep_to >= 0)
        gone = touched & (self.block_start >= keep_to)
        self.owner[gone], self.fill[gone] = -1, 0
        tail = touched & ~gone & (self.block_start + self.fill > keep_to)
        self.fill[tail] = keep_to[tail] - self.block_start[tail]
        last = touched & ~gone & (self.block_start + self.block >= keep_to)  # holds each row's last kept token
        self.tail[self.owner[last]] = last.nonzero().flatten()
        self.length[rows] = lengths
        self._clear_tails(rows)
        self._settle()

    def _clear_tails(self, rows: torch.Tensor) -> None:
        """Zeroes the values past the fill of the rows' tail blocks (nothing stale can reach an attention)."""
        tail = self.tail[rows]
        stale = torch.arange(self.block, device=self.device) >= self.fill[tail][:, None]  # [n, BLOCK]
        for pool in self.values:
            pool[tail] = pool[tail].masked_fill(stale[:, None, :, None], 0)

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the row's keys and values in position order (``[kv_heads, length, head_dim]``; tests)."""
        mine = (self.owner == row).nonzero().flatten()
        mine = mine[self.block_start[mine].argsort()]
        n = int(self.length[row])
        return [(k[mine].transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)[:, :n],
                 v[mine].transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)[:, :n])
                for k, v in zip(self.keys, self.values)]
