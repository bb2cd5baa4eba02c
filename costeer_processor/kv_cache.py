"""The reusable personal-context cache: with-context prefix KV kept across requests.

:class:`ContextCache` keeps the KV of with-context prefixes (chat template + system prompt + the
personal context) in a bounded, memory-capped LRU, keyed by the exact token ids and the
request's ``cache_salt`` (vLLM's per-tenant salt; never by a user-supplied name), so a user's
next request with the same context skips most of its small-model prefill. (The running requests'
own KV lives in :mod:`costeer_processor.packed_kv`.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional, Sequence

import torch

__all__ = ["ContextCache"]


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
