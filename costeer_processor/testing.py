"""Tiny models built on the spot (random weights, a tokenizer trained here) for tests and quick runs.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on a built-in
corpus with the ChatML template the Qwen models use, and the models are config-initialised
Qwen2 / Llama causal LMs of a few hundred kilobytes. Two sizes share one tokenizer, which is
what CoSteer's default (same-tokenizer) path needs; :func:`build_tiny_tokenizer` with another
``vocab_size`` or corpus gives a *different* tokenizer for the mapped path.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A second family for the different-tokenizer path: Llama-3-style headers and its own EOS.
HEADER_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HEADER_SPECIAL_TOKENS = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"]

CORPUS = """
You are a helpful assistant. Suggest a dinner recipe for tonight. I am vegan and I love spicy food.
Write a short story about a dragon who learns to paint. Explain how rainbows form in the sky.
My favourite hobbies are hiking, chess and baking sourdough bread on weekends.
Give me three tips for learning a new programming language quickly and well.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Please answer as concisely as possible. Your answer should be as creative as possible.
I prefer answers that are uplifting, warm and encouraging. Tell me about the history of tea.
A personal context describes the user: their preferences, history and style of writing.
Abstract: We study decoding-time personalization with a small local model steering a large one.
Title: Collaborative decoding. Review: The product works well and I would buy it again.
The weather today is sunny with a gentle breeze, perfect for a walk in the park by the river.
Numbers one two three four five six seven eight nine ten hundred thousand million.
""".strip()


def build_tiny_tokenizer(vocab_size: int = 512, corpus: str = CORPUS, lowercase: bool = False,
                         family: str = "chatml"):
    """A byte-level BPE tokenizer trained now.

    ``family="chatml"`` (default) has the ChatML special tokens and template of the Qwen models;
    ``family="header"`` is another family (Llama-3-style header template, ``<|eot_id|>`` as EOS):
    with another ``vocab_size``/corpus it shares only part of the vocabulary with the default one.
    """
    if family not in ("chatml", "header"):
        raise ValueError(f"family must be 'chatml' or 'header', got {family!r}")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS if family == "chatml" else HEADER_SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    if family == "chatml":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       bos_token=None, unk_token=None)
        fast.chat_template = CHATML_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                                       bos_token=None, unk_token=None)
        fast.chat_template = HEADER_TEMPLATE
    return fast


def build_other_tokenizer():
    """A tokenizer of another family that shares part of :func:`build_tiny_tokenizer`'s vocabulary."""
    return build_tiny_tokenizer(vocab_size=400, corpus=CORPUS.replace("e", "E") + " " + CORPUS[:300],
                                family="header")


def build_tiny_model(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                     arch: str = "qwen2", vocab_size: Optional[int] = None, seed: int = 0,
                     max_position_embeddings: int = 512, dtype: torch.dtype = torch.float32):
    """A config-initialised causal LM with random weights over ``tokenizer``'s ids.

    ``vocab_size`` may exceed the tokenizer's size (padded logit rows, as in Qwen2.5-7B).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init gives near-uniform logits; sharpen them so greedy choices are decisive and
    # the small model's context actually moves its distribution.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_pair(root: os.PathLike, *, large_hidden: int = 128, small_hidden: int = 64,
                   other_small_tokenizer: bool = False) -> tuple[Path, Path]:
    """Writes a large and a small tiny model as transformers folders.

    They share one tokenizer unless ``other_small_tokenizer`` (then the small model gets
    :func:`build_other_tokenizer`, another family and template). Returns ``(large_dir,
    small_dir)``; both load with ``from_pretrained`` and with vLLM.
    """
    root = Path(root)
    tokenizer = build_tiny_tokenizer()
    small_tok = build_other_tokenizer() if other_small_tokenizer else tokenizer
    dirs = []
    for name, hidden, seed, tok in (("large", large_hidden, 1, tokenizer),
                                    ("small_other" if other_small_tokenizer else "small", small_hidden, 2, small_tok)):
        path = root / name
        if not (path / "config.json").exists():
            model = build_tiny_model(tok, hidden_size=hidden, heads=2, kv_heads=1, seed=seed)
            model.save_pretrained(path)
            tok.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


class LoopbackProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that records every request and can add a delay.

    ``records`` holds ``(method, path, headers, body)`` of each request (split mode's privacy tests
    read what crosses the wire); ``delay`` seconds are slept before forwarding each request (the
    split benchmark's simulated network round trip). Responses are buffered, so a stream arrives
    whole. Use ``url`` as the server address and :meth:`close` when done.
    """

    def __init__(self, upstream: str, delay: float = 0.0, timeout: float = 600.0):
        host, port = upstream.split("://", 1)[1].rstrip("/").split(":")
        self.records: list[tuple[str, str, str, bytes]] = []
        local = threading.local()  # one kept-alive upstream connection per serving thread
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                proxy.records.append((self.command, self.path, str(self.headers), body))
                if delay:
                    time.sleep(delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                for attempt in range(2):  # a kept-alive upstream connection may have been closed
                    conn = getattr(local, "conn", None)
                    if conn is None:
                        conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
                    try:
                        conn.request(self.command, self.path, body=body or None, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        break
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
