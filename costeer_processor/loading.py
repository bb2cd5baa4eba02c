"""Loading models and tokenizers, and the facts every adapter needs about them (one place).

* :func:`load_model` / :func:`load_tokenizer`: local transformers folders (presets are resolved
  to folders by :mod:`costeer_processor.models`).
* :func:`eos_token_ids`: the ids that end a generation: the tokenizer's EOS, the generation
  config's, and the chat template's end-of-turn token. Stopping and the EOS guard use this one
  list in the HF processor, vLLM, split mode, the CLI and the evaluation harness.
* :func:`check_same_tokenizer`: one tokenizer (token -> id) or a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from safetensors import SafetensorError

__all__ = [
    "CoSteerModelError",
    "DTYPES",
    "fast_dtype",
    "normalize_dtype",
    "torch_dtype",
    "check_causal_lm",
    "load_tokenizer",
    "load_model",
    "eos_token_ids",
    "tokenizer_difference",
    "check_same_tokenizer",
]

PathLike = Union[str, os.PathLike]

DTYPES = ("bfloat16", "float16", "float32")


def fast_dtype(device: Optional[str] = None) -> tuple[str, str]:
    """The faster weights dtype here and why: ``bfloat16`` on a GPU or a CPU with AVX-512 bf16 / AMX,
    ``float32`` on other CPUs (there bf16 runs about 2x SLOWER than float32: no native bf16 math)."""
    import torch

    if (device or "cpu") != "cpu" or torch.cuda.is_available() and device is None:
        return "bfloat16", "a GPU"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "bfloat16", "this CPU has native bf16 (AVX-512 bf16 / AMX)"
    return "float32", "this CPU has no native bf16 (no AVX-512 bf16): bfloat16 would be slower"
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class CoSteerModelError(RuntimeError):
    """A model, tokenizer or preset problem the user can fix; the message says how."""


# What reading a model folder can raise in transformers / safetensors / tokenizers: missing or
# unreadable files (OSError), malformed JSON and unknown architectures (ValueError, KeyError),
# missing optional packages (ImportError), corrupt weights (SafetensorError, RuntimeError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, SafetensorError)


def normalize_dtype(dtype) -> str:
    """``"bfloat16"``, ``"float16"`` or ``"float32"`` from a name, an alias or a torch dtype."""
    name = str(dtype).replace("torch.", "").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise CoSteerModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name


def torch_dtype(dtype):
    import torch

    return getattr(torch, normalize_dtype(dtype))


# --------------------------------------------------------------------------- checks
def check_causal_lm(path: PathLike):
    """The folder's config, if it holds a causal LM transformers can load; else CoSteerModelError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CoSteerModelError(f"{path} has no config.json: not a transformers model folder (pass a preset or a folder "
                                "written by save_pretrained)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(path))
    except _LOAD_ERRORS as e:
        raise CoSteerModelError(f"{path}/config.json cannot be read by transformers ({_first_line(e)})") from None
    archs = list(getattr(config, "architectures", None) or [])
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs:  # what the folder was saved as decides (a BERT saved for masked LM is no causal LM)
        ok = any(a.endswith(("ForCausalLM", "LMHeadModel")) or a in causal_classes for a in archs)
    else:
        ok = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not ok:
        raise CoSteerModelError(
            f"{path} is not a causal language model (model_type={config.model_type!r}, architectures={archs}); "
            "CoSteer needs two decoder-only chat models")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def _read_tokenizer(path: PathLike, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except _LOAD_ERRORS as e:
        raise CoSteerModelError(f"cannot load the tokenizer of {path} ({_first_line(e)})") from None


def tokenizer_difference(large_tok, small_tok) -> Optional[str]:
    """``None`` when both tokenizers map every token to the same id; else a short description."""
    va, vb = large_tok.get_vocab(), small_tok.get_vocab()
    if va == vb:
        return None
    differ = sum(1 for k, v in va.items() if vb.get(k) != v) + sum(1 for k in vb if k not in va)
    only_large = sorted(set(va) - set(vb))[:3]
    only_small = sorted(set(vb) - set(va))[:3]
    return (f"{len(va)} vs {len(vb)} tokens, {differ} differ (only in large: {only_large}, "
            f"only in small: {only_small})")


def check_same_tokenizer(large_tok, small_tok, hint: str = "pick two models of one family, or let CoSteer "
                         "map the vocabularies (vocab_map)") -> None:
    """Raises :class:`CoSteerModelError` unless both tokenizers map tokens to the same ids.

    The two models' logit widths may differ (padded rows); the token ids must not.
    """
    diff = tokenizer_difference(large_tok, small_tok)
    if diff is not None:
        raise CoSteerModelError(f"the large and small models use different tokenizers ({diff}); {hint}")


# --------------------------------------------------------------------------- loading
def load_tokenizer(path: PathLike, **kwargs):
    """The folder's tokenizer, ready for batched generation (left padding, a pad token)."""
    tok = _read_tokenizer(path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: PathLike, dtype: str = "bfloat16", materialize: bool = True, device: Optional[str] = None):
    """``AutoModelForCausalLM`` from a folder, in ``dtype``, in eval mode, on ``device`` (default CPU).

    On the CPU the weights are copied into process memory rather than left memory-mapped.
    """
    from transformers import AutoModelForCausalLM

    check_causal_lm(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    except _LOAD_ERRORS as e:
        raise CoSteerModelError(f"cannot load the model in {path} ({_first_line(e)})") from None
    if device is not None and str(device) != "cpu":
        try:
            model = model.to(device)
        except (RuntimeError, ValueError, AssertionError) as e:  # unknown device, no CUDA build, out of memory
            raise CoSteerModelError(f"cannot move the model to {device} ({_first_line(e)})") from None
    elif materialize:
        _materialize(model)
    return model.eval()


def _materialize(model) -> None:
    """Copies memory-mapped weights into process memory.

    When the file's dtype is the one asked for, transformers leaves the weights mapped from the
    safetensors file; on a machine short of memory those pages are evicted and re-read from disk
    during decoding, which made generation up to 10x slower in our measurements.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    module._buffers[name] = buf.clone()


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a generation, sorted: the tokenizer's EOS, the generation config's
    ``eos_token_id`` (an int or a list), and the chat template's end-of-turn token (the special
    token the template writes right after an assistant message, e.g. ``<|im_end|>``).

    ``generation_config`` may be a ``GenerationConfig``, a dict (vLLM's), or a model folder.

    Example::

        >>> from costeer_processor.testing import build_tiny_tokenizer
        >>> tok = build_tiny_tokenizer()
        >>> [tok.convert_ids_to_tokens(i) for i in eos_token_ids(tok)]
        ['<|im_end|>']
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_config, (str, os.PathLike)):
        generation_config = _read_generation_config(generation_config)
    gen = (generation_config.get("eos_token_id") if isinstance(generation_config, dict)
           else getattr(generation_config, "eos_token_id", None))
    ids.update(int(i) for i in ([gen] if isinstance(gen, int) else list(gen or [])))
    end_of_turn = _end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return sorted(ids)


def _read_generation_config(path: PathLike):
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(str(path))


def _end_of_turn_id(tokenizer) -> Optional[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    from .prompts import _TEMPLATE_ERRORS

    marker = "\u2063COSTEER_REPLY\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except _TEMPLATE_ERRORS:
        return None
    if marker not in text:
        return None
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return int(after[0]) if after and after[0] in special else None
