"""Every place CoSteer reads vLLM internals, in one module, checked at start-up.

CoSteer was written against vLLM |TESTED|. Three things it needs are not part of vLLM's public
processor interface:

* **the admission frame** (:func:`caller_context`): ``validate_params`` receives only the
  SamplingParams, so the engine config, the prompt's token ids and its ``cache_salt`` are read from
  the calling frame ``InputProcessor.process_inputs(self, request_id, prompt, params, ...)``
  (``vllm/v1/engine/input_processor.py``: ``process_inputs`` line 373 calls ``self._validate_params``
  line 389, which calls ``self.validate_logits_processors_params(params)`` line 177; ``prompt`` is
  the rendered ``EngineInput`` dict holding ``prompt_token_ids`` and ``cache_salt``, read at lines
  441 and 548; ``self.vllm_config`` is set at line 49);
* **Model Runner V2's buffers** (the accessors below, for :mod:`~costeer_processor.vllm.v2`): the
  host copies ``UvaBackedTensor.np`` and the device tensor ``StagedWriteTensor.gpu``
  (``vllm/v1/worker/gpu/buffer_utils.py``);
* **the current engine config** (:func:`current_vllm_config`, ``vllm.config.get_current_vllm_config_or_none``).

:func:`startup_check` (run once per process when :mod:`~costeer_processor.vllm.frontend` is
imported, i.e. when vLLM loads the processor class, and when the HTTP middleware starts) compares
vLLM's version with the tested range and reads vLLM's *source* (no import) to confirm that the
frame layout above still holds; what it cannot confirm is logged as a loud warning, once, and shows
in :func:`status`. A request whose admission frame is not found at run time is counted there too,
and the frontend then keys its small-model context cache to that request alone (no sharing across
tenants), never silently dropping the ``cache_salt``.

Example::

    >>> s = status()
    >>> sorted(k for k in s if k.endswith("_readable"))
    ['cache_salt_readable', 'engine_config_readable', 'prompt_ids_readable', 'v2_fields_readable']
    >>> s["tested_range"]
    '0.32.x'
    >>> caller_context().prompt_ids is None   # not called from vLLM's admission: nothing to read
    True
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple, Optional

__all__ = ["CallerContext", "TESTED", "batch_positions", "batch_slots", "caller_context", "current_vllm_config",
           "note_frame_missing", "slot_prefill_len", "slot_prompt_len", "slot_token_ids", "startup_check",
           "status", "version_supported", "vllm_version"]

TESTED = (0, 32)  # vLLM major.minor this module was read from (every line number quoted here is 0.32.0's)
MAX_FRAMES = 16  # validate_params is 4 frames below process_inputs in 0.32; a little slack

try:  # vLLM's logger tree, so messages show up formatted like the engine's own
    from vllm.logger import init_logger

    logger = init_logger("vllm.costeer")
except ImportError:  # pragma: no cover - vLLM missing
    logger = logging.getLogger("costeer_processor.vllm")

__doc__ = __doc__.replace("|TESTED|", f"{TESTED[0]}.{TESTED[1]}.x")

_lock = threading.Lock()
_status: Optional[dict] = None
_counters = {"frames_missing": 0}


# ---------------------------------------------------------------------------------------------
# version and start-up self-check
# ---------------------------------------------------------------------------------------------
def vllm_version() -> Optional[str]:
    """The installed vLLM's version string, ``None`` without vLLM."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "") or "") or None


def version_supported(version: Optional[str]) -> bool:
    """Whether ``version`` is in the range this module was read from (``0.32.x``)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", version or "")
    return bool(m) and (int(m[1]), int(m[2])) == TESTED


def _vllm_dir() -> Optional[Path]:
    mod = sys.modules.get("vllm")
    if mod is None:
        try:
            import vllm as mod
        except ImportError:
            return None
    return Path(mod.__file__).parent if getattr(mod, "__file__", None) else None


def _method(tree: ast.Module, cls: str, name: str) -> Optional[ast.FunctionDef]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    return None


def _calls(fn: Optional[ast.FunctionDef], attr: str) -> bool:
    """Whether ``fn`` calls ``self.<attr>(params, ...)``."""
    return fn is not None and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"
        and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id == "params"
        for n in ast.walk(fn))


def _mentions(fn: Optional[ast.FunctionDef], key: str) -> bool:
    return fn is not None and any(isinstance(n, ast.Constant) and n.value == key for n in ast.walk(fn))


def _read_layout(root: Optional[Path]) -> tuple[dict, list[str]]:
    """(what the admission frame offers, problems), from vLLM's source text."""
    found = {"engine_config_readable": False, "prompt_ids_readable": False, "cache_salt_readable": False}
    if root is None:
        return found, ["vLLM is not installed"]
    path = root / "v1" / "engine" / "input_processor.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as e:
        return found, [f"cannot read {path}: {e}"]
    problems = []
    init = _method(tree, "InputProcessor", "__init__")
    proc = _method(tree, "InputProcessor", "process_inputs")
    validate = _method(tree, "InputProcessor", "_validate_params")
    args = [a.arg for a in proc.args.args] if proc is not None else []
    if proc is None or args[:4] != ["self", "request_id", "prompt", "params"]:
        problems.append("InputProcessor.process_inputs(self, request_id, prompt, params, ...) not found")
    elif not (_calls(proc, "_validate_params") and _calls(validate, "validate_logits_processors_params")):
        problems.append("process_inputs no longer runs the processors' validate_params through "
                        "self._validate_params(params) -> self.validate_logits_processors_params(params)")
    else:
        found["engine_config_readable"] = init is not None and any(
            isinstance(n, ast.Attribute) and n.attr == "vllm_config" and isinstance(n.ctx, ast.Store)
            for n in ast.walk(init))
        found["prompt_ids_readable"] = _mentions(proc, "prompt_token_ids")
        found["cache_salt_readable"] = _mentions(proc, "cache_salt")
        problems += [f"the admission frame no longer shows {what}" for key, what in (
            ("engine_config_readable", "self.vllm_config"), ("prompt_ids_readable", "prompt['prompt_token_ids']"),
            ("cache_salt_readable", "prompt['cache_salt']")) if not found[key]]
    return found, problems


def _assigns(tree: ast.Module, cls: str, attr: str) -> bool:
    """Whether class ``cls`` assigns ``self.<attr>`` somewhere."""
    return any(isinstance(node, ast.ClassDef) and node.name == cls and any(
        isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.ctx, ast.Store) for n in ast.walk(node))
        for node in tree.body)


def _read_v2_layout(root: Optional[Path]) -> list[str]:
    """Problems with the Model Runner V2 fields the accessors below read (empty: all there)."""
    if root is None:
        return []
    gpu = root / "v1" / "worker" / "gpu"
    try:
        buffers = ast.parse((gpu / "buffer_utils.py").read_text(encoding="utf-8"))
        interface = ast.parse((gpu / "sample" / "logits_processor" / "interface.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as e:
        return [f"cannot read Model Runner V2's sources: {e}"]
    fields = {(node.name, item.target.id) for node in interface.body if isinstance(node, ast.ClassDef)
              for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    wanted = {("LogitsProcRequestState", f) for f in ("device", "max_num_reqs", "all_token_ids", "prompt_len",
                                                      "prefill_len")}
    wanted |= {("LogitsContext", "idx_mapping_np"), ("LogitsContext", "pos")}
    problems = [f"Model Runner V2: {c}.{f} not found" for c, f in sorted(wanted - fields)]
    problems += [f"Model Runner V2: {c}.{a} not found" for c, a in (("UvaBackedTensor", "np"),
                                                                     ("StagedWriteTensor", "gpu"))
                 if not _assigns(buffers, c, a)]
    return problems


def startup_check(force: bool = False) -> dict:
    """Checks vLLM's version and admission-frame layout once per process; returns :func:`status`.

    Logs one loud warning per problem found (a version outside ``0.32.x``, a layout that no longer
    shows the engine config, the prompt ids or the ``cache_salt``, a Model Runner V2 field the
    accessors below read). ``force``: check again.
    """
    global _status
    with _lock:
        if _status is not None and not force:
            return status()
        version = vllm_version()
        root = _vllm_dir()
        found, problems = _read_layout(root)
        v2_problems = _read_v2_layout(root)
        supported = version_supported(version)
        _status = {"vllm_version": version, "tested_range": f"{TESTED[0]}.{TESTED[1]}.x",
                   "version_supported": supported, **found, "v2_fields_readable": not v2_problems,
                   "problems": problems + v2_problems}
        problems = _status["problems"]
    if version is not None and not supported:
        logger.warning("CoSteer: WARNING: vLLM %s is outside the range CoSteer was written against (%s); "
                       "its admission check and tenant isolation rely on vLLM internals: run the "
                       "tests (tests/test_vllm_offline.py, tests/test_vllm_http_input.py) before serving",
                       version, _status["tested_range"])
    for problem in problems:
        logger.warning("CoSteer: WARNING: %s (vLLM %s). %s", problem, version, _consequence(problem))
    return status()


def _consequence(problem: str) -> str:
    if "cache_salt" in problem:
        return ("Without the cache_salt each steered request keeps its small-model context cache to "
                "itself (no reuse, no sharing across tenants).")
    if problem.startswith("Model Runner V2"):
        return "The V2 processor cannot read its batch: run tests/test_vllm_v2.py before serving with V2."
    return "The admission check runs on what it can still see and refuses what it cannot check."


def status() -> dict:
    """What this process could read of vLLM: version, ``*_readable`` flags, problems, counters.

    ``frames_missing`` counts steered requests whose admission frame was not found at run time.
    """
    if _status is None:
        return startup_check()
    return {**_status, "problems": list(_status["problems"]), **_counters}


def note_frame_missing() -> None:
    """Counts a steered request whose admission frame was not found; warns loudly the first time."""
    with _lock:
        _counters["frames_missing"] += 1
        first = _counters["frames_missing"] == 1
    if first:
        logger.warning("CoSteer: WARNING: validate_params was not called from vLLM's "
                       "InputProcessor.process_inputs (vLLM %s): the prompt and its cache_salt are not "
                       "visible; such requests are checked on their context alone and keep their "
                       "small-model context cache to themselves (counted in compat.status())",
                       vllm_version())


# ---------------------------------------------------------------------------------------------
# the admission frame
# ---------------------------------------------------------------------------------------------
class CallerContext(NamedTuple):
    """What vLLM's admission frame shows: ``None`` for what is not visible.

    ``found``: the ``process_inputs`` frame was found (so a ``None`` ``cache_salt`` means the request
    has none, not that it could not be read).
    """

    vllm_config: Any
    prompt_ids: Optional[list[int]]
    cache_salt: Optional[str]
    found: bool = False


def _is_process_inputs(code) -> bool:
    mod = sys.modules.get("vllm.v1.engine.input_processor")
    fn = getattr(getattr(mod, "InputProcessor", None), "process_inputs", None)
    if fn is not None and getattr(fn, "__code__", None) is code:
        return True
    return code.co_name == "process_inputs"  # a wrapped or re-loaded function: the name still tells


def caller_context(depth: int = 1) -> CallerContext:
    """The engine config, prompt ids and ``cache_salt`` of the vLLM frame validating this request.

    Walks at most :data:`MAX_FRAMES` frames up from ``depth`` frames above this call, to
    ``InputProcessor.process_inputs``: its ``self.vllm_config`` (line 49 of vLLM 0.32's
    ``input_processor.py``) and its ``prompt`` local (``prompt["prompt_token_ids"]``,
    ``prompt.get("cache_salt")``, lines 441 and 548). Without that frame the config comes from
    :func:`current_vllm_config` and the prompt is unknown (``found=False``).
    """
    cfg, prompt_ids, salt, found = None, None, None, False
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
        for _ in range(MAX_FRAMES):
            if frame is None:
                break
            if _is_process_inputs(frame.f_code):
                found = True
                local = frame.f_locals
                candidate = getattr(local.get("self"), "vllm_config", None)
                if candidate is not None and hasattr(candidate, "model_config"):
                    cfg = candidate
                prompt = local.get("prompt")
                if isinstance(prompt, dict):
                    ids = prompt.get("prompt_token_ids")
                    if isinstance(ids, list) and all(isinstance(t, int) for t in ids[:4]):
                        prompt_ids = ids
                    got = prompt.get("cache_salt")
                    salt = got if isinstance(got, str) and got else None
                break
            frame = frame.f_back
    finally:
        del frame
    if cfg is None:
        cfg = current_vllm_config()
    return CallerContext(cfg, prompt_ids, salt, found)


def current_vllm_config() -> Any:
    """``vllm.config.get_current_vllm_config_or_none()`` (``vllm/config/vllm.py`` line 3493); ``None``
    when this vLLM lacks it."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    return get_current_vllm_config_or_none()


# ---------------------------------------------------------------------------------------------
# Model Runner V2 (vllm/v1/worker/gpu/sample/logits_processor/interface.py, buffer_utils.py)
# ---------------------------------------------------------------------------------------------
def slot_prompt_len(req_states) -> Any:
    """``[max_num_reqs]`` prompt lengths per slot, a host numpy view.

    ``LogitsProcRequestState.prompt_len`` (interface.py line 43, a ``UvaBackedTensor``) and its
    host array ``.np`` (buffer_utils.py line 120, ``self.np = self.cpu.numpy()``).
    """
    return req_states.prompt_len.np


def slot_prefill_len(req_states) -> Any:
    """``[max_num_reqs]`` tokens fed at each slot's latest (re)fill (prompt + output kept over a
    preemption), a host numpy view: ``LogitsProcRequestState.prefill_len`` (interface.py line 46)
    ``.np`` (buffer_utils.py line 120)."""
    return req_states.prefill_len.np


def slot_token_ids(req_states) -> Any:
    """``[max_num_reqs, max_model_len]`` committed token ids per slot, on the device.

    ``LogitsProcRequestState.all_token_ids`` (interface.py line 41, a ``StagedWriteTensor``) and its
    device tensor ``.gpu`` (buffer_utils.py lines 158 / 163).
    """
    return req_states.all_token_ids.gpu


def batch_slots(ctx) -> Any:
    """``[num_reqs]`` batch position -> persistent slot, on the host (negative: padding):
    ``LogitsContext.idx_mapping_np`` (interface.py line 79)."""
    return ctx.idx_mapping_np


def batch_positions(ctx) -> Any:
    """``[num_logits_rows]`` position of each row within its sequence, on the device:
    ``LogitsContext.pos`` (interface.py line 85)."""
    return ctx.pos
