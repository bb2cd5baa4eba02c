"""CoSteer for vLLM's Model Runner V2 (the default GPU runner of vLLM 0.32).

V2 processors get ``add_request(slot, params)`` when a request takes a persistent slot and
``apply(logits, ctx)`` once per step, with :class:`LogitsContext` mapping logits rows to slots.
The token history is read from ``req_states.all_token_ids`` (prompt ``[:prompt_len]``, output
``[prompt_len : pos + 1]``) — the committed ids, so a resumed request (``prefill_len > prompt_len``)
and a request that skipped a step are re-synchronised by the runner. V2 never says when a slot is
freed: a steered slot missing from a step's batch gives up its small-model rows at once, and its
handle is dropped when the slot is reused.

Load it by name with the V2 runner::

    LLM(model=large, logits_processors=["costeer_processor.vllm:CoSteerLogitsProcessorV2"],
        additional_config={"costeer": {"small_model": "/path/to/small"}})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .common import Handle, SteeringEngine, validate_sampling_params

if TYPE_CHECKING:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

__all__ = ["CoSteerLogitsProcessorV2"]


class CoSteerLogitsProcessorV2(LogitsProcessor):
    """Model Runner V2 twin of :class:`~costeer_processor.vllm.CoSteerLogitsProcessor` (same settings)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, req_states: "LogitsProcRequestState"):
        self.req_states = req_states
        self.engine = SteeringEngine.from_vllm_config(vllm_config, req_states.device)
        self._slots: dict[int, Handle] = {}
        self._steered = np.zeros(int(req_states.max_num_reqs), dtype=bool)

    # ------------------------------------------------------------------ bookkeeping
    def _drop(self, slot: int) -> None:
        handle = self._slots.pop(slot, None)
        if handle is not None:
            self._steered[slot] = False
            self.engine.close(handle)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self._drop(req_idx)  # the slot's previous occupant (finished or preempted) is gone
        for slot, other in list(self._slots.items()):
            if other.params is sampling_params:
                # A preempted request resumed in another slot: keep its AdaCoSteer state.
                del self._slots[slot]
                self._steered[slot] = False
                self.engine.suspend(other)
                handle = other
                break
        else:
            handle = self.engine.open(sampling_params)
        if handle is None:
            return False
        self._slots[req_idx] = handle
        self._steered[req_idx] = True
        return True

    # ------------------------------------------------------------------ the step
    def apply(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
        if not self._slots:
            return logits
        slots_np = np.asarray(ctx.idx_mapping_np)
        hit = self._steered[slots_np] & (slots_np >= 0)  # negative entries are padding
        if hit.any():
            present = set(slots_np[hit].tolist())
        else:
            present = set()
        for slot, handle in self._slots.items():  # freed or unscheduled slots give up their KV rows
            if handle.in_runner and slot not in present:
                self.engine.suspend(handle)
        if not present:
            return logits
        if logits.shape[0] != slots_np.shape[0]:
            self.engine._warn_once("expanded", "CoSteer: logits rows != requests (speculative decoding?); "
                                   "steering skipped")
            return logits
        rows = np.nonzero(hit)[0]
        slots = slots_np[rows]
        rs = self.req_states
        pos = ctx.pos.index_select(0, torch.as_tensor(rows, device=ctx.pos.device)).cpu().tolist()
        prompt_len = np.asarray(rs.prompt_len.np)[slots].tolist()
        prefill_len = np.asarray(rs.prefill_len.np)[slots].tolist()
        width = max(pos) + 1
        all_ids = rs.all_token_ids.gpu
        tokens = all_ids[:, :width].index_select(0, torch.as_tensor(slots, device=all_ids.device)).cpu()

        use_rows, handles, outputs = [], [], []
        for j, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
            if pos[j] + 1 < prefill_len[j]:
                continue  # a chunk of a longer prefill: vLLM discards this row's sample
            handle = self._slots[slot]
            seq = tokens[j, : pos[j] + 1].tolist()
            if handle.needs_prompt:
                self.engine.set_prompt(handle, seq[: prompt_len[j]])
            use_rows.append(row)
            handles.append(handle)
            outputs.append(seq[prompt_len[j]:])
        if not use_rows:
            return logits
        return self.engine.apply(logits, use_rows, handles, outputs)

    # ------------------------------------------------------------------ introspection (tests)
    @property
    def runner(self):
        return self.engine.runner
