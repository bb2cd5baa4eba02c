"""``costeer proxy``: a local OpenAI-compatible server on the device, decoding every request in split mode.

Point any OpenAI client at it (``base_url="http://127.0.0.1:8100/v1"``): each request is steered
by a personal context that stays on this device (a profile file or an inline
``costeer_context``), while the large model runs on an unmodified remote ``vllm serve`` (the
upstream) that sees token ids and returns log-probs only. Concurrent requests share one
small-model runner: a scheduler thread runs one upstream request and one batched small-model
step per round for all of them.

Modules: :mod:`.profiles` (the profile store), :mod:`.settings` (request bodies, checked),
:mod:`.decoder` (split decoding with per-request settings), :mod:`.scheduler` (the rounds),
:mod:`.output` (text, stop strings, OpenAI shapes), :mod:`.service` (the state),
:mod:`.app` (the HTTP routes), :mod:`.page` (the page at ``/``). See ``docs/proxy.md``.
"""

from .profiles import ProfileStore, UnknownProfileError
from .service import ProxyService
from .settings import Defaults, RequestError

__all__ = ["ProxyService", "ProfileStore", "UnknownProfileError", "Defaults", "RequestError", "create_app",
           "serve", "is_loopback"]


def create_app(service: ProxyService):
    """The Starlette app over ``service`` (imported lazily: Starlette is only needed to serve)."""
    from .app import create_app as _create

    return _create(service)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(service: ProxyService, host: str = "127.0.0.1", port: int = 8100, log_level: str = "info") -> None:
    """Serves ``service`` with uvicorn until interrupted (binding another host than loopback needs an API key)."""
    import uvicorn

    if not is_loopback(host) and not service.api_key:
        raise ValueError(f"--host {host} accepts connections from other machines: set an API key "
                         "(--api-key or COSTEER_PROXY_API_KEY)")
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
