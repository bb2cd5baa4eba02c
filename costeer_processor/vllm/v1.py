"""CoSteer as a vLLM V1 logits processor (the V1 model runner: vLLM's CPU backend, older GPU paths).

Load it by name::

    LLM(model=large, logits_processors=["costeer_processor.vllm:CoSteerLogitsProcessor"],
        additional_config={"costeer": {"small_model": "/path/to/small"}})

Per-row state is a dict ``batch index -> (Handle, live output-ids list)`` kept in step with
vLLM's persistent batch the way the built-in processors do it (removed, then added, then moved:
one-way moves and swaps); everything else lives in :class:`~.engine.SteeringEngine`. A row that
leaves (removed, or overwritten by an add or a move) is closed with its live output ids, so the
engine can tell a finished request from one that will come back; a request added with output
already generated is a resumed one and gets its handle back.
"""

from __future__ import annotations

from typing import Optional

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .engine import Handle, SteeringEngine
from .frontend import validate_sampling_params

__all__ = ["CoSteerLogitsProcessor"]


class CoSteerLogitsProcessor(LogitsProcessor):
    """Steers each request that carries ``costeer_context`` with the engine's small model.

    Engine-wide settings: ``additional_config["costeer"]`` (see :class:`~.settings.EngineSettings`);
    per request: ``SamplingParams(extra_args={"costeer_context": ..., ...})`` or the server's
    ``extra_body={"vllm_xargs": {...}}``. Requests without ``costeer_context`` are untouched, and
    :meth:`apply` returns at once when no row of the batch is steered.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.engine = SteeringEngine.from_vllm_config(vllm_config, device)
        self._rows: dict[int, tuple[Handle, list[int]]] = {}
        self.resumed = 0  # steered requests that (re)joined with output already generated (preemption)

    def is_argmax_invariant(self) -> bool:
        return False  # steering changes the greedy choice

    # ------------------------------------------------------------------ bookkeeping
    def _drop(self, index: int) -> None:
        entry = self._rows.pop(index, None)
        if entry is not None:
            self.engine.close(*entry)

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            # An added request may take the index of one that finished in the same step.
            self._drop(index)
            handle = self.engine.open(params, generated=len(output_ids) if output_ids else 0)
            if handle is None:
                continue
            if output_ids:
                self.resumed += 1
            if handle.needs_prompt:
                if prompt_ids is None:  # fail closed: such a request is ended, never run unsteered
                    self.engine.fail(handle, "vLLM gave no prompt token ids (prompt embeddings?)")
                else:
                    self.engine.set_prompt(handle, prompt_ids)
            self._rows[index] = (handle, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                ea, eb = self._rows.pop(a, None), self._rows.pop(b, None)
                if ea is not None:
                    self._rows[b] = ea
                if eb is not None:
                    self._rows[a] = eb
            else:  # one-way a -> b: whatever sat at b is gone
                entry = self._rows.pop(a, None)
                self._drop(b)
                if entry is not None:
                    self._rows[b] = entry

    # ------------------------------------------------------------------ the step
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        n = logits.shape[0]
        rows = sorted(i for i in self._rows if i < n)
        if not rows:
            return logits
        entries = [self._rows[i] for i in rows]
        return self.engine.apply(logits, rows, [e[0] for e in entries], [e[1] for e in entries])

    # ------------------------------------------------------------------ introspection (tests)
    @property
    def runner(self):
        return self.engine.runner

    @property
    def steered_rows(self) -> dict[int, Handle]:
        return {i: e[0] for i, e in self._rows.items()}
