"""The ``costeer`` argument parser.

Numbers are checked by :mod:`costeer_processor.core.config` (the one place that holds defaults
and ranges): the CoSteer flags go through :class:`~costeer_processor.core.CoSteerConfig` and
:meth:`~costeer_processor.core.Variants.parse`, the others through ``number`` / ``check_range``.
Every default of a CoSteer flag is read from those classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional

from ..core.config import CoSteerConfig, Variants, check_range, number
from ..loading import DTYPES
from .common import MODES, PROG, UsageError

# Presets (and their defaults) live in costeer_processor.models; these names are what `--help` shows.
_MODEL_HELP = "a preset (see 'costeer models list'), a local transformers folder or a hub id"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number_of(text: str):
    """The text as an int, else a float, else the text itself (so ``number`` names what is wrong)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _type(name: str, check: Callable[[object], object]):
    """An argparse ``type=`` that turns a core ``ValueError`` into a one-line argument error."""
    def parse(text: str):
        try:
            return check(_number_of(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name
    return parse


def numeric(*, integer: bool = False, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False):
    """A number flag: ``core.config.number`` then ``check_range``."""
    def check(value):
        value = number("the value", value, integer=integer)
        check_range("the value", value, low, high, low_open=low_open, high_open=high_open)
        return value
    return _type("integer" if integer else "number", check)


def config_field(name: str):
    """A :class:`CoSteerConfig` field, checked by CoSteerConfig itself."""
    return _type(name, lambda value: getattr(CoSteerConfig(**{name: value}), name))


def variant_field(name: str):
    """A :class:`Variants` field in its lenient form (``0`` switches gating / the guard off)."""
    return _type(name, lambda value: getattr(Variants.parse(**{name: value}), name))


def _add_steering_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CoSteer hyper-parameters (official defaults)")
    g.add_argument("--T", type=config_field("T"), default=CoSteerConfig.T,
                   help="FTRL inner steps per token (default %(default)s)")
    g.add_argument("--alpha", type=config_field("alpha"), default=CoSteerConfig.alpha, help="default %(default)g")
    g.add_argument("--beta", type=config_field("beta"), default=CoSteerConfig.beta, help="default %(default)g")
    g.add_argument("--lam", type=config_field("lam"), default=CoSteerConfig.lam, help="default %(default)g (> 0)")
    g.add_argument("--eta", type=config_field("eta"), default=CoSteerConfig.eta, help="default %(default)g (> 0)")
    g.add_argument("--strength", type=config_field("strength"), default=CoSteerConfig.strength,
                   help="the closed-form gain g itself, overriding the five above (1 = proxy-tuning, 0 = off)")
    g.add_argument("--eos-guard", type=variant_field("eos_guard"), default=Variants.eos_guard,
                   help="stop a row when the large model's EOS probability exceeds this (e.g. 0.5; 0 = off)")
    g.add_argument("--gate-threshold", type=variant_field("gate_threshold"), default=Variants.gate_threshold,
                   help="AdaCoSteer gating: stop steering a row after --gate-patience steps in a row with "
                        "1 - max p < this (the release uses 0.1; off by default)")
    g.add_argument("--gate-patience", type=variant_field("gate_patience"), default=Variants.gate_patience,
                   help="default %(default)s")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=numeric(integer=True, low=1), default=256)
    d.add_argument("--temperature", type=numeric(low=0.0), default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=numeric(low=0.0, high=1.0, low_open=True), default=1.0)
    d.add_argument("--context-position", choices=("before", "after"), default="before",
                   help="where the small model sees the context in the user turn (default before)")
    d.add_argument("--device", default="auto", help="hf backend: cpu, cuda, cuda:1 ... (default: cuda if available)")
    d.add_argument("--seed", type=numeric(integer=True), default=0, help="random seed for sampling (default 0)")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="steered generation for one prompt or a JSONL file",
                       description="Prints the steered answer (streamed), or writes a JSONL file in batch mode.")
    g.add_argument("--large", help=f"the large (cloud) model: {_MODEL_HELP} (with --server: optional, only its "
                                   "tokenizer is read, for a served model of another family than the small one)")
    g.add_argument("--small", help="the small (on-device) model holding the context (same kinds of names)")
    g.add_argument("--dtype", default="auto", choices=DTYPES + ("auto",),
                   help="weights dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--context", help="the personal context (stays with the small model)")
    src.add_argument("--context-file", type=Path, help="read the personal context from this file")
    g.add_argument("--prompt", help="the public prompt (the large model sees only this)")
    g.add_argument("--input", type=Path, help="JSONL with fields prompt, context (batch mode)")
    g.add_argument("--output", type=Path, help="JSONL to write in batch mode (input fields + output)")
    g.add_argument("--batch-size", type=numeric(integer=True, low=1), default=8)
    g.add_argument("--mode", choices=tuple(MODES), default="costeer",
                   help="what to run: costeer (default) or a baseline: " + ", ".join(list(MODES)[1:]))
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (transformers generate) or vllm")
    g.add_argument("--server", metavar="URL",
                   help="split mode: URL of a plain vLLM server holding the large model (see 'costeer serve "
                        "--split'); the small model and the context stay on this machine")
    g.add_argument("--top-logprobs", type=numeric(integer=True, low=1), default=None,
                   help="split mode: steer over the server's top-K tokens only (default: the full vocabulary, "
                        "which needs the server's --max-logprobs -1)")
    g.add_argument("--lookahead", type=numeric(integer=True, low=1), default=None,
                   help="split mode: most tokens the server proposes per round trip (default: the split client's)")
    g.add_argument("--retries", type=numeric(integer=True, low=0), default=None,
                   help="split mode: retries of a failed request to the server, with back-off (default: the split "
                        "client's)")
    g.add_argument("--max-model-len", type=numeric(integer=True, low=1), default=4096,
                   help="vllm backend: the large model's context length")
    g.add_argument("--enforce-eager", action="store_true",
                   help="vllm backend: skip graph compilation (starts faster, decodes slower)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or timing lines")
    _add_steering_args(g)


def _add_demo(sub) -> None:
    from ..models import DEFAULT_LARGE, DEFAULT_SMALL

    d = sub.add_parser("demo", help="side-by-side demo of CoSteer and its baselines on 3 personas",
                       description="Installs the default real pair if needed, then shows the large model alone, "
                                   "the small model with the context, the large model with the context and "
                                   "CoSteer for 3 built-in personas, with tokens/s.")
    d.add_argument("--large", default=DEFAULT_LARGE, help=f"the large (cloud) model: {_MODEL_HELP} (default "
                                                          "%(default)s)")
    d.add_argument("--small", default=DEFAULT_SMALL,
                   help="the small (on-device) model holding the context (default %(default)s)")
    d.add_argument("--dtype", default="auto", choices=DTYPES + ("auto",),
                   help="weights dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    d.add_argument("--quick", action="store_true", help="tiny random-weight models (seconds; output is gibberish)")
    _add_steering_args(d)
    d.set_defaults(max_new_tokens=80)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="start the OpenAI-compatible vLLM server with CoSteer",
                       description="Starts 'python -m vllm.entrypoints.openai.api_server' on the large model with "
                                   "the CoSteer logits processor and the small model. Requests pass the context "
                                   'as extra_body={"vllm_xargs": {"costeer_context": "..."}}.')
    s.add_argument("--large", required=True, help=f"the large model served: {_MODEL_HELP}")
    s.add_argument("--small", help="the small model the CoSteer processor loads in the server (not with --split)")
    s.add_argument("--dtype", default="auto", choices=DTYPES + ("auto",),
                   help="weights dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    s.add_argument("--split", action="store_true",
                   help="split mode: serve the large model alone (plain vLLM, full log-probs, prefix caching); "
                        "clients run 'costeer generate --server URL' with the small model and context locally")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=numeric(integer=True, low=1, high=65535), default=8000)
    s.add_argument("--max-model-len", type=numeric(integer=True, low=1), default=4096)
    s.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    s.add_argument("extra", nargs=argparse.REMAINDER, help="after '--': more arguments for the vLLM server")


def _add_models(sub) -> None:
    m = sub.add_parser("models", help="list or pre-install the model presets")
    m.add_argument("action", nargs="?", choices=("list", "install", "path"), default="list")
    m.add_argument("names", nargs="*", help="preset names for install/path ('all' for every preset)")
    m.add_argument("--dtype", default="bfloat16", choices=DTYPES)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="CoSteer: a small local model that holds your private context "
                                            "steers a large model's decoding.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_generate, _add_demo, _add_serve, _add_models):
        add(sub)
    from .proxy import add_parser as _add_proxy  # `costeer proxy` (docs/proxy.md)

    _add_proxy(sub)
    return parser
