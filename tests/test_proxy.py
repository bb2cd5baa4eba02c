"""``costeer proxy``: the local OpenAI-compatible server that decodes every request in split mode.

Fast tests run the proxy (in this process, on loopback) against ``FakeVLLM`` from
``tests/test_split.py``; the ``vllm``-marked ones against ONE real ``vllm serve`` of the tiny
large model for the module (the last test kills and restarts it), through the official
``openai`` client, with a recording proxy between ``costeer proxy`` and the upstream for privacy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from costeer_processor import CoSteerConfig, SmallModelRunner
from costeer_processor.core import Variants
from costeer_processor.proxy import Defaults, ProfileStore, ProxyService, create_app, is_loopback
from costeer_processor.proxy.settings import RequestError, parse_request
from costeer_processor.split import SplitCoSteerClient
from costeer_processor.testing import LoopbackProxy
from costeer_processor.vllm_server import free_port
from test_split import (CONTEXTS, PROMPTS, SECRET, SECRET_UNICODE, FakeVLLM, RestartableServer,
                        assert_context_never_sent)

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

N_NEW = 16
GREEDY = {"temperature": 0}


# --------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    large_dir, small_dir = tiny_pair_dirs
    tok = AutoTokenizer.from_pretrained(large_dir)
    large = AutoModelForCausalLM.from_pretrained(large_dir, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32).eval()
    return large, small, tok, large_dir, small_dir


@pytest.fixture(scope="module")
def runner(pair):
    return SmallModelRunner(pair[1], pair[2])


@pytest.fixture
def fake(pair):
    with FakeVLLM(pair[0], pair[2]) as f:
        yield f


@pytest.fixture
def profiles(tmp_path):
    root = tmp_path / "profiles"
    root.mkdir()
    (root / "alice.txt").write_text(CONTEXTS[0], encoding="utf-8")
    (root / "bob.txt").write_text(CONTEXTS[1], encoding="utf-8")
    (root / "secret.txt").write_text(SECRET, encoding="utf-8")
    (root / "zoe.txt").write_text(SECRET_UNICODE, encoding="utf-8")
    return root


class Proxy:
    """A ProxyService served by uvicorn on a loopback port, in a thread of this process."""

    def __init__(self, service: ProxyService, api_key: str = "none"):
        self.service, self.port = service, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.02)
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=self.url, timeout=300)

    @property
    def model(self):
        """The served model's name, as a client learns it (GET /v1/models through the proxy)."""
        if getattr(self, "_model", None) is None:
            self._model = self.openai.models.list().data[0].id
        return self._model

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, **kw)

    def stats(self):
        return self.http.get("/stats").json()

    def close(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def proxy_for(upstream, runner, *, profiles=None, default_profile=None, defaults=Defaults(temperature=0.0), **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff", 0.05)
    service = ProxyService.create(upstream, runner, profiles=profiles, default_profile=default_profile,
                                  defaults=defaults, **kw)
    proxy = Proxy(service, api_key=kw.get("api_key") or "none")
    try:
        yield proxy
    finally:
        proxy.close()
    assert len(runner) == 0, "the proxy left rows in the small-model runner"


def chat(proxy, prompt, context=None, *, profile=None, max_tokens=N_NEW, **kw):
    body = dict(kw.pop("extra_body", {}))
    if context is not None:
        body["costeer_context"] = context
    headers = {"X-CoSteer-Profile": profile} if profile else None
    return proxy.openai.chat.completions.create(model=kw.pop("model", None) or proxy.model,
                                                messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, extra_body={**body, "return_token_ids": True},
                                                extra_headers=headers, **{**GREEDY, **kw})


def ids_of(response):
    return response.model_extra["costeer"]["token_ids"]


def reference(upstream, runner, prompt, context, max_new=N_NEW, **kw):
    """What SplitCoSteerClient gives for the same request (the proxy must equal it token for token)."""
    gen = {k: kw.pop(k) for k in ("temperature", "top_p", "seed") if k in kw}
    client = SplitCoSteerClient(upstream, runner, **{"top_logprobs": 20, **kw})
    try:
        return client.generate([{"role": "user", "content": prompt}], context, max_new, **gen)
    finally:
        client.close()


def stream_text(stream):
    pieces, last = [], None
    for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), last


# --------------------------------------------------------------------------- request checks (no server)
@pytest.mark.parametrize("body, field", [
    ({"n": 2}, "n must be 1"),
    ({"costeer_strength": "strong"}, "costeer_strength must be a number"),
    ({"costeer_strength": 5000}, "costeer_strength"),
    ({"costeer_T": True}, "costeer_T must be an integer"),
    ({"costeer_gate_threshold": 1.5}, "costeer_gate_threshold must be in"),
    ({"costeer_delta_clip": -1}, "costeer_delta_clip must be in"),
    ({"costeer_strenght": 1}, "unknown CoSteer field(s) costeer_strenght"),
    ({"vllm_xargs": {"costeer_T": 0}}, "costeer_T must be in [1, 100000]"),
    ({"temperature": 3}, "temperature must be in [0, 2]"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens must be in [1, inf]"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens must be an integer"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs must be in [0, 20]"),
    ({"logprobs": True, "costeer_gate_threshold": 0.5}, "logprobs are not available"),
    ({"stop": ["a"] * 17}, "stop must be"),
    ({"logit_bias": {"5": 3}}, "logit_bias is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"costeer_context": "  "}, "costeer_context must be a non-empty string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
])
def test_bad_request_values_are_refused_naming_the_field(body, field):
    with pytest.raises(RequestError) as e:
        parse_request("chat", {"messages": [{"role": "user", "content": "Hi"}], **body})
    assert field in str(e.value) and e.value.status == 400


def test_request_defaults_and_compat_fields():
    req = parse_request("chat", {"messages": [{"role": "developer", "content": "Be brief."},
                                              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                 "vllm_xargs": {"costeer_context": "I am vegan.", "costeer_strength": 2}},
                        Defaults(temperature=0.5, variants=Variants(gate_threshold=0.1)))
    assert req.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert req.context == "I am vegan." and req.gain == 2.0 and req.sampling.temperature == 0.5
    assert req.variants.gate_threshold == 0.1
    assert parse_request("chat", {"messages": [{"role": "user", "content": "x"}], "costeer_gate_threshold": 0}
                         ).variants.gate_threshold is None
    assert round(parse_request("completion", {"prompt": ["Hi"]}).gain, 6) == 1.783257
    assert parse_request("completion", {"prompt": [1, 2, 3], "logprobs": 2}).logprobs == 2
    with pytest.raises(RequestError, match="one prompt per request"):
        parse_request("completion", {"prompt": ["a", "b"]})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_profile_store(tmp_path, profiles):
    store = ProfileStore(profiles)
    assert store.names() == ["alice", "bob", "secret", "zoe"]
    assert store.context(None, None) == (None, None)  # no default.txt, no --default-profile
    assert store.context("bob", "alice") == ("bob", CONTEXTS[1])  # the header wins over `user`
    (profiles / "default.txt").write_text("I like tea.", encoding="utf-8")
    assert store.context(None, None) == ("default", "I like tea.")
    for bad in ("../alice", "nobody", ".hidden", "a/b"):
        with pytest.raises(LookupError, match="unknown profile"):
            store.read(bad)
    (profiles / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(ValueError, match="profile 'empty' is empty"):
        store.read("empty")
    with pytest.raises(ValueError, match="not a folder"):
        ProfileStore(tmp_path / "missing")


# --------------------------------------------------------------------------- the proxy against a fake vLLM (fast)
def test_chat_streamed_and_completions_equal_the_split_client(fake, runner, profiles):
    with proxy_for(fake.url, runner, profiles=profiles) as proxy:
        for prompt, profile, context in ((PROMPTS[0], "alice", CONTEXTS[0]), (PROMPTS[1], "bob", CONTEXTS[1])):
            ref = reference(fake.url, runner, prompt, context)
            res = chat(proxy, prompt, profile=profile)
            assert ids_of(res) == ref.token_ids and res.choices[0].message.content == ref.text
            assert res.choices[0].finish_reason == ref.finish_reason
            assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
            text, last = stream_text(chat(proxy, prompt, profile=profile, stream=True,
                                          stream_options={"include_usage": True}))
            assert text == ref.text and last.usage.completion_tokens == len(ref.token_ids)
        # /v1/completions reads a raw prompt: the chat-templated text gives the chat answer
        rendered = runner.splicer.render(PROMPTS[0])
        done = proxy.openai.completions.create(model="fake-large", prompt=rendered, max_tokens=N_NEW, temperature=0,
                                               user="alice", extra_body={"return_token_ids": True})
        expected = reference(fake.url, runner, PROMPTS[0], CONTEXTS[0]).token_ids
        assert done.model_extra["costeer"]["token_ids"] == expected
        pieces = [c.choices[0].text for c in proxy.openai.completions.create(
            model="fake-large", prompt=rendered, max_tokens=N_NEW, temperature=0, user="alice", stream=True)]
        assert "".join(pieces) == done.choices[0].text
        assert [m.id for m in proxy.openai.models.list().data] == ["fake-large"]
        # costeer_plain (the page's comparison): the large model alone, asked for explicitly = strength 0
        plain = chat(proxy, PROMPTS[1], extra_body={"costeer_plain": True})
        assert ids_of(plain) == reference(fake.url, runner, PROMPTS[1], CONTEXTS[1],
                                          config=CoSteerConfig(strength=0.0)).token_ids
        assert plain.model_extra["costeer"]["steered"] is False
        text, _ = stream_text(chat(proxy, PROMPTS[1], stream=True, extra_body={"costeer_plain": True}))
        assert text == plain.choices[0].message.content


def test_stop_strings_logprobs_and_seeded_sampling(fake, runner):
    with proxy_for(fake.url, runner) as proxy:
        ref = reference(fake.url, runner, PROMPTS[2], CONTEXTS[2])
        stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 3]
        res = chat(proxy, PROMPTS[2], CONTEXTS[2], stop=[stop])
        assert res.choices[0].message.content == ref.text[:ref.text.index(stop)]
        assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens < len(ref.token_ids)
        text, _ = stream_text(chat(proxy, PROMPTS[2], CONTEXTS[2], stop=stop, stream=True))
        assert text == res.choices[0].message.content
        # log-probs: of the steered distribution the token was chosen from (greedy: the chosen one is its top)
        res = chat(proxy, PROMPTS[2], CONTEXTS[2], logprobs=True, top_logprobs=3)
        content = res.choices[0].logprobs.content
        assert len(content) == len(ref.token_ids)
        for item in content:
            assert len(item.top_logprobs) == 3 and item.logprob <= 0
            assert item.logprob == item.top_logprobs[0].logprob
        done = proxy.openai.completions.create(model="fake-large", prompt="Tell me about tea.", max_tokens=5,
                                               temperature=0, logprobs=2, extra_body={"costeer_context": CONTEXTS[1]})
        lp = done.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        # seeded sampling equals the client's draws; another seed differs somewhere
        kw = dict(temperature=0.9, top_p=0.95, seed=7)
        ref = reference(fake.url, runner, PROMPTS[0], CONTEXTS[0], **kw)
        assert ids_of(chat(proxy, PROMPTS[0], CONTEXTS[0], **kw)) == ref.token_ids
        others = [ids_of(chat(proxy, PROMPTS[0], CONTEXTS[0], temperature=0.9, seed=s)) for s in (1, 2, 3)]
        assert any(o != ref.token_ids for o in others)


def test_requests_with_different_settings_share_rounds_and_equal_the_client(fake, runner):
    """Different strengths (the certificate runs per gain), gating, sampling, lengths: decoded together."""
    cases = [dict(prompt=PROMPTS[0], context=CONTEXTS[0]),
             dict(prompt=PROMPTS[1], context=CONTEXTS[1], extra_body={"costeer_strength": 4.0}),
             dict(prompt=PROMPTS[2], context=CONTEXTS[2], extra_body={"costeer_gate_threshold": 0.99}),
             dict(prompt=PROMPTS[0], context=CONTEXTS[1], temperature=0.8, seed=11),
             dict(prompt=PROMPTS[1], context=SECRET, max_tokens=5),
             dict(prompt=PROMPTS[2], context=SECRET_UNICODE, extra_body={"costeer_T": 5, "costeer_alpha": 1.0})]

    def expected(case):
        xb = case.get("extra_body", {})
        config = (CoSteerConfig(strength=xb["costeer_strength"]) if "costeer_strength" in xb else
                  CoSteerConfig(T=xb["costeer_T"], alpha=xb["costeer_alpha"]) if "costeer_T" in xb else CoSteerConfig())
        variants = Variants(gate_threshold=xb.get("costeer_gate_threshold"))
        gen = {k: case[k] for k in ("temperature", "seed") if k in case}
        return reference(fake.url, runner, case["prompt"], case["context"], case.get("max_tokens", N_NEW),
                         top_logprobs=3, config=config, variants=variants, **gen).token_ids

    refs = [expected(c) for c in cases]
    with proxy_for(fake.url, runner, top_logprobs=3) as proxy:
        got = [None] * len(cases)
        barrier = threading.Barrier(len(cases))

        def work(i):
            case = dict(cases[i])
            barrier.wait()
            got[i] = ids_of(chat(proxy, case.pop("prompt"), case.pop("context"), **case))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == refs
        stats = proxy.stats()
        assert stats["mean_sequences_per_round"] > 1.5  # batched: not one round per request
        assert stats["requests"]["finished"] == len(cases) and stats["escalations"] > 0


def test_the_ngram_guard_is_on_by_default_and_a_request_may_switch_it_off(fake, runner):
    """Every generated token reaches the upstream: the context n-gram guard (n = SPLIT_NGRAM_GUARD) is on
    unless a request sends costeer_ngram_guard 0 (or another n); each equals the split client with that setting."""
    from costeer_processor.core import SPLIT_NGRAM_GUARD

    with proxy_for(fake.url, runner) as proxy:
        assert proxy.stats()["ngram_guard"] == {"default_n": SPLIT_NGRAM_GUARD, "by_n": {}}
        guarded = ids_of(chat(proxy, PROMPTS[0], SECRET))
        by_n = proxy.stats()["ngram_guard"]["by_n"]  # a guard of that n exists once a request was admitted with it
        assert list(by_n) == [str(SPLIT_NGRAM_GUARD)] and by_n[str(SPLIT_NGRAM_GUARD)]["slots"] == 0  # released
        off = ids_of(chat(proxy, PROMPTS[0], SECRET, extra_body={"costeer_ngram_guard": 0}))
        six = ids_of(chat(proxy, PROMPTS[0], SECRET, extra_body={"costeer_ngram_guard": 6}))
        assert set(proxy.stats()["ngram_guard"]["by_n"]) == {str(SPLIT_NGRAM_GUARD), "6"}
    assert guarded == reference(fake.url, runner, PROMPTS[0], SECRET).token_ids
    assert off == reference(fake.url, runner, PROMPTS[0], SECRET, variants=Variants(ngram_guard=0)).token_ids
    assert six == reference(fake.url, runner, PROMPTS[0], SECRET, variants=Variants(ngram_guard=6)).token_ids


def test_profiles_are_read_fresh_and_never_served_back(fake, runner, profiles):
    with proxy_for(fake.url, runner, profiles=profiles, default_profile="bob") as proxy:
        assert ids_of(chat(proxy, PROMPTS[0])) == reference(fake.url, runner, PROMPTS[0], CONTEXTS[1]).token_ids
        assert ids_of(chat(proxy, PROMPTS[0], user="alice")) == reference(
            fake.url, runner, PROMPTS[0], CONTEXTS[0]).token_ids
        (profiles / "alice.txt").write_text(CONTEXTS[2], encoding="utf-8")  # an edit applies to the next request
        assert ids_of(chat(proxy, PROMPTS[0], user="alice")) == reference(
            fake.url, runner, PROMPTS[0], CONTEXTS[2]).token_ids
        r = proxy.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                       headers={"X-CoSteer-Profile": "mallory"})
        assert r.status_code == 404 and "unknown profile 'mallory'" in r.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="unknown profile 'carol'"):
            chat(proxy, PROMPTS[0], user="carol")
        # no route gives a profile's text back (names only), neither do answers or errors
        seen = [proxy.http.get(p).text for p in ("/", "/health", "/stats", "/v1/models", "/v1/costeer/profiles")]
        seen.append(chat(proxy, PROMPTS[1], profile="secret").model_dump_json())
        seen.append(proxy.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 3},
                               headers={"X-CoSteer-Profile": "secret"}).text)
        assert json.loads(seen[4])["profiles"] == ["alice", "bob", "secret", "zoe"]
        for text in (SECRET, SECRET_UNICODE, CONTEXTS[1], CONTEXTS[2]):
            for window in {text[i:i + 12] for i in range(len(text) - 11)}:
                assert not any(window in s or json.dumps(window)[1:-1] in s for s in seen), window


def test_bad_inputs_get_4xx_naming_the_problem(fake, runner, profiles):
    with proxy_for(fake.url, runner, profiles=profiles, max_body=64 * 1024) as proxy:
        hi = [{"role": "user", "content": "Hi"}]
        cases = [({"messages": hi, "n": 2, "user": "alice"}, 400, "n must be 1"),
                 ({"messages": hi, "user": "alice", "costeer_strength": 1e9}, 400, "costeer_strength"),
                 ({"messages": hi, "user": "alice", "costeer_gate_patience": 0}, 400, "costeer_gate_patience"),
                 ({"messages": hi, "user": "nobody"}, 404, "unknown profile 'nobody'"),
                 ({"messages": hi}, 400, "no personal context"),
                 ({"messages": hi, "user": "alice", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
                 ({"messages": [{"role": "user", "content": "x " * 600}], "user": "alice"}, 400, "over the limit"),
                 ({"messages": [{"role": "user", "content": "x " * 600}], "costeer_plain": True}, 400, "max_model_len"),
                 ({"messages": hi, "costeer_context": "word " * 5000}, 400, "over the limit"),
                 ({"messages": hi, "costeer_context": "x" * 70_000}, 413, "over the proxy's limit"),
                 ({"prompt": [10 ** 6], "user": "alice"}, 400, "token id 1000000")]
        for body, status, message in cases:
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            r = proxy.post(path, body)
            assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text[:300])
        r = proxy.http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            chat(proxy, "Hi", CONTEXTS[0], n=2)
        assert proxy.http.get("/health").status_code == 200  # still up
        assert chat(proxy, "Hi", profile="alice").choices[0].finish_reason in ("stop", "length")
        assert proxy.stats()["requests"]["open"] == 0


def test_api_key(fake, runner):
    with proxy_for(fake.url, runner, api_key="s3cret") as proxy:
        assert proxy.http.get("/health").status_code == 200 and proxy.http.get("/").status_code == 200
        for path in ("/v1/models", "/stats", "/v1/costeer/profiles"):
            assert proxy.http.get(path).status_code == 401
        assert proxy.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}).status_code == 401
        res = proxy.openai.chat.completions.create(model="fake-large", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3, extra_body={"costeer_context": CONTEXTS[0]})
        assert res.usage.completion_tokens >= 1
        wrong = openai.OpenAI(base_url=proxy.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_cli_refuses_other_hosts_without_a_key(capsys):
    from costeer_processor.cli import main

    assert main(["proxy", "--upstream", "http://127.0.0.1:9", "--small", "x", "--host", "0.0.0.0"]) == 2
    assert "set an API key" in capsys.readouterr().err


def test_upstream_faults_are_errors_never_unsteered_answers(fake, runner):
    with proxy_for(fake.url, runner) as proxy:
        assert chat(proxy, PROMPTS[0], CONTEXTS[0]).choices[0].finish_reason in ("stop", "length")
        # the upstream fails mid-stream (every request 503, retries exhausted): an error event, then [DONE]
        events = []
        with proxy.http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 200, "stream": True,
                "temperature": 0, "costeer_context": CONTEXTS[1]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        fake.fail_first = 10 ** 6
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "upstream" in error["message"] and "engine busy" in error["message"]
        assert not any('"finish_reason":"length"' in e for e in events)
        with pytest.raises(openai.APIError, match="upstream"):  # the official client raises on the error event
            stream_text(chat(proxy, PROMPTS[1], CONTEXTS[1], stream=True))
        with pytest.raises(openai.InternalServerError, match="unavailable"):
            chat(proxy, PROMPTS[1], CONTEXTS[1])
        assert proxy.http.get("/health").status_code == 200
        fake.fail_first = 0  # the upstream is back: the next request is served
        assert ids_of(chat(proxy, PROMPTS[1], CONTEXTS[1])) == reference(
            fake.url, runner, PROMPTS[1], CONTEXTS[1]).token_ids
        assert proxy.stats()["requests"]["failed"] >= 2
    with proxy_for(f"http://127.0.0.1:{free_port()}", runner) as proxy:  # nothing listens there
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="unavailable.*(refused|Connection)"):
            chat(proxy, PROMPTS[1], CONTEXTS[1], model="tiny")
        with pytest.raises(openai.InternalServerError, match="unavailable"):
            proxy.openai.models.list()
        assert time.monotonic() - t0 < 30
        assert proxy.http.get("/health").status_code == 200


def test_aborted_streams_release_their_rows(fake, runner):
    with proxy_for(fake.url, runner, lookahead=1) as proxy:
        for i in range(6):
            with proxy.http.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": PROMPTS[i % 3]}], "max_tokens": 300, "stream": True,
                    "temperature": 0, "costeer_context": CONTEXTS[i % 3]}) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n == 4:
                        break  # the client goes away mid-answer
        deadline = time.monotonic() + 30
        while proxy.stats()["requests"]["open"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = proxy.stats()
        assert stats["requests"]["open"] == 0 and stats["requests"]["cancelled"] == 6
        assert stats["small_model"]["kv_bytes"] == 0 and len(runner) == 0


# --------------------------------------------------------------------------- a real vllm serve (one per module)
@pytest.fixture(scope="module")
def upstream(tiny_pair_dirs, tmp_path_factory):
    pytest.importorskip("vllm")
    server = RestartableServer(tiny_pair_dirs[0], tmp_path_factory.mktemp("vllm_proxy_logs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_openai_client_equals_the_split_client(upstream, runner, profiles):
    """Chat (non-streamed, streamed), completions and models through the official client, on a real vllm serve."""
    refs = [reference(upstream.url, runner, p, c) for p, c in zip(PROMPTS, CONTEXTS)]
    with proxy_for(upstream.url, runner, profiles=profiles) as proxy:
        for prompt, context, profile, ref in zip(PROMPTS, CONTEXTS, ("alice", "bob", None), refs):
            res = chat(proxy, prompt, None if profile else context, profile=profile)
            assert ids_of(res) == ref.token_ids and res.choices[0].message.content == ref.text
            assert res.usage.prompt_tokens == ref.prompt_tokens and res.choices[0].finish_reason == ref.finish_reason
            text, last = stream_text(chat(proxy, prompt, None if profile else context, profile=profile, stream=True,
                                          stream_options={"include_usage": True}))
            assert text == ref.text and last.usage.completion_tokens == len(ref.token_ids)
        done = proxy.openai.completions.create(model=proxy.model, prompt=runner.splicer.render(PROMPTS[0]),
                                               max_tokens=N_NEW, temperature=0, user="alice",
                                               extra_body={"return_token_ids": True})
        assert done.model_extra["costeer"]["token_ids"] == refs[0].token_ids
        upstream_models = httpx.get(upstream.url + "/v1/models").json()
        assert [m.id for m in proxy.openai.models.list().data] == [m["id"] for m in upstream_models["data"]]
    # full-vocabulary mode (every log-prob each step) gives the same tokens as the certified top-20
    with proxy_for(upstream.url, runner, top_logprobs=None) as proxy:
        assert ids_of(chat(proxy, PROMPTS[2], CONTEXTS[2])) == refs[2].token_ids


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_privacy_through_a_recording_proxy(upstream, runner, profiles):
    """Between `costeer proxy` and the upstream: no context text (raw or JSON-escaped) and no context id runs."""
    recorder = LoopbackProxy(upstream.url)
    try:
        with proxy_for(recorder.url, runner, profiles=profiles, top_logprobs=2) as proxy:
            chat(proxy, PROMPTS[0], profile="secret")
            stream_text(chat(proxy, PROMPTS[0], profile="secret", stream=True, logprobs=True))
            stream_text(chat(proxy, PROMPTS[0], profile="secret", stream=True,  # gated: a streaming hand-off
                             extra_body={"costeer_gate_threshold": 0.99}))
            chat(proxy, PROMPTS[1], SECRET_UNICODE, temperature=0.7, seed=3)
            stream_text(chat(proxy, PROMPTS[1], SECRET_UNICODE, stream=True))
            proxy.openai.completions.create(model=proxy.model, prompt=runner.splicer.render(PROMPTS[2]),
                                            max_tokens=N_NEW, temperature=0, user="zoe")
            assert proxy.stats()["escalations"] > 0  # certificate requests went through the recorder too
        assert any(b'"stream":true' in b for _, _, _, b in recorder.records)
        assert_context_never_sent(recorder.records, runner, PROMPTS[0], SECRET)
        assert_context_never_sent(recorder.records, runner, PROMPTS[1], SECRET_UNICODE)
        assert_context_never_sent(recorder.records, runner, PROMPTS[2], SECRET_UNICODE)
    finally:
        recorder.close()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_eight_concurrent_clients_each_get_their_own_answer(upstream, runner, profiles):
    jobs = [(PROMPTS[i % 3], [CONTEXTS[0], CONTEXTS[1], CONTEXTS[2], SECRET_UNICODE][i % 4], i % 2 == 1)
            for i in range(8)]
    refs = [reference(upstream.url, runner, p, c).token_ids for p, c, _ in jobs]
    with proxy_for(upstream.url, runner, profiles=profiles) as proxy:
        got, barrier = [None] * 8, threading.Barrier(8)

        def work(i):
            prompt, context, streamed = jobs[i]
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0, timeout=300)
            barrier.wait()
            if streamed:
                got[i] = stream_text(client.chat.completions.create(
                    model=proxy.model, messages=[{"role": "user", "content": prompt}], max_tokens=N_NEW,
                    temperature=0, stream=True, extra_body={"costeer_context": context}))[0]
            else:
                got[i] = ids_of(client.chat.completions.create(
                    model=proxy.model, messages=[{"role": "user", "content": prompt}], max_tokens=N_NEW,
                    temperature=0, extra_body={"costeer_context": context, "return_token_ids": True}))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        expected = [runner.tokenizer.decode(r, skip_special_tokens=True) if streamed else r
                    for r, (_, _, streamed) in zip(refs, jobs)]
        assert got == expected
        stats = proxy.stats()
        assert stats["mean_sequences_per_round"] > 2  # one round (request + small step) for many clients
        assert stats["requests"]["finished"] == 8


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_soak_with_aborted_streams(upstream, runner, profiles):
    """500 requests, 8 at a time, 10 % of them streams dropped mid-way: no unexpected error, flat memory,
    an empty runner afterwards."""
    n, concurrency, warmup = 500, 8, 60
    rng = random.Random(0)
    plan = [(rng.choice(PROMPTS), rng.choice(["alice", "bob", "secret", "zoe", None]), rng.random() < 0.10,
             rng.random() < 0.4, rng.randint(2, 10)) for _ in range(n)]
    outcomes, lock, rss = {}, threading.Lock(), {}
    with proxy_for(upstream.url, runner, profiles=profiles, max_retries=8) as proxy:
        def one(i):
            prompt, profile, abort, streamed, max_tokens = plan[i]
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
            headers = {"X-CoSteer-Profile": profile} if profile else {}
            if profile is None:
                body["costeer_context"] = CONTEXTS[i % 3]
            try:
                if abort or streamed:
                    with proxy.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                           "max_tokens": 200 if abort else max_tokens}, headers=headers) as r:
                        assert r.status_code == 200, r.read()
                        lines = []
                        for line in r.iter_lines():
                            lines.append(line)
                            if abort and len(lines) >= 3:
                                return "aborted"
                        assert lines[-2] == "data: [DONE]" and "error" not in "".join(lines)
                    return "ok"
                r = proxy.post("/v1/chat/completions", body, headers=headers)
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
                return "ok"
            except Exception as e:  # anything else is unexpected
                return f"unexpected: {type(e).__name__}: {str(e)[:200]}"

        def worker(indices):
            for i in indices:
                outcome = one(i)
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    done = sum(outcomes.values())
                    if done == warmup:
                        rss["start"] = _rss()

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(range(k, n, concurrency),)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while proxy.stats()["requests"]["open"] and time.monotonic() < deadline:
            time.sleep(0.1)
        rss["end"] = _rss()
        stats = proxy.stats()
    unexpected = {k: v for k, v in outcomes.items() if k.startswith("unexpected")}
    assert not unexpected, unexpected
    assert outcomes.get("ok", 0) + outcomes.get("aborted", 0) == n and outcomes.get("aborted", 0) >= 25
    growth = rss["end"] / rss["start"] - 1
    print(f"soak: {n} requests in {elapsed:.0f}s, outcomes {outcomes}, RSS {rss['start'] / 2**20:.0f} -> "
          f"{rss['end'] / 2**20:.0f} MiB ({growth:+.2%}), rounds {stats['rounds']}, "
          f"{stats['mean_sequences_per_round']} sequences per round")
    assert abs(growth) <= 0.05
    assert stats["requests"]["open"] == 0 and stats["requests"]["failed"] == 0
    assert stats["small_model"]["kv_bytes"] == 0 and stats["small_model"]["requests"] == 0 and len(runner) == 0


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_cli_proxy(upstream, runner, profiles, tiny_pair_dirs, tmp_path):
    """`costeer proxy` as a command: health, models, a chat through the official client, equal to the client."""
    port = free_port()
    log = tmp_path / "proxy.log"
    cmd = [sys.executable, "-m", "costeer_processor", "proxy", "--upstream", upstream.url, "--small",
           str(tiny_pair_dirs[1]), "--profiles", str(profiles), "--default-profile", "bob", "--port", str(port),
           "--dtype", "float32", "--temperature", "0", "--log-level", "warning"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "costeer proxy did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        res = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                             max_tokens=N_NEW, extra_body={"return_token_ids": True})
        assert ids_of(res) == reference(upstream.url, runner, PROMPTS[1], CONTEXTS[1]).token_ids  # the default: bob
        assert "CoSteer proxy" in httpx.get(url + "/").text
    finally:
        from costeer_processor.vllm_server import stop_process

        stop_process(proc)
    assert proc.returncode is not None


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_benchmark_script_runs(upstream, tiny_pair_dirs, tmp_path):
    """benchmarks/bench_proxy.py, shortest form, against this module's upstream: both paths give the same answers."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_proxy.py"
    spec = importlib.util.spec_from_file_location("bench_proxy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--upstream", upstream.url, "--small", str(tiny_pair_dirs[1]), "--dtype", "float32",
                      "--concurrency", "1,3", "--repeats", "1", "--new-tokens", "6", "--out", str(tmp_path / "b.json")])
    assert [r["concurrency"] for r in out["rows"]] == [1, 3]
    assert [r["equal_answers"] for r in out["rows"]] == ["1/1", "3/3"]
    assert all(r["proxy_tok_s"] > 0 and r["in_process_tok_s"] > 0 for r in out["rows"])
    assert (tmp_path / "b.md").read_text().count("|") > 10


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_upstream_killed_mid_stream(upstream, runner):
    """Last in the module (kills the shared server): an error event, the proxy alive, served again once it returns."""
    prompt, context = PROMPTS[2], CONTEXTS[2]
    expected = reference(upstream.url, runner, prompt, context).token_ids
    with proxy_for(upstream.url, runner, lookahead=1, max_retries=2, backoff=0.2) as proxy:
        events = []
        with proxy.http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "stream": True,
                "temperature": 0, "costeer_strength": 0.5, "costeer_context": context}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        upstream.kill()
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] in (502, 503) and "upstream" in error["message"]
        assert proxy.http.get("/health").status_code == 200
        with pytest.raises(openai.InternalServerError):  # still down: a clear 503, not a hang
            chat(proxy, prompt, context)
        upstream.start()
        assert ids_of(chat(proxy, prompt, context)) == expected  # served again, steered as before
        assert proxy.stats()["requests"]["open"] == 0
