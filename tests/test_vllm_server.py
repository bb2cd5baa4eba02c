"""CoSteer behind a real vLLM OpenAI server (multiprocess engine), driven with the ``openai`` client.

The server is started as ``costeer serve`` starts it (processor and HTTP middleware); the raw-JSON and
streamed-refusal cases are in ``tests/test_vllm_http_input.py``."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.vllm

SYSTEM = "You are a helpful assistant."
TOPICS = ["dinner", "tea", "dragons", "chess", "rain", "bread", "rivers", "music",
          "gardens", "trains", "autumn", "coffee", "stars", "cities", "forests", "oceans"]
CONTEXTS = [f"I love {t} and I answer in a warm, hopeful tone. Profile {i}." for i, t in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def server(tiny_pair_dirs, tmp_path_factory):
    from costeer_processor.vllm import processor_fqcn
    from costeer_processor.vllm_server import COSTEER_MIDDLEWARE, vllm_server

    large, small = tiny_pair_dirs
    args = ["--logits-processors", processor_fqcn(),  # the class for the runner this vLLM will use
            "--middleware", COSTEER_MIDDLEWARE,  # as `costeer serve` starts it
            "--additional-config", json.dumps({"costeer": {"small_model": str(small), "max_context_tokens": 200}}),
            "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16", "--enforce-eager",
            "--served-model-name", "tiny", "--disable-log-stats"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0-1" if (os.cpu_count() or 1) >= 2 else "0"}
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    env["COSTEER_STATS_FILE"] = str(log.with_name("runner_stats.json"))
    with vllm_server(str(large), args, env=env, timeout=600, log_path=log) as base:
        yield base, log


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(client, user, context=None, max_tokens=24, **xargs):
    extra = {}
    if context is not None:
        xargs["costeer_context"] = context
    if xargs:
        extra["extra_body"] = {"vllm_xargs": xargs}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=max_tokens, temperature=0.0, **extra)
    return r.choices[0].message.content


def test_steered_chat_completion(client):
    plain = chat(client, "Suggest a dinner recipe.")
    steered = chat(client, "Suggest a dinner recipe.", "I am vegan and I love spicy food.")
    assert steered and plain and steered != plain
    assert chat(client, "Suggest a dinner recipe.") == plain  # untouched requests stay untouched
    # per-request hyper-parameters go through vllm_xargs too (strength 0 = no steering)
    assert chat(client, "Suggest a dinner recipe.", "I am vegan.", costeer_strength=0.0) == plain


@pytest.mark.parametrize("xargs,needle", [
    ({"costeer_context": "x", "costeer_T": -3}, "costeer_T"),
    ({"costeer_context": "x", "costeer_strenght": 2.0}, "costeer_strenght"),
    ({"costeer_context": ""}, "costeer_context is empty"),
    ({"costeer_context": "x", "costeer_eos_guard": 2.0}, "costeer_eos_guard"),
    ({"costeer_context": "word " * 600}, "over the limit of 200"),
    ({"costeer_context": "x", "costeer_T": True}, "costeer_T must be an integer, got bool True"),  # not read as 1
    ({"costeer_context": "x", "costeer_gate_patience": False}, "costeer_gate_patience must be an integer, got bool"),
    ({"costeerContext": "x"}, "did you mean 'costeer_context'?"),  # not served unsteered
])
def test_invalid_arguments_give_400_and_the_server_keeps_serving(client, xargs, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
            extra_body={"vllm_xargs": xargs})
    assert info.value.status_code == 400
    assert needle in str(info.value)
    assert chat(client, "Hello", "I like tea.", max_tokens=4)  # still serving


def test_concurrent_requests_equal_the_same_requests_alone(client):
    user = "Tell me something nice for today."
    alone = [chat(client, user, c) for c in CONTEXTS]
    assert len(set(alone)) > 1  # different contexts steer differently
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: chat(client, user, c), CONTEXTS))
    assert together == alone


def test_completions_endpoint_and_engine_log(client, server):
    r = client.completions.create(model="tiny", prompt="The weather today is", max_tokens=8, temperature=0.0,
                                  extra_body={"vllm_xargs": {"costeer_context": "I love rain."}})
    assert r.choices[0].text is not None
    log = server[1].read_text(errors="replace")
    assert "CoSteer: small model" in log
    assert "Traceback" not in log


def test_context_length_counts_the_prompt_like_the_runner(client, tiny_pair_dirs):
    """The frontend check tokenizes context + templated prompt exactly as the engine's runner does."""
    import openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair_dirs[1]))
    context = "I like green tea. "
    while len(tok(context * 2, add_special_tokens=False)["input_ids"]) < 150:
        context *= 2
    assert len(tok(context, add_special_tokens=False)["input_ids"]) < 180
    assert chat(client, "Hi", context, max_tokens=2)  # fits with a short prompt
    long_prompt = "Tell me about the history of tea in many words. " * 6
    with pytest.raises(openai.BadRequestError, match="over the limit of 200"):
        chat(client, long_prompt, context, max_tokens=2)
    assert chat(client, long_prompt, max_tokens=2)  # the prompt alone is fine without steering


def test_aborted_streams_free_their_small_model_rows(client, server):
    """8 steered streams closed after a few tokens: the runner is empty again afterwards (no leak)."""
    def aborted_stream(i):
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Tell me a long story number {i}."}],
            max_tokens=64, temperature=0.0, stream=True,
            extra_body={"vllm_xargs": {"costeer_context": CONTEXTS[i]}})
        chunks = 0
        for chunks, _ in enumerate(stream, 1):
            if chunks >= 3:
                break
        stream.close()
        return chunks

    with ThreadPoolExecutor(8) as pool:
        assert all(n >= 1 for n in pool.map(aborted_stream, range(8)))
    import time

    stats_path = server[1].with_name("runner_stats.json")
    deadline = time.monotonic() + 60
    stats = {}
    while time.monotonic() < deadline:
        chat(client, "hi", max_tokens=2)  # vLLM hands aborted requests to the processor at its next step
        time.sleep(0.5)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        if stats.get("requests") == 0:
            break
    assert stats["requests"] == 0 and stats["cached_rows"] == 0 and stats["kv_bytes"] == 0, stats
    assert stats["steps"] > 0 and stats["parked"] == 0
