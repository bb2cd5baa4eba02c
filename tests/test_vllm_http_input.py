"""CoSteer arguments as they arrive over HTTP: raw JSON checks, near-miss keys, streamed refusals, vLLM coupling.

* The middleware (:mod:`costeer_processor.vllm.middleware`) against a stub ASGI app: bodies handed on
  intact, large / non-JSON bodies untouched, a streamed first-event error turned into an HTTP error.
* Near misses of a CoSteer key refused offline (``validate_params``) with a did-you-mean.
* :mod:`costeer_processor.vllm.compat`: the version / layout self-check on a changed vLLM source, and
  the frontend's answer when the cache_salt cannot be read (no silent drop).
* One real ``vllm serve`` (module-scoped), started with the flags ``costeer serve`` passes, driven with
  the ``openai`` client and raw ``httpx``: booleans, near misses, streamed refusals as HTTP 400.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

NEAR_MISSES = ["Costeer_context", "costeer-context", "costeerContext", "COSTEER_CONTEXT", " costeer_context"]
BOOLEANS = [("costeer_T", True, "costeer_T must be an integer, got bool True"),
            ("costeer_strength", True, "costeer_strength must be a number, got bool True"),
            ("costeer_gate_patience", False, "costeer_gate_patience must be an integer, got bool False"),
            ("costeer_eos_guard", True, "costeer_eos_guard must be a number, got bool True"),
            ("costeer_context", True, "costeer_context must be a string, got bool True")]
CONTAINERS = [("costeer_T", {"a": 1}, "costeer_T must be an integer, got JSON object"),
              ("costeer_alpha", [1.0], "costeer_alpha must be a number, got JSON array")]


# ------------------------------------------------------------------------------------------------
# the middleware against a stub app (no server)
# ------------------------------------------------------------------------------------------------
class StubApp:
    """Reads the whole body, then answers with ``response`` (a list of ASGI send messages)."""

    def __init__(self, response=None):
        self.bodies, self.chunks = [], []
        self.response = response

    async def __call__(self, scope, receive, send):
        body, chunks = b"", 0
        while True:
            m = await receive()
            assert m["type"] == "http.request"
            body += m.get("body", b"")
            chunks += 1
            if not m.get("more_body", False):
                break
        self.bodies.append(body)
        self.chunks.append(chunks)
        for m in self.response or [
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
                {"type": "http.response.body", "body": b'{"ok": true}'}]:
            await send(m)


def drive(app, body: bytes, *, path="/v1/chat/completions", method="POST", chunk=None, max_body_bytes=None,
          content_type=b"application/json", declare_length=True):
    from costeer_processor.vllm.middleware import CoSteerArgsMiddleware

    mw = CoSteerArgsMiddleware(app, max_body_bytes=max_body_bytes)
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    headers = [(b"content-type", content_type)]
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a real server's receive waits for the disconnect

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    return sent


def status_and_json(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def request(xargs, **extra) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **extra,
                       "vllm_xargs": xargs}).encode()


@pytest.mark.parametrize("key,value,message", BOOLEANS + CONTAINERS)
def test_middleware_refuses_json_booleans_and_containers_naming_the_key(key, value, message):
    app = StubApp()
    sent = drive(app, request({"costeer_context": "I am vegan.", key: value}))
    assert status_and_json(sent) == (400, {"error": {"message": message, "type": "BadRequestError",
                                                     "param": f"vllm_xargs.{key}", "code": 400}})
    assert app.bodies == []  # refused before vLLM parses it


@pytest.mark.parametrize("key", NEAR_MISSES)
def test_middleware_refuses_near_misses_with_a_suggestion(key):
    status, doc = status_and_json(drive(StubApp(), request({key: "I am vegan."})))
    assert status == 400 and "did you mean 'costeer_context'?" in doc["error"]["message"]
    assert doc["error"]["param"] == f"vllm_xargs.{key}"


@pytest.mark.parametrize("body", [
    request({"costeer_context": "I am vegan.", "costeer_T": 3, "costeer_strength": 1.5}),
    request({"my_processor_flag": True, "context": "x", "steer_context": "y"}),  # other processors' keys
    request({"costeer_context": "caf\u00e9 \u2615"}, stream=True),
    b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]", b'{"vllm_xargs": "costeer_T"}',
    b'{"vllm_xargs": {}, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",  # nested too deep for json
])
@pytest.mark.parametrize("chunk", [None, 7])
def test_middleware_hands_other_bodies_on_intact(body, chunk):
    app = StubApp()
    sent = drive(app, body, chunk=chunk)
    assert app.bodies == [body]
    assert status_and_json(sent) == (200, {"ok": True})


def test_middleware_passes_large_bodies_on_unread_as_they_come():
    app = StubApp()
    body = request({"costeer_context": "x" * 5000, "costeer_T": True})
    # over the cap, declared: not read at all; undeclared (chunked): the chunks read so far are replayed
    drive(app, body, chunk=1000, max_body_bytes=2000)
    drive(app, body, chunk=1000, max_body_bytes=2000, declare_length=False)
    assert app.bodies == [body, body] and app.chunks == [6, 6]
    # not a JSON request, another path, another method: untouched
    drive(app, body, content_type=b"text/plain")
    drive(app, body, path="/v1/embeddings")
    drive(app, body, method="PUT")
    assert app.bodies[2:] == [body] * 3


def sse(*events: bytes):
    return [{"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-request-id", b"r1")]},
            *[{"type": "http.response.body", "body": e, "more_body": True} for e in events],
            {"type": "http.response.body", "body": b"", "more_body": False}]


def test_a_streamed_first_event_error_becomes_an_http_error():
    error = {"message": "costeer_T must be in [1, 100000], got -3", "type": "BadRequestError", "param": None,
             "code": 400}
    app = StubApp(sse(b"data: " + json.dumps({"error": error}).encode() + b"\n\n", b"data: [DONE]\n\n"))
    sent = drive(app, request({"costeer_context": "x", "costeer_T": -3}, stream=True))
    assert status_and_json(sent) == (400, {"error": error})
    start = sent[0]
    assert (b"x-request-id", b"r1") in start["headers"] and (b"content-type", b"application/json") in start["headers"]
    assert len(sent) == 2  # "data: [DONE]" of the refused stream is not sent


@pytest.mark.parametrize("events", [
    [b"data: {\"choices\": [{\"delta\": {\"role\": \"assistant\"}}]}\n\n", b"data: {\"choices\": []}\n\n",
     b"data: [DONE]\n\n"],
    [b"data: {\"choi", b"ces\": []}\n", b"\ndata: [DONE]\n\n"],  # the first event split over chunks
    [b": keep-alive\n\n", b"data: {\"error\": {\"code\": 400}}\n\n"],  # decided on the first event only
    [b"data: {\"error\": {\"message\": \"engine dead\", \"code\": 500}}\n\n"],  # server errors stay in the stream
])
def test_other_streams_go_out_unchanged(events):
    app = StubApp(sse(*events))
    sent = drive(app, request({"costeer_context": "x"}, stream=True))
    assert sent == sse(*events)
    unsteered = drive(StubApp(sse(b"data: {\"error\": {\"code\": 400}}\n\n")), request({}, stream=True))
    assert unsteered[0]["status"] == 200  # only requests carrying CoSteer arguments are watched


def test_the_status_endpoint_reports_what_vllm_lets_costeer_read():
    status, doc = status_and_json(drive(StubApp(), b"", path="/costeer/status", method="GET"))
    assert status == 200 and doc["tested_range"] == "0.32.x"
    assert {"vllm_version", "cache_salt_readable", "prompt_ids_readable", "frames_missing"} <= set(doc)


# ------------------------------------------------------------------------------------------------
# near misses offline, and compat
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [*NEAR_MISSES, "coster_context", "COSTEER_STRENGHT"])
def test_near_miss_keys_are_refused_by_validate_params(key):
    from vllm import SamplingParams

    from costeer_processor.vllm import CoSteerLogitsProcessor, parse_request_args

    extra = {key: "I am vegan."}
    with pytest.raises(ValueError, match=rf"'{key}' \(did you mean 'costeer_(context|strength)'\?\)"):
        CoSteerLogitsProcessor.validate_params(SamplingParams(extra_args=dict(extra)))
    with pytest.raises(ValueError, match="did you mean"):
        parse_request_args(extra)


def test_keys_not_near_a_costeer_key_are_left_alone():
    from vllm import SamplingParams

    from costeer_processor.vllm import CoSteerLogitsProcessor, parse_request_args
    from costeer_processor.vllm.settings import SALT_ARG, near_miss_keys

    extra = {"context": "x", "steer_context": "y", "session_id": "s", "temperature_hint": 1, SALT_ARG: "t"}
    assert near_miss_keys(extra) == [] and parse_request_args(extra) is None
    CoSteerLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def fake_vllm(tmp_path, edit=None):
    """A copy of the installed vLLM's sources that compat reads, optionally edited."""
    from costeer_processor.vllm import compat

    root = compat._vllm_dir()
    for rel in ("v1/engine/input_processor.py", "v1/worker/gpu/buffer_utils.py",
                "v1/worker/gpu/sample/logits_processor/interface.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    if edit:
        path = tmp_path / "v1/engine/input_processor.py"
        path.write_text(edit(path.read_text()))
    return tmp_path


def test_compat_reads_the_installed_vllm_and_notices_a_changed_layout(tmp_path, monkeypatch):
    from costeer_processor.vllm import compat

    assert compat.version_supported("0.32.0") and compat.version_supported("0.32.4.dev3+cpu")
    assert not compat.version_supported("0.33.0") and not compat.version_supported(None)
    found, problems = compat._read_layout(fake_vllm(tmp_path / "same"))
    assert problems == [] and all(found.values())
    assert compat._read_v2_layout(tmp_path / "same") == []
    # vLLM moves the salt out of the prompt it validates next to
    found, problems = compat._read_layout(fake_vllm(tmp_path / "salt", lambda s: s.replace('"cache_salt"', '"salt"')))
    assert found == {"engine_config_readable": True, "prompt_ids_readable": True, "cache_salt_readable": False}
    assert problems == ["the admission frame no longer shows prompt['cache_salt']"]
    # vLLM renames process_inputs' prompt argument
    found, problems = compat._read_layout(fake_vllm(tmp_path / "args", lambda s: s.replace(
        "        prompt: PromptType | EngineInput,\n", "        engine_prompt: PromptType | EngineInput,\n", 1)))
    assert not any(found.values()) and "process_inputs(self, request_id, prompt, params" in problems[0]

    # start-up: loud warnings, once per check, and the flags in status()
    warnings = []
    monkeypatch.setattr(compat.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.1")
    monkeypatch.setattr(compat, "_vllm_dir", lambda: tmp_path / "salt")
    try:
        s = compat.startup_check(force=True)
        assert s["vllm_version"] == "0.40.1" and not s["version_supported"] and not s["cache_salt_readable"]
        assert len(warnings) == 2 and "outside the range" in warnings[0] and "no sharing across tenants" in warnings[1]
        compat.startup_check()
        assert len(warnings) == 2
    finally:
        monkeypatch.undo()
        compat.startup_check(force=True)


def test_an_unreadable_salt_is_never_dropped_silently(monkeypatch, tiny_pair_dirs):
    """Frame not found (or salt unreadable): the request's context cache becomes its own, counted, warned."""
    from vllm import SamplingParams

    from costeer_processor.vllm import compat, frontend
    from costeer_processor.vllm.settings import SALT_ARG

    monkeypatch.setenv("COSTEER_SMALL_MODEL", str(tiny_pair_dirs[1]))
    warnings = []
    monkeypatch.setattr(compat.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    before = compat.status()["frames_missing"]
    params = [SamplingParams(extra_args={"costeer_context": "I am vegan.", SALT_ARG: "tenant-a"}) for _ in range(2)]
    for p in params:  # called from here, not from vLLM's process_inputs: the frame is missing
        frontend.validate_sampling_params(p)
    salts = [p.extra_args[SALT_ARG] for p in params]
    assert all(s.startswith(frontend.UNSHARED_SALT) for s in salts) and salts[0] != salts[1]
    assert compat.status()["frames_missing"] == before + 2
    assert sum("not called from vLLM's InputProcessor.process_inputs" in w for w in warnings) <= 1

    # a frame laid out like vLLM 0.32's: prompt ids and salt are read, the salt is carried as is
    def process_inputs(self, request_id, prompt, params):
        return frontend.validate_sampling_params(params)

    p = SamplingParams(extra_args={"costeer_context": "I am vegan."})
    process_inputs(None, "r", {"type": "token", "prompt_token_ids": [1, 2, 3], "cache_salt": "tenant-b"}, p)
    assert p.extra_args[SALT_ARG] == "tenant-b"
    p = SamplingParams(extra_args={"costeer_context": "I am vegan.", SALT_ARG: "forged"})
    process_inputs(None, "r", {"type": "token", "prompt_token_ids": [1, 2, 3]}, p)
    assert SALT_ARG not in p.extra_args
    # the layout check said the salt cannot be read: never trusted, even with the frame found
    monkeypatch.setitem(compat._status, "cache_salt_readable", False)
    p = SamplingParams(extra_args={"costeer_context": "I am vegan."})
    process_inputs(None, "r", {"type": "token", "prompt_token_ids": [1, 2, 3], "cache_salt": "tenant-b"}, p)
    assert p.extra_args[SALT_ARG].startswith(frontend.UNSHARED_SALT)


def test_costeer_serve_installs_the_middleware(tiny_pair_dirs):
    from types import SimpleNamespace

    from costeer_processor.cli.serve import serve_command
    from costeer_processor.vllm import middleware
    from costeer_processor.vllm_server import COSTEER_MIDDLEWARE

    module, name = COSTEER_MIDDLEWARE.rsplit(".", 1)
    assert module == middleware.__name__ and getattr(middleware, name) is middleware.CoSteerArgsMiddleware
    large, small = tiny_pair_dirs
    args = SimpleNamespace(large=str(large), small=str(small), split=False, dtype="float32", max_model_len=256,
                           host="127.0.0.1", port=8123, extra=[], dry_run=True)
    cmd, _ = serve_command(args)
    assert cmd[cmd.index("--middleware") + 1] == COSTEER_MIDDLEWARE
    cmd, _ = serve_command(SimpleNamespace(**{**vars(args), "small": None, "split": True}))
    assert "--middleware" not in cmd  # split mode serves the large model alone


# ------------------------------------------------------------------------------------------------
# a real server, started with the flags `costeer serve` passes
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_pair_dirs, tmp_path_factory):
    from costeer_processor.vllm import processor_fqcn
    from costeer_processor.vllm_server import COSTEER_MIDDLEWARE, vllm_server

    large, small = tiny_pair_dirs
    args = ["--logits-processors", processor_fqcn(), "--middleware", COSTEER_MIDDLEWARE,
            "--additional-config", json.dumps({"costeer": {"small_model": str(small), "max_context_tokens": 200}}),
            "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8", "--enforce-eager",
            "--served-model-name", "tiny", "--disable-log-stats"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1" if (os.cpu_count() or 1) >= 2 else "0"}
    log = tmp_path_factory.mktemp("http_input") / "vllm.log"
    with vllm_server(str(large), args, env=env, timeout=600, log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def post(server, xargs, *, path="/v1/chat/completions", stream=False, max_tokens=4):
    import httpx

    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "stream": stream, "vllm_xargs": xargs}
    if path == "/v1/completions":
        body["prompt"] = "The weather today is"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    with httpx.Client(timeout=300) as http:
        r = http.post(server + path, json=body)
    return r


def openai_call(client, xargs, *, stream=False, completions=False, max_tokens=4):
    common = dict(model="tiny", max_tokens=max_tokens, temperature=0.0, stream=stream,
                  extra_body={"vllm_xargs": xargs})
    if completions:
        r = client.completions.create(prompt="The weather today is", **common)
        return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], **common)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


@pytest.mark.vllm
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_http_booleans_are_refused_with_vllms_error_json(server, path, stream):
    for key, value, message in BOOLEANS + CONTAINERS:
        r = post(server, {"costeer_context": "I like tea.", key: value}, path=path, stream=stream)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (key, r.text)
        assert r.json() == {"error": {"message": message, "type": "BadRequestError", "param": f"vllm_xargs.{key}",
                                      "code": 400}}


@pytest.mark.vllm
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("completions", [False, True])
def test_http_near_misses_and_bad_values_are_400_streamed_or_not(client, stream, completions):
    import openai

    cases = [({key: "I like tea."}, "did you mean 'costeer_context'?") for key in NEAR_MISSES]
    cases += [({"costeer_context": "x", "costeer_T": True}, "costeer_T must be an integer, got bool True"),
              ({"costeer_context": "x", "costeer_T": -3}, "costeer_T must be in [1, 100000], got -3"),  # vLLM's hook
              ({"costeer_context": "word " * 600}, "over the limit of 200")]  # the frontend's length check
    for xargs, needle in cases:
        with pytest.raises(openai.BadRequestError) as info:
            openai_call(client, xargs, stream=stream, completions=completions)
        assert info.value.status_code == 400 and needle in str(info.value), (xargs, str(info.value))
    assert openai_call(client, {"costeer_context": "I like tea."}, stream=stream, completions=completions)


@pytest.mark.vllm
def test_http_streamed_refusals_come_before_the_stream_raw(server):
    """Raw HTTP: a refused streamed request is a 400 JSON response, never a 200 event stream."""
    import httpx

    for path in ("/v1/chat/completions", "/v1/completions"):
        for xargs in ({"costeer_context": "x", "costeer_T": -3}, {"costeer_context": "x", "costeer_T": True},
                      {"COSTEER_CONTEXT": "x"}):
            chat = {"messages": [{"role": "user", "content": "Hi"}]}
            prompt = {"prompt": "Hi"} if path == "/v1/completions" else chat
            body = {"model": "tiny", "max_tokens": 4, "stream": True, "vllm_xargs": xargs, **prompt}
            with httpx.Client(timeout=300) as http, http.stream("POST", server + path, json=body) as r:
                raw = r.read()
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path, xargs, raw)
            err = json.loads(raw)["error"]
            assert err["code"] == 400 and err["type"] == "BadRequestError" and b"data:" not in raw


@pytest.mark.vllm
def test_http_other_requests_are_untouched(server, client):
    # steered, streamed or not: the same text, streamed as events
    for completions in (False, True):
        whole = openai_call(client, {"costeer_context": "I love rain."}, completions=completions, max_tokens=8)
        streamed = openai_call(client, {"costeer_context": "I love rain."}, completions=completions, max_tokens=8,
                               stream=True)
        assert whole and streamed == whole
    r = post(server, {"costeer_context": "I love rain."}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.count("data: ") > 2 and r.text.rstrip().endswith("data: [DONE]")
    # keys of other processors are not CoSteer's business; unsteered requests are not steered
    assert post(server, {"my_processor_flag": 1, "context": "x"}).status_code == 200
    # not JSON: vLLM's own 400, and the server keeps serving
    import httpx

    r = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(server, {"costeer_context": "I like tea."}).status_code == 200


@pytest.mark.vllm
def test_http_status_shows_what_vllm_lets_costeer_read(server, client):
    import httpx

    openai_call(client, {"costeer_context": "I like tea."})
    status = httpx.get(server + "/costeer/status", timeout=30).json()
    assert status["version_supported"] and status["prompt_ids_readable"] and status["cache_salt_readable"]
    assert status["frames_missing"] == 0 and status["problems"] == []  # every steered request was read from its frame
