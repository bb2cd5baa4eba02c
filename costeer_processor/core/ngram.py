"""Context n-gram guard: the private context must not leave through the answer verbatim.

Rule (``n >= 1``; ``n == 0`` switches it off): a token that would complete a run of ``n``
consecutive tokens found in the context's token ids but NOT in the public ids (the prompt the
large model reads, plus what the user typed) is not chosen: its log-prob becomes ``-inf``, so
greedy picks the next best token and sampling renormalises over what is left. With ``n == 1``
every context token absent from the public ids is banned everywhere. History shorter than
``n - 1`` tokens is padded with ``-1`` (matches nothing). A row whose every finite entry would be
banned is left as it was (counted as ``exhausted``): the guard never returns an all ``-inf`` row.

Example::

    >>> import torch
    >>> from costeer_processor.core.ngram import NgramGuard
    >>> guard = NgramGuard(3)
    >>> guard.add(0, context_ids=[5, 6, 7, 8], public_ids=[1, 5, 6, 7])  # 5 6 7 is public
    >>> logprobs = torch.zeros(2, 10); logprobs[:, 8] = 1.0  # both rows would pick 8
    >>> out = guard.apply(logprobs, torch.tensor([0, 0]), torch.tensor([[6, 7], [5, 6]]))
    >>> torch.isneginf(out).nonzero().tolist()  # after "6 7", 8 is banned; after "5 6", 7 is public
    [[0, 8]]
    >>> out.argmax(-1).tolist(), guard.fired(0), guard.stats()["masked"]
    ([0, 8], 1, 1)
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .config import check_range, number

__all__ = ["NgramGuard", "surface_forms"]

_M1, _M2 = 2_147_483_647, 2_147_483_629  # primes < 2**31: every product fits in int64
_P1, _P2 = 1_000_003, 972_663_749


@functools.lru_cache(maxsize=64)
def _powers(width: int, base: int, mod: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([pow(base, width - 1 - i, mod) for i in range(width)], dtype=torch.long, device=device)


def _poly(cols: torch.Tensor, base: int, mod: int) -> torch.Tensor:
    p = _powers(cols.shape[1], base, mod, cols.device)
    return ((cols.remainder(mod) * p).remainder(mod)).sum(1).remainder(mod)


def _hash(slots: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """62-bit key of ``(slot, gram)`` per row: two polynomial hashes mod 31-bit primes, no overflow.
    Collisions are harmless (lookups also compare the slot and the gram itself)."""
    cols = torch.cat([slots[:, None], grams], 1)
    return (_poly(cols, _P1, _M1) << 31) | _poly(cols, _P2, _M2)


def _expand(starts: torch.Tensor, lens: torch.Tensor):
    """For ranges ``[starts[i], starts[i] + lens[i])``: (owner i, position) of every element."""
    total = int(lens.sum())
    owner = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens
    return owner, starts[owner] + torch.arange(total, device=lens.device) - first[owner]


def surface_forms(context: str, n: int) -> list[str]:
    """The context as written, plus every run of ``n`` of its words as it would start a sentence or
    follow a space in the other case: ``"Paramedic on night shifts"`` and ``" Paramedic on night shifts"``
    from "I'm a paramedic on night shifts". A tokenizer spells a word differently after a space, at a
    line's start or capitalised, so the context's own ids alone let "Night shifts. I read" through at
    the start of an answer. ``O(words * n)`` text; the n-grams never span two forms.

    >>> surface_forms("I read on night shifts", 3)[:5]
    ['I read on night shifts', 'I read on', ' i read on', 'Read on night', ' Read on night']
    """
    words = context.split()
    forms = [context]
    for i, first in enumerate(words):
        tail = "".join(" " + w for w in words[i + 1:i + n])
        upper, lower = first[:1].upper() + first[1:], first[:1].lower() + first[1:]
        forms.append(upper + tail)  # a line's or an answer's first word
        forms.append(" " + (upper if first != upper else lower) + tail)  # the other case after a space
    return forms


def _lex_groups(rows: torch.Tensor):
    """Lexicographic order of ``rows`` (stable sorts, last column first) and, along that order, a group
    id per row (equal rows share one) and whether the row is its group's first. Exact, vectorised."""
    order = torch.arange(len(rows), device=rows.device)
    for c in reversed(range(rows.shape[1])):
        order = order[torch.argsort(rows[order, c], stable=True)]
    ranked = rows[order]
    first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    first[1:] = (ranked[1:] != ranked[:-1]).any(1)
    return order, torch.cumsum(first, 0) - 1, first


class NgramGuard:
    """Bans, per slot, the continuations of the context's n-grams that are absent from the public ids.

    Per slot (built once in :meth:`add`, vectorised: ``unfold`` + stable sorts, exact, ``O(n L log L)``):
    the distinct ``(n-1)``-gram prefixes and, in CSR form, their banned last tokens. All slots are
    packed lazily (on the first lookup after an add/remove; ``O(K log K)`` for ``K`` prefixes in all)
    into one table sorted by a 62-bit hash of ``(slot, prefix)``; :meth:`banned` looks up every row
    with one ``torch.searchsorted``, then compares the stored slot and prefix (exact under
    collisions): ``O(B (n + log K))`` plus the output size per step, independent of context length.

    Not thread-safe: the caller (one batched steering step) holds its lock around every call.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = number("n", n, integer=True, strict=True)
        check_range("n", self.n, 0, hint=" (0 switches the guard off)")
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        """Forgets every slot and zeroes the counters."""
        self._slots: dict[int, tuple[torch.Tensor, ...]] = {}  # slot -> keys, prefixes, lens, continuations
        self._counts = torch.zeros(0, 3, dtype=torch.long, device=self.device)  # fired, masked, exhausted
        self._totals = torch.zeros(3, dtype=torch.long, device=self.device)
        self._dirty = True
        self._pack()

    def __contains__(self, slot: object) -> bool:
        return slot in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, slot: int, context_ids: Sequence[int] | Sequence[Sequence[int]], public_ids: Sequence[int]) -> None:
        """Registers (or replaces) ``slot``: bans every n-gram of ``context_ids`` absent from
        ``public_ids`` (one sequence: the prompt plus what the user typed). Resets its counters.

        ``context_ids`` is one sequence, or several (the context's surface forms, see
        :func:`surface_forms`): the n-grams of each, never across two."""
        slot = number("slot", slot, integer=True, strict=True)
        check_range("slot", slot, 0)
        if self.n == 0:
            return
        n, m, dev = self.n, self.n - 1, self.device
        several = not isinstance(context_ids, torch.Tensor) and len(context_ids) > 0 and all(
            isinstance(x, (list, tuple, torch.Tensor)) for x in context_ids)
        seqs = [torch.as_tensor(x if isinstance(x, torch.Tensor) else list(x), dtype=torch.long, device=dev)
                for x in (context_ids if several else [context_ids])]
        pub = torch.as_tensor(public_ids if isinstance(public_ids, torch.Tensor) else list(public_ids),
                              dtype=torch.long, device=dev)
        if pub.dim() != 1 or any(c.dim() != 1 or bool((c < 0).any()) for c in seqs):
            raise ValueError("context_ids and public_ids must be flat sequences of token ids (context ids >= 0)")
        grams = torch.cat([c.unfold(0, n, 1) for c in seqs if len(c) >= n] or [pub.new_zeros(0, n)])
        if len(pub) >= n and len(grams):
            both = torch.cat([grams, pub.unfold(0, n, 1)])
            order, group, _ = _lex_groups(both)
            public = torch.zeros(len(both), dtype=torch.bool, device=dev)
            public[group[order >= len(grams)]] = True  # groups (distinct n-grams) seen in the public ids
            grams = both[order[(order < len(grams)) & ~public[group]]]
        order, _, first = _lex_groups(grams)
        grams = grams[order[first]]  # distinct private n-grams, lexicographic: equal prefixes are adjacent
        starts = torch.ones(len(grams), dtype=torch.bool, device=dev)
        starts[1:] = (grams[1:, :m] != grams[:-1, :m]).any(1)  # all False when m == 0: one prefix ()
        prefix, lens = grams[starts, :m], torch.bincount(torch.cumsum(starts, 0) - 1, minlength=int(starts.sum()))
        keys = _hash(torch.full((len(prefix),), slot, dtype=torch.long, device=dev), prefix)
        self._slots[slot] = (keys, prefix, lens, grams[:, m].contiguous())
        if slot >= len(self._counts):
            grow = self._counts.new_zeros(max(slot + 1, 2 * len(self._counts)) - len(self._counts), 3)
            self._counts = torch.cat([self._counts, grow])
        self._counts[slot] = 0
        self._dirty = True

    def remove(self, slot: int) -> None:
        """Forgets ``slot`` (its counters stay readable until the slot is added again)."""
        if self._slots.pop(slot, None) is not None:
            self._dirty = True

    def _pack(self) -> None:
        """Concatenates the slots' tables and sorts them by key: ``O(K log K)``, once per batch of changes."""
        m, dev = max(self.n - 1, 0), self.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        parts = list(self._slots.values()) or [(empty, empty.view(0, 1).expand(0, m), empty, empty)]
        keys, prefix, lens, conts = (torch.cat(column) for column in zip(*parts))
        slot = torch.repeat_interleave(torch.tensor(list(self._slots), dtype=torch.long, device=dev),
                                       torch.tensor([len(p[0]) for p in self._slots.values()], dtype=torch.long,
                                                    device=dev))
        keys, order = torch.sort(keys)
        self._keys, self._slot, self._prefix = keys, slot[order], prefix[order]
        self._starts, self._lens, self._conts = (torch.cumsum(lens, 0) - lens)[order], lens[order], conts
        self._dirty = False

    def banned(self, slots: torch.Tensor, tails: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, token_ids)``: every token banned for row ``rows[i]`` after its last ``n-1`` tokens
        ``tails[row]`` (``[B, n-1]``, left-padded with ``-1``); distinct pairs, grouped by row."""
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        if self.n == 0:
            return empty, empty
        if slots.dim() != 1 or tails.shape != (len(slots), self.n - 1):
            raise ValueError(f"slots must be [B] and tails [B, {self.n - 1}], got {tuple(slots.shape)} "
                             f"and {tuple(tails.shape)}")
        if self._dirty:
            self._pack()
        if len(self._keys) == 0 or len(slots) == 0:
            return empty, empty
        slots, tails = slots.to(self.device, torch.long), tails.to(self.device, torch.long)
        q = _hash(slots, tails)
        lo = torch.searchsorted(self._keys, q)
        rows, entry = _expand(lo, torch.searchsorted(self._keys, q, right=True) - lo)  # usually 0 or 1 each
        same = (self._slot[entry] == slots[rows]) & (self._prefix[entry] == tails[rows]).all(1)
        rows, entry = rows[same], entry[same]
        owner, pos = _expand(self._starts[entry], self._lens[entry])
        return rows[owner], self._conts[pos]

    def apply(self, logprobs: torch.Tensor, slots: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        """Sets every banned id of ``logprobs`` (``[B, V]``) to ``-inf`` in place and returns it;
        ids ``>= V`` are ignored; rows that would be left all ``-inf`` are left as they were."""
        rows, toks = self.banned(slots, tails)
        keep = toks < logprobs.shape[1]
        rows, toks = rows[keep], toks[keep]
        if len(rows) == 0:
            return logprobs
        inf = float("-inf")
        before = logprobs[rows, toks]
        logprobs[rows, toks] = inf
        touched = torch.unique(rows)  # rows with a banned id; one read of these rows follows
        few = 3 * len(touched) < len(logprobs)  # copying a few rows beats reading every row
        left = logprobs.index_select(0, touched).amax(-1) if few else logprobs.amax(-1)[touched]
        top_banned = torch.full((len(logprobs),), inf, dtype=before.dtype, device=before.device)
        top_banned = top_banned.scatter_reduce(0, rows, before, "amax")[touched]
        fired = top_banned > left  # the row's best token was banned (ties: the row keeps an equal best)
        exhausted = fired & torch.isneginf(left)  # every finite entry banned: leave the row as it was
        undo = torch.zeros(len(logprobs), dtype=torch.bool, device=rows.device)
        undo[touched[exhausted]] = True
        undo = undo[rows]
        logprobs[rows[undo], toks[undo]] = before[undo]
        masked = torch.bincount(rows[~undo & torch.isfinite(before)], minlength=len(logprobs))[touched]
        per_row = torch.stack([fired & ~exhausted, masked, exhausted], 1).long().to(self._counts.device)
        self._counts.index_add_(0, slots.to(self._counts.device, torch.long)[touched.to(self._counts.device)], per_row)
        self._totals += per_row.sum(0)
        return logprobs

    def fired(self, slot: int) -> int:
        """Steps since ``slot`` was added in which its argmax was banned (the guard changed a greedy pick)."""
        return int(self._counts[slot, 0]) if 0 <= slot < len(self._counts) else 0

    def stats(self) -> dict:
        """Totals since construction or :meth:`clear`: ``fired`` (steps whose argmax was banned),
        ``masked`` (ids set to ``-inf``), ``exhausted`` (rows left alone), and the table sizes."""
        fired, masked, exhausted = (int(v) for v in self._totals)
        if self._dirty:
            self._pack()
        return {"n": self.n, "slots": len(self._slots), "prefixes": len(self._keys),
                "banned_pairs": len(self._conts), "fired": fired, "masked": masked, "exhausted": exhausted}
