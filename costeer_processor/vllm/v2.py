"""CoSteer for vLLM's Model Runner V2 (the default GPU runner of vLLM 0.32).

V2 processors get ``add_request(slot, params)`` when a request takes a persistent slot and
``apply(logits, ctx)`` once per step, with :class:`LogitsContext` mapping logits rows to slots.
The token history is read from ``req_states.all_token_ids`` (prompt ``[:prompt_len]``, output
``[prompt_len : pos + 1]``) — the committed ids, so a resumed request (``prefill_len > prompt_len``)
and a request that skipped a step are re-synchronised by the runner. V2 never says when a slot is
freed: a steered slot missing from a step's batch gives up its small-model rows at once, and its
handle is closed when the slot is reused. A request added with output already generated
(``prefill_len > prompt_len``) is a resumed one and gets its handle (AdaCoSteer state) back; a
fresh request always gets its own, even when ``n > 1`` children share one SamplingParams object.

Load it by name with the V2 runner::

    LLM(model=large, logits_processors=["costeer_processor.vllm:CoSteerLogitsProcessorV2"],
        additional_config={"costeer": {"small_model": "/path/to/small"}})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .engine import Handle, SteeringEngine
from .frontend import validate_sampling_params

if TYPE_CHECKING:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

__all__ = ["CoSteerLogitsProcessorV2"]


# What this adapter reads of Model Runner V2's private request state (vllm/v1/worker/gpu/states.py,
# RequestState.__init__ in vLLM 0.32) and of its LogitsContext. Checked once at start-up, so a vLLM
# whose layout differs refuses to start the processor with a clear error instead of failing per step.
_STATE_FIELDS = {"prompt_len": "np", "prefill_len": "np", "all_token_ids": "gpu"}


def check_layout(req_states) -> None:
    """Refuses a Model Runner V2 whose request state lacks what this adapter reads (version drift)."""
    missing = [f"{name}.{attr}" for name, attr in _STATE_FIELDS.items()
               if not hasattr(getattr(req_states, name, None), attr)]
    missing += [name for name in ("max_num_reqs", "device") if not hasattr(req_states, name)]
    if missing:
        import vllm

        raise ValueError(f"CoSteer (Model Runner V2): vLLM {vllm.__version__} has no {', '.join(missing)} in its "
                         "request state; this adapter was written against vLLM 0.32 (use the V1 runner, or a "
                         "matching costeer_processor)")


class CoSteerLogitsProcessorV2(LogitsProcessor):
    """Model Runner V2 twin of :class:`~costeer_processor.vllm.CoSteerLogitsProcessor` (same settings)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, req_states: "LogitsProcRequestState"):
        self.req_states = req_states
        # With prompt embeddings allowed, vLLM fills the prompt's token ids with 0 (vllm/v1/request.py,
        # Request.__init__): such a prompt has no text to steer on, so the request is ended.
        self.embeds = bool(getattr(getattr(vllm_config, "model_config", None), "enable_prompt_embeds", False))
        self.engine = SteeringEngine.from_vllm_config(vllm_config, req_states.device)
        check_layout(req_states)
        self._slots: dict[int, Handle] = {}
        self._steered = np.zeros(int(req_states.max_num_reqs), dtype=bool)
        self._present = np.zeros_like(self._steered)  # steered slots that were in the last step's batch
        self.resumed = 0  # steered requests that (re)joined with output already generated (preemption)

    # ------------------------------------------------------------------ bookkeeping
    def _drop(self, slot: int) -> None:
        handle = self._slots.pop(slot, None)
        if handle is not None:
            self._steered[slot] = False
            self.engine.close(handle)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self._drop(req_idx)  # the slot's previous occupant (finished or preempted) is gone
        rs = self.req_states
        generated = int(rs.prefill_len.np[req_idx]) - int(rs.prompt_len.np[req_idx])
        old: dict[int, int] = {}
        if generated > 0:
            # Resumed after preemption: its handle may still sit in its old slot (freed without
            # notice, so absent from the last step). A fresh request never takes another's handle,
            # even when it shares the SamplingParams object (n > 1 children without a seed).
            old = {id(self._slots[s]): s for s in np.nonzero(self._steered & ~self._present)[0].tolist()}
        handle = self.engine.open(sampling_params, generated=generated,
                                  candidates=[self._slots[s] for s in old.values()])
        if handle is None:
            return False
        if generated > 0:
            self.resumed += 1
        slot = old.get(id(handle))
        if slot is not None:
            del self._slots[slot]
            self._steered[slot] = False
            self.engine.suspend(handle)
        self._slots[req_idx] = handle
        self._steered[req_idx] = True
        return True

    # ------------------------------------------------------------------ the step
    def apply(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
        if not self._slots:
            return logits
        slots_np = np.asarray(ctx.idx_mapping_np)
        valid = slots_np >= 0  # negative entries are padding
        hit = np.zeros(slots_np.shape, dtype=bool)
        hit[valid] = self._steered[slots_np[valid]]
        self._present[:] = False
        self._present[slots_np[hit]] = True
        # freed or unscheduled slots give up their small-model rows at once
        for slot in np.nonzero(self._steered & ~self._present)[0].tolist():
            self.engine.suspend(self._slots[slot])
        if not hit.any():
            return logits
        if logits.shape[0] != slots_np.shape[0]:
            self.engine.warn_once("expanded", "CoSteer: logits rows != requests (speculative decoding?); "
                                   "steering skipped (logged once)")
            return logits
        rows = np.nonzero(hit)[0]
        slots = slots_np[rows]
        rs = self.req_states
        pos = ctx.pos.index_select(0, torch.as_tensor(rows, device=ctx.pos.device)).cpu().numpy()
        prompt_len = np.asarray(rs.prompt_len.np)[slots]
        done = pos + 1 >= np.asarray(rs.prefill_len.np)[slots]  # else a chunk of a longer prefill: sample discarded
        if not done.all():
            rows, slots, pos, prompt_len = rows[done], slots[done], pos[done], prompt_len[done]
            if rows.size == 0:
                return logits
        all_ids = rs.all_token_ids.gpu
        width = int(pos.max()) + 1
        tokens = all_ids[:, :width].index_select(0, torch.as_tensor(slots, device=all_ids.device)).cpu().tolist()
        handles = [self._slots[s] for s in slots.tolist()]
        outputs = []
        for handle, seq, p, n in zip(handles, tokens, pos.tolist(), prompt_len.tolist()):
            if handle.needs_prompt:
                if self.embeds and not any(seq[:n]):
                    self.engine.fail(handle, "the prompt came as embeddings (no token ids to steer on)")
                else:
                    self.engine.set_prompt(handle, seq[:n])
            outputs.append(seq[n: p + 1])
        return self.engine.apply(logits, rows.tolist(), handles, outputs)

    # ------------------------------------------------------------------ introspection (tests)
    @property
    def runner(self):
        return self.engine.runner
