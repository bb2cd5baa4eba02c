"""Speculative CoSteer: CoSteer's output, with fewer large-model forwards per token.

At batch 1 a large model's decode step is memory-bound: scoring ``k + 1`` positions in one forward
costs about one step. The small model that reads the user's context is a natural drafter. Each round,
for each row:

1. **draft** ``k`` tokens from a proposal ``q`` built from the small model's logits (``"with_context"``:
   its with-context branch; ``"proxy"``: ``log p_S+ + (g - 1) * (log p_S+ - log p_S-)``, CoSteer with
   the large model replaced by the small model without the context). Each draft step advances BOTH
   branches through the runner (one ``[2n, 1]`` forward, the cost of a ``[n, 1]`` one at small batch),
   so the small-model logits CoSteer needs at every drafted position come out of the drafting itself;
2. run **one** large forward over the uncached tokens plus the drafts: the large logits at every
   drafted position and one more;
3. compute CoSteer's target ``p`` position by position with the :class:`~costeer_processor.Steerer`
   (gating, fail-closed ending, the update and its options, the n-gram and EOS guards: exactly what
   :meth:`Steerer.step` does), then the user's warpers (temperature, top-p) as
   :func:`~costeer_processor.core.choose` applies them; and accept:

   * greedy: while ``argmax p == draft``; the first mismatch emits ``argmax p`` (a round emits at least one token);
   * sampling: speculative rejection sampling (:func:`accept_or_resample`): accept ``d`` with probability
     ``min(1, p(d) / q(d))``, else emit a sample of ``norm(max(0, p - q))`` and stop; all accepted: a
     bonus token from ``p`` at the next position. Every emitted token is distributed exactly as ``p``
     (Leviathan et al. 2023; Chen et al. 2023), whatever ``q`` is;
4. **roll back**: the small runner's rows are truncated to the accepted tokens
   (:meth:`SmallModelRunner.truncate`: blocks freed, nothing re-prefilled); in the large model's
   ``DynamicCache`` the rejected columns of a row become masked holes (rows of a batch accept
   different counts), and columns that are holes in every row are cropped off the end.

Positions are processed in order and a row stops at its first rejection, so per-request state that
evolves per token (AdaCoSteer's streak, the steered-step counter) only ever sees emitted tokens.
A row whose small model fails while drafting is ended (only end-of-sequence, fail closed) at the
first position whose small-model logits are missing. Rows gated off (AdaCoSteer) or failed are
decoded by the large model alone, one token per round. See ``docs/speculative.md``.

Example (a tiny random pair; the output is the non-speculative greedy output, token for token)::

    >>> import torch
    >>> from transformers import LogitsProcessorList
    >>> from costeer_processor import SmallModelRunner
    >>> from costeer_processor.hf import CoSteerLogitsProcessor
    >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> large, small = build_tiny_model(tok, hidden_size=96, seed=1), build_tiny_model(tok, seed=2)
    >>> runner = SmallModelRunner(small, tok)
    >>> chat = [{"role": "user", "content": "suggest a dinner"}]
    >>> inputs = tok.apply_chat_template([chat], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    >>> out = speculative_generate(large, runner, inputs["input_ids"], inputs["attention_mask"], ["I am vegan."],
    ...                            max_new_tokens=8, k=4)
    >>> proc = CoSteerLogitsProcessor(runner, ["I am vegan."])
    >>> ref = large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), do_sample=False, max_new_tokens=8)
    >>> torch.equal(out.sequences, ref), out.stats.large_forwards[0] <= 8
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers import DynamicCache

from .core import NEG_INF, CoSteerConfig, Sampling, Variants
from .loading import eos_token_ids
from .small_model import SmallModelRunner, check_rows
from .steering import Steerer
from .vocab import VocabularyMap

__all__ = ["speculative_generate", "SpeculativeOutput", "SpeculativeStats", "accept_or_resample", "warp",
           "PROPOSALS"]

PROPOSALS = ("with_context", "proxy")


@dataclass
class SpeculativeStats:
    """Per request (batch row): tokens drafted and accepted, large forwards it took part in, tokens emitted."""

    drafted: list[int]
    accepted: list[int]
    large_forwards: list[int]
    tokens: list[int]
    rounds: int = 0  # large forwards of the whole batch
    small_forwards: int = 0  # batched small-model steps (drafting and re-sync), prefill included

    @classmethod
    def empty(cls, rows: int) -> "SpeculativeStats":
        return cls([0] * rows, [0] * rows, [0] * rows, [0] * rows)

    @property
    def acceptance(self) -> list[float]:
        """Per row: accepted / drafted (``nan`` when nothing was drafted)."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_forward(self) -> list[float]:
        return [t / f if f else float("nan") for t, f in zip(self.tokens, self.large_forwards)]

    def summary(self) -> dict:
        """Totals over the batch (what the benchmark reports)."""
        drafted, tokens = sum(self.drafted), sum(self.tokens)
        return {"drafted": drafted, "accepted": sum(self.accepted), "tokens": tokens, "rounds": self.rounds,
                "large_forwards": sum(self.large_forwards), "small_forwards": self.small_forwards,
                "acceptance": sum(self.accepted) / drafted if drafted else float("nan"),
                "tokens_per_forward": tokens / max(1, sum(self.large_forwards))}


@dataclass
class SpeculativeOutput:
    """``sequences``: ``[B, prompt + new]`` as ``generate`` returns it (left padding kept, finished rows
    padded with the pad id); ``stats``: :class:`SpeculativeStats`."""

    sequences: torch.Tensor
    stats: SpeculativeStats = field(repr=False)


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities after the sampling warpers, exactly as :func:`~costeer_processor.core.choose` samples."""
    logits = scores / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), NEG_INF)
    return torch.softmax(logits, dim=-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling at one position for ``n`` rows.

    ``p``, ``q``: ``[n, V]`` target and proposal probabilities; ``draft``: ``[n]`` tokens drawn from ``q``.
    Returns ``(accepted [n] bool, replacement [n])``: ``draft`` is kept with probability
    ``min(1, p(d) / q(d))``; otherwise the row emits ``replacement ~ norm(max(0, p - q))``. The emitted
    token is then distributed as ``p``: ``P(d) = q(d) min(1, p(d)/q(d)) + (1 - a) r(d) = p(d)``.
    """
    pd = p.gather(1, draft[:, None])[:, 0]
    qd = q.gather(1, draft[:, None])[:, 0]
    u = torch.rand(pd.shape, generator=generator, device=p.device, dtype=pd.dtype)
    accepted = u * qd < pd
    residual = (p - q).clamp_(min=0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p)  # p == q: never rejected
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


ACCEPT: Callable = accept_or_resample  # the rule used (tests swap in a wrong one and see it fail)


@torch.inference_mode()
def speculative_generate(large_model, runner: SmallModelRunner, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, contexts: Sequence[str] = (), *,
                         config: CoSteerConfig = CoSteerConfig(), variants: Variants = Variants(),
                         max_new_tokens: int = 32, min_new_tokens: int = 0, do_sample: bool = False,
                         temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
                         generator: Optional[torch.Generator] = None,
                         eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None,
                         k: int = 4, adaptive: bool = False, proposal: str = "with_context",
                         vocab_map: Optional[VocabularyMap] = None, large_tokenizer=None,
                         cache_salt: Optional[str] = None) -> SpeculativeOutput:
    """CoSteer generation with speculative decoding: ``generate``'s inputs and output.

    The same tokens as ``large_model.generate(..., logits_processor=[CoSteerLogitsProcessor(runner,
    contexts, config, variants=...)])`` under greedy decoding, the same distribution under sampling
    (``do_sample``, ``temperature``, ``top_p``; warpers as in :func:`~costeer_processor.core.choose`).

    Args:
        input_ids / attention_mask: the large model's prompts, left-padded (as for ``generate``).
        contexts: one personal context per row.
        max_new_tokens / min_new_tokens: as in ``generate`` (``min_new_tokens`` masks the end-of-sequence
            ids in the large logits before steering, as transformers' processor does).
        eos_token_id: id(s) that end a row (default: the large model's generation config; the EOS guard
            then uses :func:`~costeer_processor.loading.eos_token_ids` of the tokenizer, as the HF processor).
        k: drafts per round (the most, with ``adaptive``); ``adaptive``: each row starts at ``max(1, k // 2)``
            and grows by 2 after a round whose drafts were all accepted, shrinks by 1 otherwise.
        proposal: ``"with_context"`` or ``"proxy"`` (see the module docstring).
        vocab_map / large_tokenizer: as for the HF processor (different tokenizers).
        seed / generator: the sampling stream (``generator`` on the large model's device wins).

    Returns a :class:`SpeculativeOutput` (``sequences``, per-row ``stats``).
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be [batch, length]")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("speculative_generate needs left-padded prompts (the last column of every row is a token)")
    check_rows(list(range(input_ids.shape[0])), list(contexts))
    if vocab_map is not None and large_tokenizer is None:
        raise ValueError("with a vocab_map, pass large_tokenizer= (the prompts are read from input_ids)")
    tokenizer = large_tokenizer if large_tokenizer is not None else runner.tokenizer
    run = _Run(large_model, runner, tokenizer, input_ids, attention_mask, list(contexts), config, variants,
               Sampling(temperature if do_sample else 0.0, top_p if do_sample else 1.0), seed, generator,
               eos_token_id, pad_token_id, vocab_map, cache_salt, proposal)
    try:
        return run.generate(max_new_tokens, min_new_tokens, k, adaptive)
    finally:
        run.release()


class _Run:
    """One call's state: the large cache and its mask, per-row histories, slots and draft lengths."""

    def __init__(self, large, runner, tokenizer, input_ids, attention_mask, contexts, config, variants, sampling,
                 seed, generator, eos_token_id, pad_token_id, vocab_map, cache_salt, proposal):
        gen_config = large.generation_config
        if eos_token_id is None:
            stop = gen_config.eos_token_id if gen_config.eos_token_id is not None else tokenizer.eos_token_id
            steer_eos = eos_token_ids(tokenizer)
        else:
            stop = steer_eos = eos_token_id
        self.stop = [stop] if isinstance(stop, int) else [int(t) for t in (stop or [])]
        steer_eos = [steer_eos] if isinstance(steer_eos, int) else list(steer_eos)
        if pad_token_id is None:
            pad_token_id = next((t for t in (gen_config.pad_token_id, tokenizer.pad_token_id) if t is not None),
                                self.stop[0] if self.stop else 0)
        self.large, self.runner, self.sampling, self.proposal = large, runner, sampling, proposal
        self.pad = int(pad_token_id)
        self.device = input_ids.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.generator = generator
        self.steerer = Steerer(runner, tokenizer, steer_eos, vocab_map=vocab_map)
        self.vocab_map = vocab_map
        self.width = int(large.get_output_embeddings().weight.shape[0])
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.slots: list[int] = []
        for ids, mask, context in zip(input_ids.tolist(), attention_mask.tolist(), contexts):
            prompt = [t for t, m in zip(ids, mask) if m]
            request = self.steerer.request(prompt, context, gain=config.gain, variants=variants, salt=cache_salt)
            self.slots.append(self.steerer.admit(request))
        self.rows = input_ids.shape[0]
        self.generated: list[list[int]] = [[] for _ in range(self.rows)]
        self.stats = SpeculativeStats.empty(self.rows)
        self.fail_pos: dict[int, int] = {}

    def release(self) -> None:
        for slot in self.slots:
            self.steerer.release(slot)
        self.slots = []

    # ------------------------------------------------------------------ the loop
    def generate(self, max_new: int, min_new: int, k: int, adaptive: bool) -> SpeculativeOutput:
        live = list(range(self.rows))  # rows still generating, in the large batch's order
        want = [max(1, k // 2) if adaptive else k for _ in range(self.rows)]
        cache = DynamicCache(config=self.large.config)
        mask = self.attention_mask.new_zeros((self.rows, 0))
        uncached, uncached_mask = self.input_ids, self.attention_mask
        while live and max_new > 0:
            z = self._small_start(live)
            ks = [0 if z[r] is None else min(want[r], max_new - len(self.generated[r]) - 1) for r in live]
            drafts, q = self._draft(live, ks, z)
            width = max(len(d) for d in drafts)
            ids = torch.full((len(live), uncached.shape[1] + width), self.pad, dtype=torch.long, device=self.device)
            new_mask = torch.zeros_like(ids)
            ids[:, :uncached.shape[1]], new_mask[:, :uncached.shape[1]] = uncached, uncached_mask
            for i, d in enumerate(drafts):
                ids[i, uncached.shape[1]:uncached.shape[1] + len(d)] = torch.tensor(d, dtype=torch.long)
                new_mask[i, uncached.shape[1]:uncached.shape[1] + len(d)] = 1
            mask = torch.cat([mask, new_mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            logits = self.large(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=width + 1).logits.float()
            self.stats.rounds += 1
            accepted, emitted = self._verify(live, drafts, q, z, logits, min_new)
            self._resync(live, z, accepted, drafts)
            for i, r in enumerate(live):
                mask[i, mask.shape[1] - width + accepted[i]:] = 0  # rejected drafts: holes
                self.stats.drafted[r] += len(drafts[i])
                self.stats.accepted[r] += accepted[i]
                self.stats.large_forwards[r] += 1
                self.generated[r] += emitted[i]
                if adaptive and drafts[i]:
                    want[r] = min(k, want[r] + 2) if accepted[i] == len(drafts[i]) else max(1, want[r] - 1)
            done = [self._finished(r, max_new) for r in live]
            for r, d in zip(live, done):
                if d:
                    self.steerer.switch_off(self.slots[r])  # finished rows stop costing small-model compute
            keep = [i for i, d in enumerate(done) if not d]
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask = mask.index_select(0, index)
                live = [live[i] for i in keep]
            if not live:
                break
            trailing = int((mask.flip(1).cumsum(1) == 0).all(0).sum())  # holes in every row, at the end
            if trailing:
                cache.crop(-trailing)
                mask = mask[:, :mask.shape[1] - trailing]
            uncached = torch.tensor([[self.generated[r][-1]] for r in live], dtype=torch.long, device=self.device)
            uncached_mask = torch.ones_like(uncached)
        for r in range(self.rows):
            self.stats.tokens[r] = len(self.generated[r])
        return SpeculativeOutput(self._sequences(), self.stats)

    def _finished(self, r: int, max_new: int) -> bool:
        gen = self.generated[r]
        return len(gen) >= max_new or (bool(gen) and gen[-1] in self.stop)

    def _sequences(self) -> torch.Tensor:
        longest = max(len(g) for g in self.generated)
        out = torch.full((self.rows, self.input_ids.shape[1] + longest), self.pad, dtype=self.input_ids.dtype,
                         device=self.device)
        out[:, :self.input_ids.shape[1]] = self.input_ids
        for r, g in enumerate(self.generated):
            if g:
                out[r, self.input_ids.shape[1]:self.input_ids.shape[1] + len(g)] = torch.tensor(g)
        return out

    # ------------------------------------------------------------------ the small model
    def _small(self, rows: list[int], histories: list[list[int]]) -> dict[int, Optional[tuple]]:
        """One batched small step for ``rows`` (their steered slots); per row ``(z_with, z_without)`` or ``None``
        (its request failed now)."""
        slots = torch.tensor([self.slots[r] for r in rows])
        z_with, z_without, ok = self.steerer.small(slots, histories)
        self.stats.small_forwards += 1
        out, j = {}, 0
        for r, fine in zip(rows, ok.tolist()):
            out[r] = (z_with[j], z_without[j]) if fine else None
            j += fine
        return out

    def _small_start(self, live: list[int]) -> dict[int, Optional[list]]:
        """Each live row's small-model logits after its committed tokens (``None``: not steered: gated
        off, failed, or failing now)."""
        steered = [r for r in live if self.steerer.is_active(self.slots[r])]
        z: dict[int, Optional[list]] = {r: None for r in live}
        if steered:
            for r, zr in self._small(steered, [self.generated[r] for r in steered]).items():
                z[r] = None if zr is None else [zr]
        for r in live:
            self.fail_pos[r] = 0 if self.steerer.failure(self.slots[r]) is not None else -1
        return z

    def _draft(self, live, ks, z):
        """``ks[i]`` drafts per live row from the proposal; each draft step feeds both branches (one forward)."""
        drafts: list[list[int]] = [[] for _ in live]
        qs: list[list[torch.Tensor]] = [[] for _ in live]
        for step in range(max(ks, default=0)):
            idx = [i for i, kk in enumerate(ks) if kk > step]
            if not idx:
                break
            rows = [live[i] for i in idx]
            proposal = self._proposal(rows, [z[r][step] for r in rows])
            if self.sampling.greedy:
                tokens = proposal.argmax(-1)
            else:
                q = warp(proposal, self.sampling)
                tokens = torch.multinomial(q, 1, generator=self.generator)[:, 0]
                for j, i in enumerate(idx):
                    qs[i].append(q[j])
            for j, i in enumerate(idx):
                drafts[i].append(int(tokens[j]))
            fed = self._small(rows, [self.generated[r] + drafts[i] for r, i in zip(rows, idx)])
            for r, i in zip(rows, idx):
                if fed[r] is None:  # fail closed from the position whose small logits are missing
                    ks[i] = step + 1
                    self.fail_pos[r] = step + 1
                else:
                    z[r].append(fed[r])
        return drafts, qs

    def _proposal(self, rows: list[int], zs: list[tuple]) -> torch.Tensor:
        """``[n, V_large]`` proposal logits (``-inf`` off the small vocabulary)."""
        z_with = torch.stack([w for w, _ in zs]).float()
        if self.proposal == "proxy":
            lw, lo = torch.log_softmax(z_with, -1), torch.log_softmax(torch.stack([o for _, o in zs]).float(), -1)
            delta = lw - lo
            delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
            gains = torch.tensor([self.steerer.request_of(self.slots[r]).gain for r in rows], device=lw.device)
            z_with = lw + (gains[:, None] - 1.0) * delta
        width = self.width
        z_with = z_with.to(self.device)
        if self.vocab_map is not None:
            return self.vocab_map.lift(z_with, width)
        out = z_with.new_full((z_with.shape[0], width), NEG_INF)
        n = min(width, z_with.shape[1])
        out[:, :n] = z_with[:, :n]
        return out

    def _resync(self, live, z, accepted, drafts) -> None:
        """Rolls each row's small-model branches back to its committed tokens plus its accepted drafts
        (before ``generated`` grows: one batched truncation, no forward)."""
        items = []
        for i, r in enumerate(live):
            key = self.steerer.key(self.slots[r])
            if z[r] is not None and accepted[i] < len(drafts[i]) and key in self.runner:
                items.append((key, len(self.generated[r]) + accepted[i], z[r][accepted[i]]))
        if items:
            self.runner.truncate_many(items)

    # ------------------------------------------------------------------ the target and the acceptance
    def _target(self, rows: list[int], pos: int, large: torch.Tensor, z, histories) -> torch.Tensor:
        """CoSteer's scores at drafted position ``pos`` for ``rows`` (what :meth:`Steerer.step` gives)."""
        st = self.steerer
        out = large.clone()
        ended = [j for j, r in enumerate(rows) if 0 <= self.fail_pos[r] <= pos]
        cand = [j for j, r in enumerate(rows) if z[r] is not None and j not in ended and pos < len(z[r])]
        if cand:
            slots = torch.tensor([self.slots[rows[j]] for j in cand])
            index = torch.tensor(cand, device=large.device)
            sub = large.index_select(0, index)
            keep = st.gate(slots, sub)
            keep |= torch.tensor([self.fail_pos[rows[j]] > pos for j in cand])  # failing later in this round
            keep &= ~(torch.isnan(sub) | torch.isposinf(sub)).any(dim=-1).cpu()
            picked = keep.nonzero().flatten()
            if picked.numel():
                sel = [cand[j] for j in picked.tolist()]
                z_with = torch.stack([z[rows[j]][pos][0] for j in sel])
                z_without = torch.stack([z[rows[j]][pos][1] for j in sel])
                at = index.index_select(0, picked.to(large.device))
                steered = st.combine(large.index_select(0, at), slots[picked], z_with, z_without,
                                     [histories[j] for j in sel])
                out.index_copy_(0, at, steered.to(out.dtype))
        return st.end(out, ended)

    def _verify(self, live, drafts, qs, z, logits, min_new):
        """Position by position: the target, then greedy matching or rejection sampling; returns per live row
        (accepted drafts, emitted tokens)."""
        n = len(live)
        accepted, emitted = [0] * n, [[] for _ in range(n)]
        going = list(range(n))
        pos = 0
        while going:
            large = logits[torch.tensor(going, device=logits.device), pos]
            for j, i in enumerate(going):
                if len(self.generated[live[i]]) + pos < min_new and self.stop:
                    large[j, torch.tensor(self.stop, device=large.device)] = NEG_INF
            rows = [live[i] for i in going]
            scores = self._target(rows, pos, large, z, [self.generated[live[i]] + emitted[i] for i in going])
            drafted = [pos < len(drafts[i]) for i in going]
            if self.sampling.greedy:
                choice = scores.argmax(-1).tolist()
                keep = [d and c == drafts[i][pos] for d, c, i in zip(drafted, choice, going)]
            else:
                p = warp(scores, self.sampling)
                choice = torch.multinomial(p, 1, generator=self.generator)[:, 0].tolist()  # the bonus draws
                keep = [False] * len(going)
                at = [j for j, d in enumerate(drafted) if d]
                if at:
                    sel = torch.tensor(at, device=p.device)
                    q = torch.stack([qs[going[j]][pos] for j in at]).to(p.device)
                    d = torch.tensor([drafts[going[j]][pos] for j in at], device=p.device)
                    ok, repl = ACCEPT(p.index_select(0, sel), q, d, self.generator)
                    for j, a, t in zip(at, ok.tolist(), repl.tolist()):
                        keep[j] = a
                        choice[j] = drafts[going[j]][pos] if a else t
            still = []
            for j, i in enumerate(going):
                emitted[i].append(choice[j])
                accepted[i] += keep[j]
                if keep[j] and choice[j] not in self.stop:
                    still.append(i)
            going = still
            pos += 1
        return accepted, emitted
