"""Split mode: the large model is an unmodified remote ``vllm serve``; the context never leaves the device.

The device holds the small model (a :class:`~costeer_processor.SmallModelRunner`) and the user's
personal context. For every generated position it asks the server for the large model's
next-token log-probabilities of the current prefix (token ids in, token ids out, over the
OpenAI-compatible ``/v1/completions`` endpoint), runs the two small-model branches locally,
steers with :func:`costeer_processor.core.steer` and appends the chosen token. The server
needs no CoSteer code at all::

    python -m vllm.entrypoints.openai.api_server --model LARGE --max-logprobs -1 \\
        --enable-prefix-caching          # (``vllm serve LARGE ...`` on a normal vLLM install)

What crosses the wire (the only requests this package makes):

* on every new connection, ``GET /v1/models`` and ``POST /tokenize`` of a fixed public probe
  string (the server must still serve the same model and tokenizer after a reconnect);
* ``POST /v1/completions`` with ``prompt`` = the token ids of the chat-templated *public* prompt
  followed by the tokens generated so far, and sampling settings.

The personal context, its text and its token ids are never sent (``tests/test_split.py``
checks this through a recording proxy). The server does see the prompt and every generated
token, and the generated text is shaped by the context: what it reveals about the context is
whatever the answer itself reveals.

Round trips are cut three ways, all exact for greedy decoding: **overlap** (the small model
runs while the server answers), **look-ahead** (one request returns up to ``lookahead``
proposals, accepted while steering agrees) and the **hand-off** (after AdaCoSteer gating the
server finishes alone in one stream). Every request is retried with back-off on connection
errors, timeouts and HTTP 5xx/429; a generation's state is just its accepted token ids, so a
restarted server resumes where the device stands.

Layers, each a short module:

* :mod:`.transport`: HTTP (one kept-alive connection per thread) and the ONE retry policy;
* :mod:`.protocol`: request bodies, reading the answers, the per-connection probe (:class:`~.protocol.Server`);
* :mod:`.certify`: the top-k certificate and the escalation by rank;
* :mod:`.decode`: rounds, look-ahead, hand-off, the sampling choice, the counters;
* :mod:`.client`: :class:`SplitCoSteerClient`, :func:`generate_split`, :func:`load_runner`.

Example (skipped: it needs a real model and a running ``vllm serve``; ``tests/test_split.py``
runs the same against a fake server)::

    >>> from costeer_processor.split import SplitCoSteerClient, load_runner
    >>> runner = load_runner("qwen2.5-0.5b-instruct")  # doctest: +SKIP
    >>> SplitCoSteerClient("http://127.0.0.1:8000", runner).generate("Plan my weekend.", "I love hiking.").text  # doctest: +SKIP
"""

from .client import SplitCoSteerClient, generate_split, load_runner
from .decode import Counters, SplitResult
from .protocol import PROBE_TEXT
from .transport import RetryPolicy, ServerUnavailableError, SplitModeError, Transport

__all__ = [
    "SplitCoSteerClient",
    "SplitResult",
    "Counters",
    "SplitModeError",
    "ServerUnavailableError",
    "generate_split",
    "load_runner",
    "PROBE_TEXT",
    "RetryPolicy",
    "Transport",
]
