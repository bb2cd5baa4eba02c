"""The ``costeer`` command: argument handling, one-line errors, generate / demo / serve / models on tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from costeer_processor import cli
from costeer_processor.loading import fast_dtype

pytestmark = pytest.mark.timeout(300)

PROMPT = "Suggest a dinner recipe."
CONTEXT = "I am vegan and I love spicy food."


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *needles):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("costeer: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, needles", [
    ([], ["COMMAND"]),
    (["frobnicate"], ["invalid choice"]),
    (["generate"], ["--large", "--small"]),
    (["generate", "--large", "a", "--small", "b"], ["--prompt"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi"], ["--context"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "  "], ["--context is empty"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--context-file", "f"],
     ["not allowed with"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--alpha", "abc"],
     ["--alpha", "must be a number"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--lam", "0"],
     ["--lam", "must be in (0, inf]"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--eta", "-1"], ["--eta"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--T", "0"], ["--T", "must be in [1, "]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--strength", "nan"],
     ["--strength", "finite"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--top-p", "1.5"], ["--top-p"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--temperature", "-1"],
     ["--temperature"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--max-new-tokens", "x"],
     ["--max-new-tokens", "must be an integer"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--output", "o.jsonl"],
     ["--output needs --input"]),
    (["generate", "--large", "a", "--small", "b", "--input", "in.jsonl"], ["--input needs --output"]),
    (["generate", "--large", "nope", "--small", "b", "--prompt", "hi", "--context", "c"],
     ["unknown model 'nope'", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]),
    (["generate", "--large", "a", "--small", "b", "--prompt", "hi", "--context", "c", "--dtype", "int4"], ["--dtype"]),
    (["models", "install"], ["name a preset"]),
    (["models", "install", "qwen-9000"], ["unknown model preset 'qwen-9000'", "smollm2-135m-instruct"]),
    (["models", "frob"], ["invalid choice"]),
    (["demo", "--alpha", "inf"], ["--alpha", "finite"]),
])
def test_user_errors_are_one_line_exit_2(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(argv, capsys)
    assert_user_error(rc, err, *needles)


def test_context_file_errors(tmp_path, capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    base = ["generate", "--large", large, "--small", small, "--prompt", PROMPT]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    rc, _, err = run(base + ["--context-file", empty], capsys)
    assert_user_error(rc, err, "is empty")
    rc, _, err = run(base + ["--context-file", tmp_path / "missing.txt"], capsys)
    assert_user_error(rc, err, "cannot read --context-file", "missing.txt")


def test_input_file_errors(tmp_path, capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    base = ["generate", "--large", large, "--small", small, "--output", tmp_path / "out.jsonl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "context": "c"}\n{"prompt": "no context"}\n')
    rc, _, err = run(base + ["--input", bad], capsys)
    assert_user_error(rc, err, "bad.jsonl:2", "'context'")
    bad.write_text('{"prompt": "hi", "context": "c"}\nnot json\n')
    rc, _, err = run(base + ["--input", bad], capsys)
    assert_user_error(rc, err, "bad.jsonl:2", "not valid JSON")
    bad.write_text("\n")
    rc, _, err = run(base + ["--input", bad], capsys)
    assert_user_error(rc, err, "holds no rows")


def test_not_a_model_folder_and_another_tokenizer_family(tmp_path, capsys, tiny_pair_dirs, mixed_pair_dirs):
    large, small = tiny_pair_dirs
    rc, _, err = run(["generate", "--large", tmp_path, "--small", small, "--prompt", PROMPT, "--context", CONTEXT],
                     capsys)
    assert_user_error(rc, err, "no config.json")
    # a small model of another family: steered on the shared tokens (the map variant), with gating
    _, other = mixed_pair_dirs
    argv = ["generate", "--large", large, "--small", other, "--dtype", "float32", "--prompt", PROMPT,
            "--context", CONTEXT, "--max-new-tokens", "6"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "tokens both vocabularies share" in err and out.strip()
    rc, out2, err = run(argv + ["--gate-threshold", "0.99", "--gate-patience", "1"], capsys)
    assert rc == 0, err
    rc, _, err = run(argv + ["--gate-threshold", "1"], capsys)
    assert rc == 2 and "--gate-threshold" in err


def test_context_longer_than_the_small_window(capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    rc, _, err = run(["generate", "--large", large, "--small", small, "--prompt", PROMPT,
                      "--context", "spicy vegan food " * 400], capsys)
    assert_user_error(rc, err, "over the limit of 512", "shorten the context")  # the small window


def test_split_mode_unreachable_server_is_one_line(capsys, tiny_pair_dirs):
    from costeer_processor.vllm_server import free_port

    large, small = tiny_pair_dirs
    rc, _, err = run(["generate", "--large", large, "--small", small, "--prompt", PROMPT, "--context", CONTEXT,
                      "--dtype", "float32", "--server", f"http://127.0.0.1:{free_port()}", "--retries", "0", "-q"],
                     capsys)
    assert_user_error(rc, err, "split mode")


def test_serve_needs_small_unless_split(capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    rc, _, err = run(["serve", "--large", large, "--dry-run"], capsys)
    assert_user_error(rc, err, "--small", "--split")
    rc, _, err = run(["serve", "--large", large, "--small", small, "--split", "--dry-run"], capsys)
    assert_user_error(rc, err, "drop --small")
    rc, out, _ = run(["serve", "--large", large, "--split", "--dry-run"], capsys)
    assert rc == 0 and "--max-logprobs -1" in out and "--logits-processors" not in out


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    env = dict(os.environ, COSTEER_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "costeer_processor", "generate", "--large", "qwen-9000",
                           "--small", "x", "--prompt", "p", "--context", "c"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("costeer: error: unknown model 'qwen-9000'")
    proc = subprocess.run([sys.executable, "-m", "costeer_processor", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("generate", "demo", "serve", "models"):
        assert command in proc.stdout


# --------------------------------------------------------------------------- generate on tiny models
def expected_costeer(large_dir, small_dir, prompts, contexts, max_new_tokens):
    """What the CLI must print: the HF processor run by hand."""
    from transformers import LogitsProcessorList

    from costeer_processor import SmallModelRunner
    from costeer_processor.hf import CoSteerLogitsProcessor
    from costeer_processor.models import load_model, load_tokenizer
    from costeer_processor.prompts import ContextSplicer, with_system_prompt

    tok = load_tokenizer(large_dir)
    large = load_model(large_dir, "float32")
    runner = SmallModelRunner(load_model(small_dir, "float32"), load_tokenizer(small_dir))
    proc = CoSteerLogitsProcessor(runner, contexts)  # reads the small model's prompt from input_ids
    # the CLI gives both models the conversation with the paper's system prompt as its first message
    texts = [ContextSplicer(tok).render(with_system_prompt(p)) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = large.generate(**enc, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def test_generate_one_prompt_matches_the_hf_processor(capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    rc, out, err = run(["generate", "--large", large, "--small", small, "--prompt", PROMPT, "--context", CONTEXT,
                        "--dtype", "float32", "--max-new-tokens", 12], capsys)
    assert rc == 0, err
    assert out.strip() == expected_costeer(large, small, [PROMPT], [CONTEXT], 12)[0]
    assert out.strip()
    assert "tok/s" in err and "costeer" in err


def test_generate_quiet_and_context_file_and_baseline_modes(capsys, tiny_pair_dirs, tmp_path):
    large, small = tiny_pair_dirs
    ctx = tmp_path / "me.txt"
    ctx.write_text(CONTEXT + "\n")
    base = ["generate", "--large", large, "--small", small, "--prompt", PROMPT, "--context-file", ctx,
            "--dtype", "float32", "--max-new-tokens", 10, "-q"]
    rc, steered, err = run(base, capsys)
    assert rc == 0 and err == ""
    rc, plain, _ = run(base + ["--mode", "large"], capsys)
    assert rc == 0
    rc, zero, _ = run(base + ["--strength", "0"], capsys)
    assert rc == 0
    assert zero == plain  # g = 0 is the large model alone
    assert steered != plain  # the tiny small model's context moves the choice
    for mode in ("small-context", "large-context", "small"):
        rc, out, _ = run(base + ["--mode", mode], capsys)
        assert rc == 0 and out.strip()


def test_generate_batch_jsonl(capsys, tiny_pair_dirs, tmp_path):
    large, small = tiny_pair_dirs
    rows = [{"id": 1, "prompt": PROMPT, "context": CONTEXT},
            {"id": 2, "prompt": "Tell me about the history of tea.", "context": "I prefer uplifting answers."},
            {"id": 3, "prompt": "Write a story about a dragon.", "extra": [1, 2]}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dst = tmp_path / "sub" / "out.jsonl"
    rc, out, err = run(["generate", "--large", large, "--small", small, "--input", src, "--output", dst,
                        "--context", "My hobbies are chess and hiking.", "--batch-size", 2, "--dtype", "float32",
                        "--max-new-tokens", 8], capsys)
    assert rc == 0, err
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3]
    assert got[2]["extra"] == [1, 2] and "context" not in got[2]  # the global context filled the gap
    for g, r in zip(got, rows):
        assert {k: g[k] for k in r} == r
        assert isinstance(g["output"], str)
    assert "wrote 3 rows" in err
    first = expected_costeer(large, small, [rows[0]["prompt"], rows[1]["prompt"]],
                             [rows[0]["context"], rows[1]["context"]], 8)
    assert [g["output"] for g in got[:2]] == first


# --------------------------------------------------------------------------- demo, serve, models
def test_demo_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path))
    rc, out, err = run(["demo", "--quick", "--max-new-tokens", 6], capsys)
    assert rc == 0, err
    for i in (1, 2, 3):
        assert f"Persona {i}:" in out
    for title in cli.MODE_TITLES.values():
        if title != cli.MODE_TITLES["small"]:
            assert title in out
    assert out.count("tok/s") == 4
    assert "Measured on this machine: CPU" in out or "Measured on this machine: GPU" in out
    assert (tmp_path / "tiny-pair" / "large" / "config.json").is_file()


def test_serve_dry_run(capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    rc, out, err = run(["serve", "--large", large, "--small", small, "--port", 8123, "--dry-run",
                        "--dtype", "float32", "--", "--enforce-eager"], capsys)
    assert rc == 0, err
    import shlex

    line = out.strip().splitlines()[-1]
    words = shlex.split(line)
    assert "vllm.entrypoints.openai.api_server" in words
    assert words[words.index("--model") + 1] == str(large.resolve())
    assert words[words.index("--port") + 1] == "8123"
    # the processor class of the model runner vLLM will use: V1 on the CPU backend, V2 on GPUs that default to it
    processor = words[words.index("--logits-processors") + 1]
    assert processor in ("costeer_processor.vllm:CoSteerLogitsProcessor", "costeer_processor.vllm:CoSteerLogitsProcessorV2")
    if not torch.cuda.is_available():
        assert processor == "costeer_processor.vllm:CoSteerLogitsProcessor"
    config = json.loads(words[words.index("--additional-config") + 1])
    assert config == {"costeer": {"small_model": str(small.resolve()), "dtype": "float32"}}
    assert words[-1] == "--enforce-eager"
    if not torch.cuda.is_available():
        assert line.startswith("VLLM_CPU_KVCACHE_SPACE=")


def test_serve_dry_run_on_presets_installs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path))
    rc, out, err = run(["serve", "--large", "qwen2.5-coder-1.5b-instruct", "--small", "qwen2.5-coder-0.5b-instruct",
                        "--dry-run"], capsys)
    assert rc == 0
    dtype, why = fast_dtype()  # the default dtype follows the machine, and says so
    assert str(tmp_path / "models" / f"qwen2.5-coder-1.5b-instruct-{dtype}") in out and why in err
    assert "costeer models install qwen2.5-coder-1.5b-instruct" in err
    assert not (tmp_path / "models").exists()


def test_models_list_and_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path))
    rc, out, _ = run(["models"], capsys)
    assert rc == 0
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        assert name in out
    assert str(tmp_path) in out
    rc, out, _ = run(["models", "path", "smollm2-135m-instruct"], capsys)
    assert rc == 0 and out.strip() == str(tmp_path / "models" / "smollm2-135m-instruct-bfloat16")


# --------------------------------------------------------------------------- vLLM and the real pair
@pytest.mark.vllm
def test_generate_vllm_backend_on_tiny_pair(tiny_pair_dirs, tmp_path):
    pytest.importorskip("vllm")
    try:
        import costeer_processor.vllm  # noqa: F401
    except ImportError:
        pytest.skip("costeer_processor.vllm is not there yet")
    large, small = tiny_pair_dirs
    proc = subprocess.run([sys.executable, "-m", "costeer_processor", "generate", "--backend", "vllm",
                           "--large", str(large), "--small", str(small), "--prompt", PROMPT, "--context", CONTEXT,
                           "--dtype", "float32", "--max-new-tokens", "8", "--max-model-len", "512", "--enforce-eager", "-q"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = expected_costeer(large, small, [PROMPT], [CONTEXT], 8)[0]
    assert proc.stdout.strip() == hf


@pytest.mark.slow
def test_generate_on_the_real_pair():
    """`costeer generate` on Qwen2.5-Coder 1.5B + 0.5B (installed on first use; ~1-2 min once installed)."""
    proc = subprocess.run([sys.executable, "-m", "costeer_processor", "generate",
                           "--large", "qwen2.5-coder-1.5b-instruct", "--small", "qwen2.5-coder-0.5b-instruct",
                           "--context", "I am vegan and I love very spicy food.",
                           "--prompt", "Suggest a dinner idea for tonight. Answer in one sentence.",
                           "--max-new-tokens", "24"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.strip()
    assert len(answer.split()) >= 5
    assert "tok/s" in proc.stderr
    assert any(w in answer.lower() for w in ("vegan", "spicy", "tofu", "chili", "vegetable", "plant")), answer


# --------------------------------------------------------------------------- real servers started by `costeer serve`
@contextlib.contextmanager
def costeer_serve(args, tmp_path):
    from costeer_processor.vllm_server import free_port, stop_process, wait_healthy

    port = free_port()
    log = tmp_path / f"serve_{port}.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "costeer_processor", "serve", *map(str, args), "--port",
                                 str(port), "--dtype", "float32", "--max-model-len", "512", "--", "--enforce-eager"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 400, log)
        yield url
    finally:
        stop_process(proc)


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_costeer_serve_runs_the_processor(tiny_pair_dirs, tmp_path):
    pytest.importorskip("vllm")
    import urllib.request

    from costeer_processor.models import load_tokenizer
    from costeer_processor.prompts import ContextSplicer, with_system_prompt

    large, small = tiny_pair_dirs
    text = ContextSplicer(load_tokenizer(large)).render(with_system_prompt(PROMPT))
    with costeer_serve(["--large", large, "--small", small], tmp_path) as url:
        models = json.load(urllib.request.urlopen(url + "/v1/models", timeout=30))
        body = {"model": models["data"][0]["id"], "prompt": text, "max_tokens": 8, "temperature": 0,
                "vllm_xargs": {"costeer_context": CONTEXT}}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"]
    assert answer.strip() == expected_costeer(large, small, [PROMPT], [CONTEXT], 8)[0]


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_generate_split_mode_against_costeer_serve_split(tiny_pair_dirs, tmp_path):
    pytest.importorskip("vllm")
    large, small = tiny_pair_dirs
    with costeer_serve(["--large", large, "--split"], tmp_path) as url:
        proc = subprocess.run([sys.executable, "-m", "costeer_processor", "generate", "--server", url,
                               "--large", str(large), "--small", str(small), "--prompt", PROMPT, "--context", CONTEXT,
                               "--dtype", "float32", "--max-new-tokens", "8"],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected_costeer(large, small, [PROMPT], [CONTEXT], 8)[0]
    assert "split mode" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_a_gpu(capsys, tiny_pair_dirs):
    large, small = tiny_pair_dirs
    rc, _, err = run(["generate", "--large", large, "--small", small, "--prompt", PROMPT, "--context", CONTEXT,
                      "--device", "cuda"], capsys)
    assert_user_error(rc, err, "no CUDA GPU")
