"""Split mode: unmodified remote vLLM server for the large model, small model + context on the device.

Two kinds of server:

* a fake OpenAI/vLLM server (``FakeVLLM``, a few dozen lines over ``http.server``) backed by the tiny
  large model in-process: fast, exact, and able to misbehave on purpose (no log-probs, another
  tokenizer, ids beyond the vocabulary, 503s, a stream cut in the middle);
* a real ``vllm serve`` (``@pytest.mark.vllm``, one per module, restarted once by the last test).

The privacy test puts a recording HTTP proxy between the client and the real server and checks
that neither the context's text nor its token ids ever cross the wire.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from costeer_processor import CoSteerConfig, SmallModelRunner
from costeer_processor.core import Variants
from costeer_processor.hf import CoSteerLogitsProcessor
from costeer_processor.split import (
    PROBE_TEXT,
    ServerUnavailableError,
    SplitCoSteerClient,
    SplitModeError,
    generate_split,
)
from costeer_processor.split.decode import RunnerGuard
from costeer_processor.steering import Steerer
from costeer_processor.testing import LoopbackProxy

PROMPTS = ["Suggest a dinner recipe.", "Tell me about the history of tea.", "Write a story about a dragon."]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer uplifting, warm answers.", "My hobbies are chess and hiking."]
SECRET = "Private note: my name is Zorblax Quentin, allergic to peanuts, living at 42 Hazelmere Lane, PIN 7319."
SECRET_UNICODE = "Je suis végétarien, j’adore le café ☕ — 東京, Zoë Ñúñez, née à Zürich."
N_NEW = 24


# --------------------------------------------------------------------------- models and the HF reference
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


def hf_reference(pair, runner, prompt, context, max_new_tokens=N_NEW, **kw):
    """The in-process processor's greedy output (the fidelity reference)."""
    large, _, tok, _, _ = pair
    proc = CoSteerLogitsProcessor(runner, [context], **kw)  # reads the prompt from input_ids
    ids = tok(runner.splicer.render(prompt), return_tensors="pt", add_special_tokens=False)
    out = large.generate(**ids, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                         max_new_tokens=max_new_tokens)
    return out[0, ids["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------- a fake vLLM server
class FakeVLLM:
    """Speaks the bits of vLLM's OpenAI API that split mode uses, with the tiny large model in-process."""

    def __init__(self, model, tokenizer, name="fake-large", *, logprobs=True, token_ids_as_ids=True,
                 tokenize_offset=0, id_offset=0, fail_first=0, break_stream_after=None, max_logprobs=-1,
                 fail_status=503, restart_after=None, restart_as=None):
        self.model, self.tok, self.name = model, tokenizer, name
        self.logprobs, self.ids_ok = logprobs, token_ids_as_ids
        self.tokenize_offset, self.id_offset = tokenize_offset, id_offset
        self.fail_first, self.fail_status = fail_first, fail_status
        self.break_stream_after, self.max_logprobs = break_stream_after, max_logprobs
        # after this many completion requests the server "restarts" (closes the connection) as restart_as
        self.restart_after, self.restart_as, self.completions = restart_after, dict(restart_as or {}), 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, status, obj, close=False):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": {}})
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": fake.name, "object": "model", "max_model_len": 512}]})
                self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body})
                if self.path == "/tokenize":
                    ids = fake.tok(body["prompt"], add_special_tokens=False)["input_ids"]
                    return self._json(200, {"count": len(ids), "max_model_len": 512,
                                            "tokens": [i + fake.tokenize_offset for i in ids]})
                if self.path != "/v1/completions":
                    return self._json(404, {"error": {"message": "not found"}})
                with fake.lock:
                    if fake.fail_first > 0:
                        fake.fail_first -= 1
                        return self._json(fake.fail_status, {"error": {"message": "engine busy"}})
                k = body.get("logprobs")
                if k is not None and fake.max_logprobs != -1 and (k == -1 or k > fake.max_logprobs):
                    return self._json(400, {"error": {"message": f"Requested sample logprobs of {k}, which is "
                                                                 f"greater than max allowed: {fake.max_logprobs}"}})
                if body.get("stream"):
                    return self._stream(body)
                prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
                choices = [fake.complete(i, p, body) for i, p in enumerate(prompts)]
                with fake.lock:
                    fake.completions += 1
                    restart = fake.completions == fake.restart_after
                    if restart:  # this answer is the old server's last word; the next connection meets the new one
                        for attr, value in fake.restart_as.items():
                            setattr(fake, attr, value)
                self._json(200, {"object": "text_completion", "model": fake.name, "choices": choices}, close=restart)

            def _stream(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                ids = list(body["prompt"])
                stop = set(body.get("stop_token_ids") or [])
                for n in range(body["max_tokens"]):
                    if fake.break_stream_after is not None and n == fake.break_stream_after:
                        fake.break_stream_after = None
                        self.wfile.flush()
                        self.close_connection = True
                        return  # cut: no [DONE]
                    tok = int(fake.next_logprobs(ids).argmax())
                    ids.append(tok)
                    last = tok in stop or n == body["max_tokens"] - 1
                    event = {"choices": [{"index": 0, "text": "", "token_ids": [tok],
                                          "finish_reason": ("stop" if tok in stop else "length") if last else None}]}
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    if tok in stop:
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @torch.no_grad()
    def next_logprobs(self, ids):
        logits = self.model(torch.tensor([ids])).logits[0, -1].float()
        return torch.log_softmax(logits, -1)

    def complete(self, index, prompt, body):
        ids, tokens, tops = list(prompt), [], []
        stop = set(body.get("stop_token_ids") or [])
        k = body.get("logprobs")
        for _ in range(body["max_tokens"]):
            lp = self.next_logprobs(ids)
            tok = int(lp.argmax())
            ids.append(tok)
            if k is not None:
                order = lp.argsort(descending=True)
                keep = order if k == -1 else order[:max(k, 1)]
                name = (lambda i: f"token_id:{i + self.id_offset}") if self.ids_ok else self.tok.decode
                tokens.append(name(tok))
                tops.append({name(int(i)): float(lp[i]) for i in keep})
            if tok in stop:
                break
        logprobs = {"tokens": tokens, "top_logprobs": tops, "token_logprobs": [0.0] * len(tokens),
                    "text_offset": [0] * len(tokens)} if (k is not None and self.logprobs) else None
        return {"index": index, "text": "", "logprobs": logprobs, "finish_reason": "length"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(pair):
    with FakeVLLM(pair[0], pair[2]) as f:
        yield f


# --------------------------------------------------------------------------- fake-server tests (fast)
@pytest.mark.parametrize("lookahead", [1, 4])
def test_fake_server_equals_hf_processor(pair, runner, fake, lookahead):
    client = SplitCoSteerClient(fake.url, runner, lookahead=lookahead)
    for p, c in zip(PROMPTS, CONTEXTS):
        res = client.generate(p, c, max_new_tokens=N_NEW)
        assert res.token_ids == hf_reference(pair, runner, p, c)
        assert res.steered_tokens == len(res.token_ids)
        assert res.round_trips <= len(res.token_ids)
    batch = client.generate_batch(PROMPTS, CONTEXTS, max_new_tokens=N_NEW)
    assert [r.token_ids for r in batch] == [hf_reference(pair, runner, p, c) for p, c in zip(PROMPTS, CONTEXTS)]
    assert len(runner) == 0  # every small-model row was released
    client.close()


def test_gated_generation_hands_off_to_one_stream(pair, runner, fake):
    # The random tiny model is never confident at 0.1, so gate generously to exercise the hand-off.
    client = SplitCoSteerClient(fake.url, runner, variants=Variants(gate_threshold=0.99, gate_patience=3), lookahead=1)
    res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
    assert res.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], variants=Variants(gate_threshold=0.99, gate_patience=3))
    assert res.handoff_at == 3 and res.steered_tokens == 2
    streams = [r for r in fake.requests if r["body"].get("stream")]
    assert len(streams) == 1 and res.round_trips == 3 + 1
    pieces = list(client.stream(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW))
    assert "".join(pieces) == res.text and client.last_result.token_ids == res.token_ids


@pytest.mark.parametrize("lookahead", [1, 3])
def test_certified_topk_equals_hf_processor(pair, runner, fake, lookahead):
    """Top-2 log-probs + the certificate (more candidates by rank where it fails) = exact CoSteer."""
    client = SplitCoSteerClient(fake.url, runner, top_logprobs=2, lookahead=lookahead, certify_levels=(16, -1))
    results = client.generate_batch(PROMPTS, CONTEXTS, max_new_tokens=N_NEW)
    assert [r.token_ids for r in results] == [hf_reference(pair, runner, p, c) for p, c in zip(PROMPTS, CONTEXTS)]
    assert sum(r.escalations for r in results) > 0 and all(r.uncertified == 0 for r in results)
    levels = [r["body"]["logprobs"] for r in fake.requests if r["body"].get("max_tokens") == 1]
    assert 16 in levels
    # never by id: the ids that could win are the ones the context boosts
    assert not any("logprob_token_ids" in r["body"] for r in fake.requests)


def test_certificate_falls_back_when_the_server_refuses_more_logprobs(pair, runner):
    with FakeVLLM(pair[0], pair[2], max_logprobs=2) as f:
        client = SplitCoSteerClient(f.url, runner, top_logprobs=2, lookahead=1, certify_levels=(16, -1))
        res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
        assert len(res.token_ids) == N_NEW and res.uncertified > 0 and res.escalations == 2 * res.uncertified


def test_topk_steers_over_the_server_candidates(pair, runner, fake):
    client = SplitCoSteerClient(fake.url, runner, top_logprobs=5, lookahead=1, certify=False)
    res = client.generate(PROMPTS[1], CONTEXTS[1], max_new_tokens=12)
    assert res.uncertified == len(res.token_ids) and res.escalations == 0
    bodies = [r for r in fake.requests if r["path"] == "/v1/completions"]
    assert all(r["body"]["logprobs"] == 5 for r in bodies)
    large, _, tok, _, _ = pair
    prefix = runner.encode_branches(PROMPTS[1], CONTEXTS[1])[1]
    for t in res.token_ids:  # every chosen token is among the large model's top 5 at its position
        assert t in fake.next_logprobs(prefix).topk(5).indices.tolist()
        prefix = prefix + [t]


def test_sampling_is_reproducible_with_a_seed(runner, fake):
    client = SplitCoSteerClient(fake.url, runner)
    a = client.generate(PROMPTS[2], CONTEXTS[2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    b = client.generate(PROMPTS[2], CONTEXTS[2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


def test_transient_errors_are_retried(pair, runner):
    with FakeVLLM(pair[0], pair[2], fail_first=2) as f:
        client = SplitCoSteerClient(f.url, runner, backoff=0.01, max_retries=3)
        res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=6)
        assert res.retries == 2 and res.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], 6)
    with FakeVLLM(pair[0], pair[2], fail_first=10) as f:
        client = SplitCoSteerClient(f.url, runner, backoff=0.01, max_retries=2)
        with pytest.raises(ServerUnavailableError, match="failed 3 times"):
            client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=6)
    assert len(runner) == 0


def test_broken_stream_resumes_from_accepted_tokens(pair, runner):
    with FakeVLLM(pair[0], pair[2], break_stream_after=4) as f:
        client = SplitCoSteerClient(f.url, runner, variants=Variants(gate_threshold=0.99), lookahead=1, backoff=0.01)
        res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
        ref = hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], variants=Variants(gate_threshold=0.99))
        assert res.token_ids == ref and res.retries == 1
        streams = [r["body"] for r in f.requests if r["body"].get("stream")]
        assert len(streams) == 2
        # the second stream starts from prompt + every token accepted before the cut
        assert len(streams[1]["prompt"]) == len(streams[0]["prompt"]) + 4


def test_unreachable_server_is_a_clear_error(runner):
    from costeer_processor.vllm_server import free_port

    client = SplitCoSteerClient(f"http://127.0.0.1:{free_port()}", runner, max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(ServerUnavailableError, match="GET /v1/models failed 2 times"):
        client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=4)


@pytest.mark.parametrize("kind,message", [
    (dict(logprobs=False), "returned no log-probs"),
    (dict(tokenize_offset=1), "tokenizer differs"),
    (dict(id_offset=10_000), "does not have"),
    (dict(token_ids_as_ids=False), "tokens as text"),
    (dict(max_logprobs=20), "--max-logprobs -1"),
])
def test_unusable_servers_give_clear_errors(pair, runner, kind, message):
    with FakeVLLM(pair[0], pair[2], **kind) as f:
        client = SplitCoSteerClient(f.url, runner)
        with pytest.raises(SplitModeError, match=re.escape(message)):
            client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=4)
    assert len(runner) == 0


def test_unknown_model_name_and_bad_arguments(runner, fake):
    with pytest.raises(SplitModeError, match="does not serve model 'nope'"):
        SplitCoSteerClient(fake.url, runner, model="nope").generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_logprobs"):
        SplitCoSteerClient(fake.url, runner, top_logprobs=0)
    with pytest.raises(ValueError, match="lookahead"):
        SplitCoSteerClient(fake.url, runner, lookahead=0)
    with pytest.raises(ValueError, match="context is empty"):
        SplitCoSteerClient(fake.url, runner).generate(PROMPTS[0], "  ", max_new_tokens=2)


def test_generate_split_convenience(pair, fake, tiny_pair_dirs):
    res = generate_split(fake.url, "fake-large", tiny_pair_dirs[1], PROMPTS[0], CONTEXTS[0], max_new_tokens=8)
    runner = SmallModelRunner(pair[1], pair[2])
    assert res.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], 8)
    text = "".join(generate_split(fake.url, None, runner, PROMPTS[0], CONTEXTS[0], max_new_tokens=8, stream=True))
    assert text == res.text


def test_abandoned_stream_blocks_no_later_call(pair, runner, fake):
    """stream() holds no lock while the caller has a piece: a stream left open blocks nobody."""
    refs = [hf_reference(pair, runner, PROMPTS[i], CONTEXTS[i]) for i in (0, 1)]
    client = SplitCoSteerClient(fake.url, runner, lookahead=1)
    pieces = client.stream(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
    first = next(pieces)  # suspended mid-generation; `pieces` stays referenced (not closed by GC)
    assert first and len(runner) == 1
    done = {}
    worker = threading.Thread(target=lambda: done.update(res=client.generate(PROMPTS[1], CONTEXTS[1],
                                                                              max_new_tokens=N_NEW)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert "res" in done, "generate() stayed blocked behind an abandoned stream"
    assert done["res"].token_ids == refs[1]
    rest = "".join(pieces)  # the abandoned stream still finishes, and correctly
    assert first + rest == client.last_result.text and client.last_result.token_ids == refs[0]
    assert len(runner) == 0
    # dropped without finishing: its rows are freed when the generator is closed
    pieces = client.stream(PROMPTS[2], CONTEXTS[2], max_new_tokens=N_NEW)
    assert next(pieces) and len(runner) == 1
    pieces.close()
    assert len(runner) == 0


def test_two_clients_can_share_one_runner(pair, runner, fake):
    """One lock per runner (not per client) and keys unique per client: concurrent clients on one runner."""
    refs = [hf_reference(pair, runner, p, c) for p, c in zip(PROMPTS, CONTEXTS)]
    a = SplitCoSteerClient(fake.url, runner, lookahead=1)
    b = SplitCoSteerClient(fake.url, runner, lookahead=3)
    got, errors = {}, []

    def work(name, client, order):
        try:
            got[name] = [client.generate(PROMPTS[i], CONTEXTS[i], max_new_tokens=N_NEW).token_ids for i in order]
        except Exception as e:  # reported below with the test's assertion
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=work, args=("a", a, [0, 1, 2])),
                   threading.Thread(target=work, args=("b", b, [2, 0, 1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert got["a"] == refs and got["b"] == [refs[2], refs[0], refs[1]]
    # interleaved streams of both clients: the same prompt with two contexts, side by side in the runner
    sa = a.stream(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
    sb = b.stream(PROMPTS[0], CONTEXTS[1], max_new_tokens=N_NEW)
    next(sa), next(sb)
    assert len(runner) == 2
    for _ in sa:
        pass
    assert a.last_result.token_ids == refs[0]
    for _ in sb:
        pass
    assert b.last_result.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[1])
    assert len(runner) == 0


@pytest.mark.timeout(60)
def test_rows_released_inside_a_running_section_are_freed_when_it_ends(runner):
    """What a stream generator finalised by the GC in the middle of a round does: no deadlock, no
    removal in the middle of a runner call, the rows freed when the section ends."""
    guard = RunnerGuard.of(runner)
    assert RunnerGuard.of(runner) is guard  # one guard (one lock) per runner, whatever the client
    steerer = Steerer(runner, runner.tokenizer, [runner.tokenizer.eos_token_id])
    prompt = runner.tokenizer(runner.splicer.render(PROMPTS[0]), add_special_tokens=False)["input_ids"]
    slot = steerer.admit(steerer.request(prompt, CONTEXTS[0], gain=1.0))
    with guard.hold():
        steerer.small(torch.tensor([slot]), [[]])  # its rows are in the runner now
    with guard.hold():
        guard.release(steerer, [slot])
        assert steerer.key(slot) in runner
    assert steerer.stats()["slots"] == 0 and len(runner) == 0


@pytest.mark.parametrize("restart_as,message", [
    ({}, None),  # the same model again: the generation goes on
    ({"name": "another-large"}, "does not serve model 'fake-large' any more"),
    ({"tokenize_offset": 1}, "tokenizer differs"),
])
def test_reconnect_checks_the_server_again(pair, runner, restart_as, message):
    with FakeVLLM(pair[0], pair[2], restart_after=3, restart_as=restart_as) as f:
        client = SplitCoSteerClient(f.url, runner, lookahead=1)
        if message is None:
            res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=8)
            assert res.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], 8)
        else:
            with pytest.raises(SplitModeError, match=re.escape(message)):
                client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=8)
        paths = [r["path"] for r in f.requests]
        assert paths.count("/v1/models") == 2  # once per connection
        assert paths.count("/tokenize") == (1 if "name" in restart_as else 2)  # (a wrong model stops the probe)
        assert paths.index("/v1/models", 1) > 3  # the second probe came after the restart
    assert len(runner) == 0


@pytest.mark.parametrize("system", [None, "You are a terse assistant who loves lists."])
def test_split_feeds_the_small_model_what_the_hf_processor_feeds_it(pair, runner, fake, monkeypatch, system):
    """The same conversation gives the same small-model branches in split mode and in the HF processor."""
    tok = pair[2]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "Gladly."},
        {"role": "user", "content": PROMPTS[0]}]
    added = []
    real_add = runner.add
    monkeypatch.setattr(runner, "add", lambda key, w, wo, **kw: (added.append((list(w), list(wo))),
                                                                 real_add(key, w, wo, **kw)))
    SplitCoSteerClient(fake.url, runner).generate(messages, CONTEXTS[0], max_new_tokens=2)
    monkeypatch.undo()
    input_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    proc = CoSteerLogitsProcessor(runner, [CONTEXTS[0]])
    hf = [proc.steerer.request(row, CONTEXTS[0], gain=1.0).branches for row in input_ids.tolist()]
    assert added == [tuple(map(list, b)) for b in hf]
    assert (system is not None) == (tok.decode(added[0][1]).count("<|im_start|>system") == 1)  # nothing added


# --------------------------------------------------------------------------- privacy proxy
def _as_id(x):
    """An int token id, a ``"token_id:N"`` field or a numeric string key, as an int (else None)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, str):
        digits = x[len("token_id:"):] if x.startswith("token_id:") else x
        if digits.isdigit():
            return int(digits)
    return None


def _id_sequences(obj):
    """Every run of token ids in a JSON body: lists of ids, and the keys of id-keyed objects (logit_bias...)."""
    if isinstance(obj, list):
        ids = [_as_id(x) for x in obj]
        if obj and all(i is not None for i in ids):
            yield ids
        for x in obj:
            yield from _id_sequences(x)
    elif isinstance(obj, dict):
        keys = [_as_id(k) for k in obj]
        if obj and all(k is not None for k in keys):
            yield keys
        for x in obj.values():
            yield from _id_sequences(x)


_int_lists = _id_sequences  # the name tests/test_vocab_map.py imports


def _contains_run(seq, run):
    n = len(run)
    return any(seq[i:i + n] == run for i in range(len(seq) - n + 1))


def assert_context_never_sent(records, runner, prompt, context, min_chars=8, min_ids=4):
    assert records, "the proxy saw no traffic"
    wire = "\n".join(f"{m} {p}\n{h}\n{b.decode('utf-8', 'replace')}" for m, p, h, b in records)
    # the text and every window of min_chars characters of it (except those of the public probe
    # text, which shares "café ☕ — " with the non-ASCII secret), raw and JSON-escaped (\uXXXX)
    escaped = lambda text: json.dumps(text)[1:-1]  # noqa: E731
    assert context not in wire and escaped(context) not in wire
    windows = {context[i:i + min_chars] for i in range(len(context) - min_chars + 1)}
    leaked = sorted(w for w in windows if w not in PROBE_TEXT and (w in wire or escaped(w) in wire))
    assert not leaked, f"context fragments on the wire: {leaked}"
    # the token ids: the context alone, and the span it occupies inside the with-context prompt
    with_ids, without_ids = runner.encode_branches(prompt, context)
    pre = next((i for i, (a, b) in enumerate(zip(with_ids, without_ids)) if a != b), len(without_ids))
    suf = 0
    while suf < len(without_ids) - pre and with_ids[-1 - suf] == without_ids[-1 - suf]:
        suf += 1
    spans = [runner.encode_text(context), with_ids[pre:len(with_ids) - suf]]
    sent = [ids for _, _, _, b in records if b for ids in _id_sequences(json.loads(b))]
    for span in spans:
        assert len(span) >= min_ids
        for i in range(len(span) - min_ids + 1):
            run = span[i:i + min_ids]
            assert not any(_contains_run(ids, run) for ids in sent), f"context ids {run} were sent"
    # and the check is not vacuous: the public prompt's ids did go out
    assert any(_contains_run(ids, without_ids) for ids in sent)
    # no request names token ids to score (those would be the ids the context favours)
    assert b"logprob_token_ids" not in b"".join(b for _, _, _, b in records)


def test_privacy_check_catches_leaks(runner):
    """The checker is not blind: each way of leaking the non-ASCII secret is caught."""
    with_ids, without_ids = runner.encode_branches(PROMPTS[0], SECRET_UNICODE)
    ids = runner.encode_text(SECRET_UNICODE)
    public = json.dumps({"prompt": without_ids}).encode()
    leaks = [json.dumps({"prompt": SECRET_UNICODE[5:30]}, ensure_ascii=False).encode(),  # raw UTF-8
             json.dumps({"prompt": SECRET_UNICODE[5:30]}).encode(),  # \uXXXX escapes
             json.dumps({"prompt": with_ids}).encode(),  # the with-context prompt
             json.dumps({"logit_bias": {str(i): 5 for i in ids[2:7]}}).encode(),  # id-keyed
             json.dumps({"tokens": [f"token_id:{i}" for i in ids[:4]]}).encode()]
    assert_context_never_sent([("POST", "/v1/completions", "", public)], runner, PROMPTS[0], SECRET_UNICODE)
    for leak in leaks:
        with pytest.raises(AssertionError):
            assert_context_never_sent([("POST", "/v1/completions", "", public), ("POST", "/x", "", leak)],
                                      runner, PROMPTS[0], SECRET_UNICODE)


@pytest.mark.parametrize("secret", [SECRET, SECRET_UNICODE])
def test_privacy_on_fake_server(runner, fake, secret):
    proxy = LoopbackProxy(fake.url)
    try:
        client = SplitCoSteerClient(proxy.url, runner, variants=Variants(gate_threshold=0.99))
        client.generate(PROMPTS[0], secret, max_new_tokens=12)
        certified = SplitCoSteerClient(proxy.url, runner, top_logprobs=2, certify_levels=(16, -1))
        assert certified.generate(PROMPTS[0], secret, max_new_tokens=12).escalations > 0
        assert any(b'"stream":true' in b for _, _, _, b in proxy.records)  # the hand-off went through too
        assert_context_never_sent(proxy.records, runner, PROMPTS[0], secret)
    finally:
        proxy.close()


# --------------------------------------------------------------------------- a real vLLM server
SERVER_ARGS = ["--dtype", "float32", "--max-logprobs", "-1", "--enable-prefix-caching", "--max-model-len", "512",
               "--served-model-name", "tiny-large", "--seed", "0"]


class RestartableServer:
    """``vllm serve`` on a fixed loopback port that a test can kill and start again."""

    def __init__(self, model_dir: Path, log_dir: Path):
        from costeer_processor.vllm_server import free_port

        self.model_dir, self.log_dir = model_dir, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self, timeout=300):
        from costeer_processor.vllm_server import server_command, server_env, wait_healthy

        self.starts += 1
        log = self.log_dir / f"vllm_{self.starts}.log"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(server_command(str(self.model_dir), SERVER_ARGS, port=self.port),
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=server_env({"VLLM_CPU_KVCACHE_SPACE": "1"}))
        wait_healthy(self.url, self.proc, timeout, log)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        from costeer_processor.vllm_server import stop_process

        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture(scope="module")
def vllm_url_server(tiny_pair_dirs, tmp_path_factory):
    pytest.importorskip("vllm")
    server = RestartableServer(tiny_pair_dirs[0], tmp_path_factory.mktemp("vllm_logs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_full_vocab_equals_hf_processor(pair, runner, vllm_url_server):
    refs = [hf_reference(pair, runner, p, c) for p, c in zip(PROMPTS, CONTEXTS)]
    for lookahead in (1, 4):
        client = SplitCoSteerClient(vllm_url_server.url, runner, lookahead=lookahead)
        got = [client.generate(p, c, max_new_tokens=N_NEW).token_ids for p, c in zip(PROMPTS, CONTEXTS)]
        assert got == refs, f"lookahead={lookahead}"
        assert [r.token_ids for r in client.generate_batch(PROMPTS, CONTEXTS, max_new_tokens=N_NEW)] == refs
        client.close()
    # top-3 log-probs with the certificate: still exact
    client = SplitCoSteerClient(vllm_url_server.url, runner, top_logprobs=3, lookahead=2)
    assert [r.token_ids for r in client.generate_batch(PROMPTS, CONTEXTS, max_new_tokens=N_NEW)] == refs
    # gated: steering stops after 3 confident steps and the server finishes in one stream
    client = SplitCoSteerClient(vllm_url_server.url, runner, variants=Variants(gate_threshold=0.99), lookahead=1)
    res = client.generate(PROMPTS[0], CONTEXTS[0], max_new_tokens=N_NEW)
    assert res.handoff_at == 3
    assert res.token_ids == hf_reference(pair, runner, PROMPTS[0], CONTEXTS[0], variants=Variants(gate_threshold=0.99))


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_topk_mode_runs(runner, vllm_url_server):
    client = SplitCoSteerClient(vllm_url_server.url, runner, top_logprobs=5, lookahead=2)
    res = client.generate(PROMPTS[1], CONTEXTS[1], max_new_tokens=N_NEW)
    assert len(res.token_ids) == N_NEW or res.finish_reason == "stop"


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_privacy_through_recording_proxy(runner, vllm_url_server):
    proxy = LoopbackProxy(vllm_url_server.url)
    try:
        client = SplitCoSteerClient(proxy.url, runner, lookahead=2)
        client.generate(PROMPTS[0], SECRET, max_new_tokens=N_NEW)
        certified = SplitCoSteerClient(proxy.url, runner, top_logprobs=2)  # with certificate requests
        certified.generate(PROMPTS[0], SECRET, max_new_tokens=N_NEW)
        client.generate_batch(PROMPTS[:2], [SECRET, CONTEXTS[1]], max_new_tokens=8)
        gated = SplitCoSteerClient(proxy.url, runner, variants=Variants(gate_threshold=0.99))  # includes a streaming hand-off
        "".join(gated.stream(PROMPTS[2], SECRET, max_new_tokens=N_NEW))
        certified.generate(PROMPTS[1], SECRET_UNICODE, max_new_tokens=N_NEW)
        "".join(gated.stream(PROMPTS[1], SECRET_UNICODE, max_new_tokens=N_NEW))
        paths = {p for _, p, _, _ in proxy.records}
        assert {"/v1/models", "/tokenize", "/v1/completions"} <= paths
        assert any(b"\"stream\":true" in b for _, _, _, b in proxy.records)
        for prompt in (PROMPTS[0], PROMPTS[2]):  # the two prompts that went out with the secret context
            assert_context_never_sent(proxy.records, runner, prompt, SECRET)
        assert_context_never_sent(proxy.records, runner, PROMPTS[1], SECRET_UNICODE)
    finally:
        proxy.close()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_server_killed_and_restarted_mid_generation(pair, runner, vllm_url_server):
    """Last in the module: kills the shared server. The generation completes and equals the uninterrupted one."""
    client = SplitCoSteerClient(vllm_url_server.url, runner, lookahead=1, max_retries=60, backoff=0.2,
                                backoff_max=3.0, timeout=30)
    expected = client.generate(PROMPTS[2], CONTEXTS[2], max_new_tokens=N_NEW).token_ids
    start_count = client.requests_made

    def kill_and_restart():  # after 5 tokens (one request per token at lookahead=1)
        while client.requests_made < start_count + 5:
            time.sleep(0.005)
        vllm_url_server.kill()
        vllm_url_server.start()

    restarter = threading.Thread(target=kill_and_restart)
    restarter.start()
    pieces = list(client.stream(PROMPTS[2], CONTEXTS[2], max_new_tokens=N_NEW))
    restarter.join()
    assert vllm_url_server.starts == 2
    res = client.last_result
    assert res.retries >= 1
    assert res.token_ids == expected
    assert "".join(pieces) == res.text


STYLE_OPTIONS = [Variants(ngram_guard=2), Variants(plausibility=0.05), Variants(plausibility=0.05, plausibility_mode="large"),
                 Variants(delta_clip=0.5), Variants(placebo=True),
                 Variants(ngram_guard=3, delta_clip=1.0, plausibility=0.1, eos_guard=0.9)]


@pytest.mark.parametrize("variants", STYLE_OPTIONS, ids=lambda v: ",".join(
    f"{k}={getattr(v, k)}" for k in ("ngram_guard", "plausibility", "plausibility_mode", "delta_clip", "placebo")
    if getattr(v, k) not in (None, 0, False, "mask")) or "plain")
def test_split_with_style_options_and_the_guard_equals_hf(pair, runner, fake, variants):
    """Every option of the one steering step gives the same tokens in split mode as in the HF processor."""
    config = CoSteerConfig(strength=4.0)
    client = SplitCoSteerClient(fake.url, runner, config=config, variants=variants)
    for p, c in zip(PROMPTS[:2], CONTEXTS[:2]):
        got = client.generate(p, c, max_new_tokens=12).token_ids
        assert got == hf_reference(pair, runner, p, c, 12, config=config, variants=variants)
    assert len(runner) == 0


def test_the_ngram_guard_keeps_a_copying_small_model_from_sending_the_context(pair, runner, fake, monkeypatch):
    """Split mode sends every generated token back to the server: a small model that copies its context
    would send the context. With the n-gram guard no run of 4 context ids (nor the text) crosses the wire;
    without it, the same recording check fails (the check is not vacuous)."""
    from test_steering import _copier, _request_with_context_ids

    from costeer_processor.steering import Steerer

    outcomes = {}
    for guard in (0, 4):
        proxy = LoopbackProxy(fake.url)
        try:
            client = SplitCoSteerClient(proxy.url, runner, config=CoSteerConfig(strength=8.0),
                                        variants=Variants(ngram_guard=guard), lookahead=1)
            monkeypatch.setattr(Steerer, "request", _request_with_context_ids(Steerer.request))
            monkeypatch.setattr(runner, "step", _copier(client._decoder.steerer))
            client.generate(PROMPTS[0], SECRET, max_new_tokens=24)
            monkeypatch.undo()
            try:
                assert_context_never_sent(proxy.records, runner, PROMPTS[0], SECRET)
                outcomes[guard] = "clean"
            except AssertionError as e:
                outcomes[guard] = str(e)
        finally:
            monkeypatch.undo()
            proxy.close()
    assert outcomes[4] == "clean"
    assert "context ids" in outcomes[0]
    assert len(runner) == 0
