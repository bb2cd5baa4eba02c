"""The small model's KV storage: a cache that grows in place, and the reusable personal-context cache.

* :func:`growing_cache` is a transformers ``DynamicCache`` whose full-attention layers keep their
  keys and values in buffers with spare columns (:class:`GrowingLayer`), so a decode step writes one
  column in place instead of copying the whole cache (``DynamicLayer.update`` concatenates: one copy
  of every layer per step, which dominated the small model's step with long contexts). Growth is
  amortised: 1/16 of the length (at least 16 columns) at a time, so spare columns stay under ~6 %. A failed forward can be rolled back with
  :func:`truncate`.
* :class:`ContextCache` keeps the KV of with-context prefixes (chat template + system prompt + the
  personal context) in a bounded, memory-capped LRU, keyed by the exact token ids and the
  request's ``cache_salt`` (vLLM's per-tenant salt; never by a user-supplied name), so a user's
  next request with the same context skips most of its small-model prefill.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "growing_cache", "set_layer", "truncate", "kv_bytes", "ContextCache"]

_GROWTH = 16  # at least this many spare columns when a layer is full (and 1/16 of its length)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place into buffers with spare columns (``[B, H, capacity, D]``)."""

    def __init__(self) -> None:
        super().__init__()
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self.length = 0

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replaces the contents (the next append allocates spare columns)."""
        self.dtype, self.device = keys.dtype, keys.device
        self._k, self._v = keys, values
        self.length = keys.shape[-2]
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k is None:
            self.set(key_states, value_states)
            return self.keys, self.values
        new = key_states.shape[-2]
        need = self.length + new
        if need > self._k.shape[-2]:
            capacity = need + max(_GROWTH, need // 16)
            self._k = _with_capacity(self._k, self.length, capacity)
            self._v = _with_capacity(self._v, self.length, capacity)
        self._k[..., self.length:need, :] = key_states
        self._v[..., self.length:need, :] = value_states
        self.length = need
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forgets columns from ``length`` on (the buffers keep their capacity)."""
        if self._k is not None and length < self.length:
            self.length = length
            self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]


def _with_capacity(t: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[-2] = capacity
    out = t.new_empty(shape)
    out[..., :length, :] = t[..., :length, :]
    return out


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are :class:`GrowingLayer` s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replaces a cache layer's keys and values (any layer type)."""
    if isinstance(layer, GrowingLayer):
        layer.set(keys, values)
    else:
        layer.keys, layer.values = keys, values


def truncate(cache: DynamicCache, lengths: Sequence[int]) -> None:
    """Rolls each layer back to ``lengths[i]`` columns (after a forward that failed half-way)."""
    for layer, n in zip(cache.layers, lengths):
        if isinstance(layer, GrowingLayer):
            layer.truncate(n)
        elif layer.is_initialized and layer.keys.shape[-2] > n:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]


def kv_bytes(cache: Optional[DynamicCache]) -> int:
    """Bytes held by the cache's keys and values (allocated buffers, spare columns included)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        held = (layer._k, layer._v) if isinstance(layer, GrowingLayer) else (layer.keys, layer.values)
        total += sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    return total


class ContextCache:
    """A memory-capped LRU of with-context prefix KV (one ``[1, H, P, D]`` pair per layer per entry).

    Args:
        max_bytes: the cap; ``0`` switches the cache off. An entry larger than the cap is not kept.

    Keys are ``(salt, token ids)``: two different contexts (or tenants) never share an entry.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the context cache size must be an integer >= 0 (bytes), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[list[tuple[torch.Tensor, torch.Tensor]], int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(prefix_ids: Sequence[int], salt: Optional[Hashable]) -> tuple:
        return (salt, tuple(prefix_ids))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: tuple, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if not self.enabled or size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (layers, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
