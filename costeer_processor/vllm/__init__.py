"""CoSteer inside vLLM: logits processors for the V1 model runner and for Model Runner V2.

* :class:`CoSteerLogitsProcessor` — ``vllm.v1.sample.logits_processor.LogitsProcessor`` (V1 runner:
  vLLM's CPU backend and GPU engines started with the V1 runner).
* :class:`CoSteerLogitsProcessorV2` — ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``
  (Model Runner V2, the default GPU runner of vLLM 0.32).

Both load by qualified name (``"costeer_processor.vllm:CoSteerLogitsProcessor"``), read engine-wide
settings from ``additional_config["costeer"]`` (env fallback ``COSTEER_<KEY>``) and steer only
requests whose ``extra_args`` / ``vllm_xargs`` carry ``costeer_context``. See ``docs/vllm.md``.
:func:`processor_fqcn` names the class for the runner vLLM will use.

Layers: :mod:`.settings` (engine settings, request arguments), :mod:`.frontend` (the admission
check in the API server), :mod:`.engine` (the per-step work), :mod:`.v1` / :mod:`.v2` (adapters).

Example::

    >>> from types import SimpleNamespace
    >>> processor_fqcn(SimpleNamespace(use_v2_model_runner=False))
    'costeer_processor.vllm:CoSteerLogitsProcessor'
    >>> processor_fqcn(SimpleNamespace(use_v2_model_runner=True))
    'costeer_processor.vllm:CoSteerLogitsProcessorV2'
"""

from typing import Any, Optional

from .engine import SteeringEngine
from .frontend import validate_sampling_params
from .settings import REQUEST_ARGS, EngineSettings, RequestArgs, parse_request_args
from .v1 import CoSteerLogitsProcessor
from .v2 import CoSteerLogitsProcessorV2

V1_PROCESSOR = "costeer_processor.vllm:CoSteerLogitsProcessor"
V2_PROCESSOR = "costeer_processor.vllm:CoSteerLogitsProcessorV2"

__all__ = [
    "CoSteerLogitsProcessor",
    "CoSteerLogitsProcessorV2",
    "EngineSettings",
    "RequestArgs",
    "REQUEST_ARGS",
    "parse_request_args",
    "validate_sampling_params",
    "SteeringEngine",
    "uses_model_runner_v2",
    "processor_fqcn",
    "worker_stats",
    "engine_stats",
    "V1_PROCESSOR",
    "V2_PROCESSOR",
]


def uses_model_runner_v2(vllm_config: Optional[Any] = None) -> bool:
    """Whether vLLM runs (or will run) Model Runner V2, decided the way vLLM 0.32 decides it.

    With an engine config: its own ``use_v2_model_runner`` (``VLLM_USE_V2_MODEL_RUNNER``, Triton,
    features V2 lacks, features only V2 has). Before an engine exists: ``VLLM_USE_V2_MODEL_RUNNER``
    when set, else whether Triton is usable (vLLM's CPU backend has no Triton: V1).
    """
    if vllm_config is not None:
        return bool(vllm_config.use_v2_model_runner)
    import vllm.envs as envs

    forced = envs.VLLM_USE_V2_MODEL_RUNNER
    if forced is not None:
        return bool(forced)
    from vllm import triton_utils

    return bool(triton_utils.HAS_TRITON)


def processor_fqcn(vllm_config: Optional[Any] = None) -> str:
    """``"module:Class"`` of the CoSteer processor for the model runner vLLM will use (``--logits-processors``)."""
    return V2_PROCESSOR if uses_model_runner_v2(vllm_config) else V1_PROCESSOR


def worker_stats(worker) -> list[dict]:
    """Small-model state of every CoSteer processor in one vLLM worker (for ``collective_rpc``).

    Returns one dict per processor: ``requests`` (registered in the runner), ``cached_rows``,
    ``kv_tokens`` (tokens in the packed KV cache), ``steered_handles``, ``parked`` (handles of requests that left
    the batch but may come back), ``steps`` (applies that ran the small model), ``forwards``
    (batched small-model forwards), ``resumed`` (steered requests that re-joined the batch with
    output already generated: preemption / resumption) and ``context_cache`` (its
    :meth:`~costeer_processor.kv_cache.ContextCache.stats`).
    """
    runner_obj = getattr(worker, "model_runner", worker)
    procs = []
    batch = getattr(runner_obj, "input_batch", None)
    lps = getattr(batch, "logitsprocs", None)
    if lps is not None:
        procs += [p for p in lps.all if isinstance(p, CoSteerLogitsProcessor)]
    sampler = getattr(runner_obj, "sampler", None)
    for p in getattr(sampler, "logits_processors", []) or []:
        if isinstance(p, CoSteerLogitsProcessorV2):
            procs.append(p)
    out = []
    for p in procs:
        r = p.engine.runner
        handles = p._rows if isinstance(p, CoSteerLogitsProcessor) else p._slots
        out.append({"requests": len(r), "cached_rows": r.cached_rows, "kv_tokens": r.kv_tokens,
                    "steered_handles": len(handles), "parked": len(p.engine.parking),
                    "steps": p.engine.steps, "forwards": r.forward_count,
                    "resumed": getattr(p, "resumed", 0), "context_cache": r.context_cache.stats()})
    return out


def engine_stats(llm) -> list[dict]:
    """:func:`worker_stats` over all workers of an offline ``vllm.LLM`` (flattened).

    With the multiprocess engine, vLLM only ships a function to its workers when
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``.
    """
    return [s for per_worker in llm.collective_rpc(worker_stats) for s in per_worker]
