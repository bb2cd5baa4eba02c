"""CoSteer inside an offline vLLM engine (V1 runner, CPU), and the V1 adapter's bookkeeping without one.

Engine tests (marked ``vllm``) share two module-scoped engines, both on the multiprocess engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=1``): one with the processor, one reference without it. The
steering engine has a deliberately small KV cache so that a burst of long requests is preempted.
"""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from costeer_processor import CoSteerConfig, SmallModelRunner
from costeer_processor.core import Variants
from costeer_processor.hf import CoSteerLogitsProcessor as HFProcessor

SYSTEM = "You are a helpful assistant."
PROMPTS = ["Suggest a dinner recipe.", "Tell me about the history of tea.", "Write a story about a dragon.",
           "Give me three tips for learning a new programming language."]
CONTEXTS = ["I am vegan and I love spicy food.", "I prefer uplifting, warm answers.",
            "My hobbies are chess and hiking.", "Please answer as concisely as possible."]
V1 = "costeer_processor.vllm:CoSteerLogitsProcessor"
BLOCK_SIZE = 32
NUM_BLOCKS = 24  # 768 tokens of KV: 8 requests of ~200 tokens cannot all stay resident

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1" if (os.cpu_count() or 1) >= 2 else "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc(worker_stats) into the engine process
}


def chat_text(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
def _make_llm(large_dir, **extra):
    from vllm import LLM

    return LLM(model=str(large_dir), dtype="float32", max_model_len=256, max_num_seqs=16, enforce_eager=True,
               block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS, seed=0, **extra)


@pytest.fixture(scope="module")
def engine_env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENGINE_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def steer_llm(tiny_pair_dirs, engine_env):
    from costeer_processor.vllm import CoSteerLogitsProcessor

    large, small = tiny_pair_dirs
    # the class object here (pickled by reference into the engine process); the server test uses the name
    llm = _make_llm(large, logits_processors=[CoSteerLogitsProcessor],
                    additional_config={"costeer": {"small_model": str(small)}})
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm


@pytest.fixture(scope="module")
def ref_llm(tiny_pair_dirs, engine_env):
    llm = _make_llm(tiny_pair_dirs[0])
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm


@pytest.fixture(scope="module")
def texts(tiny_pair_dirs):
    tok = AutoTokenizer.from_pretrained(str(tiny_pair_dirs[0]))
    return [chat_text(tok, p) for p in PROMPTS]


def greedy(max_tokens=16, context=None, **kw):
    from vllm import SamplingParams

    extra = dict(kw.pop("extra", {}))
    if context is not None:
        extra["costeer_context"] = context
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra or None, **kw)


def ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def stats(llm):
    from costeer_processor.vllm import engine_stats

    (s,) = engine_stats(llm)
    return s


def flush(llm):
    """vLLM tells processors about finished requests at the next step: run one."""
    llm.generate(["flush"], greedy(1), use_tqdm=False)


# ------------------------------------------------------------------------------------------------
# engine tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_the_request_cache_salt_keys_the_small_models_context_cache(steer_llm, texts):
    context = "I collect old sea maps and I love sailing in cold water. " * 3
    before = stats(steer_llm)["context_cache"]

    def run(i, salt, extra=None):
        prompt = {"prompt": texts[i], **({"cache_salt": salt} if salt else {})}
        steer_llm.generate([prompt], greedy(4, context=context, extra=extra or {}), use_tqdm=False)

    run(0, "tenant-a")
    run(1, "tenant-a")  # same context, same tenant: its prefix KV is reused
    run(2, "tenant-b")  # another tenant: never shares tenant-a's entry
    run(3, None, extra={"_costeer_cache_salt": "tenant-a"})  # a forged salt is overwritten by the frontend
    after = stats(steer_llm)["context_cache"]
    assert after["hits"] - before["hits"] == 1
    assert after["misses"] - before["misses"] == 3 and after["entries"] - before["entries"] == 3


@pytest.mark.vllm
def test_mixed_batch_steers_only_requests_with_a_context(steer_llm, ref_llm, texts):
    reference = ids(ref_llm.generate(texts, greedy(), use_tqdm=False))
    params = [greedy(context=CONTEXTS[0]), greedy(), greedy(context=CONTEXTS[2]), greedy()]
    mixed = ids(steer_llm.generate(texts, params, use_tqdm=False))
    assert mixed[1] == reference[1] and mixed[3] == reference[3]  # untouched rows: identical
    assert mixed[0] != reference[0] and mixed[2] != reference[2]  # steered rows: changed
    # an engine with the processor but no steered request is the plain engine
    assert ids(steer_llm.generate(texts, greedy(), use_tqdm=False)) == reference
    # strength 0 is no steering at all
    zero = ids(steer_llm.generate(texts, greedy(context=CONTEXTS[0], extra={"costeer_strength": 0.0}),
                                  use_tqdm=False))
    assert zero == reference


@pytest.mark.vllm
def test_steered_output_equals_the_hf_processor(steer_llm, tiny_pair_dirs, texts):
    large_dir, small_dir = tiny_pair_dirs
    tok = AutoTokenizer.from_pretrained(str(large_dir))
    large = AutoModelForCausalLM.from_pretrained(str(large_dir), dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(str(small_dir), dtype=torch.float32).eval()
    runner = SmallModelRunner(small, tok)
    n = 12

    def hf(prompts, contexts, **kw):
        proc = HFProcessor(runner, contexts, **kw)  # reads each row's prompt from input_ids, as vLLM does
        enc = tok([chat_text(tok, p) for p in prompts], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False)
        with torch.no_grad():
            out = large.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    want = hf(PROMPTS, CONTEXTS)
    got = ids(steer_llm.generate(texts, [greedy(n, c, min_tokens=n) for c in CONTEXTS], use_tqdm=False))
    assert got == want
    # per-request hyper-parameters and AdaCoSteer gating, as in the HF processor
    from costeer_processor import CoSteerConfig

    want = hf(PROMPTS, CONTEXTS, config=CoSteerConfig(strength=3.0), variants=Variants(gate_threshold=0.05, gate_patience=2))
    got = ids(steer_llm.generate(texts, [greedy(n, c, min_tokens=n, extra={
        "costeer_strength": 3.0, "costeer_gate_threshold": 0.05, "costeer_gate_patience": 2}) for c in CONTEXTS],
        use_tqdm=False))
    assert got == want


@pytest.mark.vllm
def test_eos_guard_ends_where_the_large_model_would(steer_llm, ref_llm, texts):
    # logit_bias runs before custom processors in vLLM: make EOS the large model's likely choice
    # (p > 0.5), which a gain of 50 overrides unless the guard stops the row.
    eos = AutoTokenizer.from_pretrained(steer_llm.llm_engine.model_config.tokenizer).eos_token_id
    bias = {"logit_bias": {eos: 8.0}}
    assert all(o == [eos] for o in ids(ref_llm.generate(texts, greedy(4, **bias), use_tqdm=False)))
    forced = ids(steer_llm.generate(texts, greedy(4, CONTEXTS[0], extra={"costeer_strength": 50.0,
                                                                         "costeer_eos_guard": 0.5}, **bias),
                                    use_tqdm=False))
    assert all(o == [eos] for o in forced)
    unguarded = ids(steer_llm.generate(texts, greedy(4, CONTEXTS[0], extra={"costeer_strength": 50.0}, **bias),
                                       use_tqdm=False))
    assert all(o[:1] != [eos] for o in unguarded)  # a huge gain overrides the large model's EOS


@pytest.mark.vllm
def test_preemption_and_resumption_give_the_same_outputs(steer_llm, tiny_pair_dirs):
    tok = AutoTokenizer.from_pretrained(str(tiny_pair_dirs[0]))
    n, k = 110, 6  # 6 requests x ~5 blocks of 32 tokens > the 24 blocks of the engine's KV cache
    prompts = [chat_text(tok, f"{PROMPTS[i % 4]} Request number {i}.") for i in range(k)]
    params = [greedy(n, CONTEXTS[(i + 1) % 4], min_tokens=n, ignore_eos=True) for i in range(k)]
    before = stats(steer_llm)["resumed"]
    together = ids(steer_llm.generate(prompts, params, use_tqdm=False))
    preempted = stats(steer_llm)["resumed"] - before
    assert preempted > 0, "the KV cache was big enough: nothing was preempted"
    # the same requests two at a time: they fit, so nothing is preempted
    alone = []
    for i in range(0, k, 2):
        alone += ids(steer_llm.generate(prompts[i:i + 2], params[i:i + 2], use_tqdm=False))
    assert stats(steer_llm)["resumed"] - before == preempted
    assert together == alone


@pytest.mark.vllm
def test_finished_requests_free_the_small_model(steer_llm, texts):
    from vllm import SamplingParams

    flush(steer_llm)
    base = stats(steer_llm)
    assert base["requests"] == 0 and base["cached_rows"] == 0 and base["steered_handles"] == 0
    params = [SamplingParams(max_tokens=3, temperature=0.0, extra_args={"costeer_context": f"Context number {i}."})
              for i in range(500)]
    outs = steer_llm.generate([texts[i % 4] for i in range(500)], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outs)
    mid = stats(steer_llm)
    assert mid["steps"] > base["steps"]
    flush(steer_llm)
    after = stats(steer_llm)
    assert after["requests"] == 0 and after["cached_rows"] == 0 and after["steered_handles"] == 0
    assert after["kv_tokens"] == 0 and after["parked"] == 0
    # batched: per engine step one decode forward plus at most one prefill forward per branch for
    # all new requests together, never one forward per request
    assert after["forwards"] - base["forwards"] <= 3 * (after["steps"] - base["steps"]) < 500


@pytest.mark.vllm
def test_finished_gated_requests_leave_nothing_parked(steer_llm, texts):
    """Gated requests carry state worth keeping across preemption; once finished (max_tokens, or a stop
    string, which the engine only sees as the request leaving the batch) nothing of them is kept."""
    gate = {"costeer_gate_threshold": 0.999, "costeer_gate_patience": 100}  # every step confident: a streak
    full = [o.outputs[0].text for o in steer_llm.generate(texts, [greedy(12, c, extra=gate) for c in CONTEXTS],
                                                          use_tqdm=False)]
    stops = [t[len(t) // 2: len(t) // 2 + 3] for t in full]
    assert all(len(s) == 3 for s in stops)
    flush(steer_llm)
    before = stats(steer_llm)
    outs = steer_llm.generate(texts, [greedy(12, c, extra=gate, stop=[s]) for c, s in zip(CONTEXTS, stops)],
                              use_tqdm=False)
    assert all(o.outputs[0].stop_reason == s for o, s in zip(outs, stops))  # ended by the stop strings
    flush(steer_llm)
    after = stats(steer_llm)
    assert after["steps"] > before["steps"]
    assert after["parked"] == 0 and after["steered_handles"] == 0 and after["requests"] == 0


@pytest.mark.vllm
@pytest.mark.parametrize("extra,match", [
    ({"costeer_context": "x", "costeer_T": 0}, "costeer_T"),
    ({"costeer_context": "x", "costeer_alpha": float("nan")}, "costeer_alpha"),
    ({"costeer_context": "x", "costeer_strength": "big"}, "costeer_strength"),
    ({"costeer_context": "x", "costeer_stregth": 1.0}, "costeer_stregth.*did you mean 'costeer_strength'"),
    ({"costeer_context": "   "}, "costeer_context is empty"),
    ({"costeer_context": 7}, "costeer_context must be a string"),
    ({"costeer_strength": 1.0}, "costeer_context is required"),
    ({"costeer_context": "word " * 600}, "costeer_context: .*over the limit"),
    ({"costeer_context": "x", "costeer_gate_threshold": 1.5}, "costeer_gate_threshold"),
    ({"costeer_context": "x", "costeer_T": 100, "costeer_alpha": 10.0}, "gain .* must be at most"),
    ({"costeer_context": "x", "costeer_T": True}, "costeer_T must be an integer, got bool"),
])
def test_invalid_arguments_are_refused_and_the_engine_keeps_serving(steer_llm, texts, extra, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    # validate_params raises ValueError; the offline engine hands it on as VLLMValidationError
    with pytest.raises(VLLMValidationError, match=match):
        steer_llm.generate(texts[:1], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    assert len(ids(steer_llm.generate(texts[:1], greedy(2, CONTEXTS[0]), use_tqdm=False))[0]) == 2


# ------------------------------------------------------------------------------------------------
# the V1 adapter without an engine: batch bookkeeping against a per-request reference
# ------------------------------------------------------------------------------------------------
def fake_vllm_config(large_dir, costeer: dict):
    model_config = SimpleNamespace(tokenizer=str(large_dir), model=str(large_dir), trust_remote_code=False,
                                   tokenizer_revision=None, dtype=torch.float32,
                                   try_get_generation_config=lambda: {})
    return SimpleNamespace(model_config=model_config, additional_config={"costeer": costeer},
                           speculative_config=None)


class Driver:
    """Plays vLLM's V1 persistent batch around a processor: greedy decoding with full recompute."""

    def __init__(self, proc, model, rng=None):
        self.proc, self.model, self.rng = proc, model, rng
        self.rows: list = []  # batch index -> request dict

    def update(self, removed=(), added=(), moved=()):
        from vllm.v1.sample.logits_processor import BatchUpdate

        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=list(removed), added=list(added),
                                           moved=list(moved)))

    def step(self):
        with torch.no_grad():
            logits = torch.stack([self.model(torch.tensor([r["prompt"] + r["out"]])).logits[0, -1].float()
                                  for r in self.rows])
        logits = self.proc.apply(logits)
        for r, tok in zip(self.rows, logits.argmax(-1).tolist()):
            r["out"].append(tok)


def make_request(tok, prompt, context, max_tokens=256, **extra):
    from vllm import SamplingParams

    args = {"costeer_context": context, **extra} if context else None
    return {"prompt": tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"], "out": [],
            "params": SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=args)}


@pytest.fixture(scope="module")
def v1_parts(tiny_pair_dirs):
    from costeer_processor.vllm import CoSteerLogitsProcessor

    large_dir, small_dir = tiny_pair_dirs
    tok = AutoTokenizer.from_pretrained(str(large_dir))
    model = AutoModelForCausalLM.from_pretrained(str(large_dir), dtype=torch.float32).eval()

    def new_proc(**costeer):
        return CoSteerLogitsProcessor(fake_vllm_config(large_dir, {"small_model": str(small_dir), **costeer}),
                                      torch.device("cpu"), False)
    return tok, model, new_proc


def run_alone(v1_parts, req_spec, steps, **costeer):
    tok, model, new_proc = v1_parts
    d = Driver(new_proc(**costeer), model)
    r = make_request(tok, *req_spec)
    d.rows = [r]
    d.update(added=[(0, r["params"], r["prompt"], r["out"])])
    for _ in range(steps):
        d.step()
    return r["out"]


def test_v1_bookkeeping_swaps_moves_and_preemption(v1_parts):
    """Random churn (adds, finishes, swaps, one-way moves, preempt + resume) changes nothing per request."""
    from vllm.v1.sample.logits_processor import MoveDirectionality

    tok, model, new_proc = v1_parts
    specs = [(PROMPTS[i % 4], CONTEXTS[i % 4] if i % 3 else None) for i in range(7)]
    steps = 6
    want = [run_alone(v1_parts, s, steps) for s in specs]
    rng = random.Random(0)
    proc = new_proc()
    d = Driver(proc, model)
    reqs = [make_request(tok, *s) for s in specs]
    pending, parked = list(range(len(reqs))), []
    while pending or parked or d.rows:
        removed, added, moved = [], [], []
        # 1. finished requests leave; sometimes one is preempted (it comes back later with its output)
        for i, r in enumerate(d.rows):
            if len(r["out"]) >= steps or (rng.random() < 0.15 and r["out"]):
                removed.append(i)
                if len(r["out"]) < steps:
                    parked.append(r)
        holes = sorted(removed)
        for i in holes:
            d.rows[i] = None
        # 2. new / resumed requests fill the lowest holes first, then append (vLLM's InputBatch)
        while (pending or parked) and sum(r is not None for r in d.rows) < 3:
            r = parked.pop(0) if parked and (rng.random() < 0.5 or not pending) else reqs[pending.pop(0)]
            if holes:
                i = holes.pop(0)
                d.rows[i] = r
            else:
                d.rows.append(r)
                i = len(d.rows) - 1
            added.append((i, r["params"], r["prompt"], r["out"]))
        # 3. condense: the last rows move into the remaining holes; only unfilled tail holes stay "removed"
        while holes:
            i = holes.pop(0)
            while d.rows and d.rows[-1] is None:
                d.rows.pop()
            if i >= len(d.rows):
                continue
            d.rows[i] = d.rows.pop()
            moved.append((len(d.rows), i, MoveDirectionality.UNIDIRECTIONAL))
        while d.rows and d.rows[-1] is None:
            d.rows.pop()
        removed = [i for i in removed if i >= len(d.rows) and not any(m[1] == i for m in moved)
                   and not any(a[0] == i for a in added)]
        # 4. sometimes a swap (vLLM reorders for its own reasons)
        if len(d.rows) >= 2 and rng.random() < 0.5:
            a, b = rng.sample(range(len(d.rows)), 2)
            d.rows[a], d.rows[b] = d.rows[b], d.rows[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        d.update(removed, added, moved)
        if d.rows:
            d.step()
    assert [r["out"][:steps] for r in reqs] == want
    assert proc.resumed > 0
    d.rows = []
    assert len(proc.runner) == 0 and proc.runner.cached_rows == 0 and proc.steered_rows == {}
    assert any(w != run_alone(v1_parts, (s[0], None), steps) for w, s in zip(want, specs) if s[1])


def test_v1_untouched_rows_and_early_return(v1_parts):
    tok, model, new_proc = v1_parts
    proc = new_proc()
    plain = make_request(tok, PROMPTS[0], None)
    proc.update_state(None)
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, plain["params"], plain["prompt"],
                                                                     plain["out"])], moved=[]))
    logits = torch.randn(1, len(tok))
    assert proc.apply(logits) is logits and proc.steered_rows == {}
    assert proc.engine.steps == 0


def test_v1_nonfinite_large_logits_leave_the_row_alone(v1_parts):
    from vllm.v1.sample.logits_processor import BatchUpdate

    tok, model, new_proc = v1_parts
    proc = new_proc()
    reqs = [make_request(tok, PROMPTS[i], CONTEXTS[i]) for i in range(3)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                  added=[(i, r["params"], r["prompt"], r["out"]) for i, r in enumerate(reqs)]))
    logits = torch.randn(3, len(tok))
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    logits[2, :10] = float("-inf")  # masks from other processors are fine
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.equal(out[0].nan_to_num(), before[0].nan_to_num()) and torch.equal(out[1], before[1])
    assert not torch.equal(out[2], before[2]) and torch.isneginf(out[2, :10]).all()
    assert not torch.isnan(out[2]).any()


def test_v1_gating_switches_off_and_survives_preemption(v1_parts):
    tok, model, new_proc = v1_parts
    proc = new_proc(gate_threshold=0.999, gate_patience=2)  # every step counts as confident
    r = make_request(tok, PROMPTS[0], CONTEXTS[0])
    d = Driver(proc, model)
    d.rows = [r]
    d.update(added=[(0, r["params"], r["prompt"], r["out"])])
    d.step()
    assert proc.runner.cached_rows == 1 and proc.steered_rows[0].streak == 1
    d.rows = []
    d.update(removed=[0])  # preempted with a streak of 1: parked, small-model rows freed
    assert proc.runner.cached_rows == 0 and len(proc.engine.parking) == 1
    d.rows = [r]
    d.update(added=[(0, r["params"], r["prompt"], r["out"])])
    d.step()  # second confident step: switched off now
    handle = proc.steered_rows[0]
    assert handle.streak == 2 and not handle.active and proc.runner.cached_rows == 0
    # per-request override: gating off for this request although the engine default is on
    r2 = make_request(tok, PROMPTS[1], CONTEXTS[1], costeer_gate_threshold=0)
    d.rows = [r, r2]
    d.update(added=[(1, r2["params"], r2["prompt"], r2["out"])])
    d.step()
    assert proc.steered_rows[1].active and proc.runner.cached_rows == 1


@pytest.mark.parametrize("costeer,match", [
    ({}, "needs a small model"),
    ({"small_model": "/nonexistent/folder"}, "small model '/nonexistent/folder'.*(not a model folder|no such folder)"),
    ({"small_model": "SMALL", "contxt_position": "after"}, "did you mean 'context_position'"),
    ({"small_model": "SMALL", "T": 0}, "T must be"),
    ({"small_model": "SMALL", "dtype": "int8"}, "dtype"),
])
def test_startup_errors_are_clear(tiny_pair_dirs, costeer, match, monkeypatch):
    from costeer_processor.vllm import CoSteerLogitsProcessor

    monkeypatch.delenv("COSTEER_SMALL_MODEL", raising=False)
    costeer = {k: (str(tiny_pair_dirs[1]) if v == "SMALL" else v) for k, v in costeer.items()}
    with pytest.raises(ValueError, match=match):
        CoSteerLogitsProcessor(fake_vllm_config(tiny_pair_dirs[0], costeer), torch.device("cpu"), False)


def test_mismatched_tokenizer_is_mapped_or_refused(tiny_pair_dirs, tmp_path):
    from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    from costeer_processor.vllm import CoSteerLogitsProcessor

    other_tok = build_tiny_tokenizer(vocab_size=400)
    build_tiny_model(other_tok).save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    # vocab_map "off" refuses another tokenizer; the default ("auto") steers on the shared tokens
    with pytest.raises(ValueError, match="different tokenizers.*vocab_map is 'off'"):
        CoSteerLogitsProcessor(fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tmp_path / "other"),
                                                                    "vocab_map": "off"}),
                               torch.device("cpu"), False)
    proc = CoSteerLogitsProcessor(fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tmp_path / "other")}),
                                  torch.device("cpu"), False)
    assert proc.engine.vocab_map is not None and not proc.engine.vocab_map.identical
    assert 0 < proc.engine.vocab_map.size <= 400  # a smaller vocabulary on the same corpus: (nearly) a subset


def test_env_fallback_and_settings(monkeypatch, tiny_pair_dirs):
    from costeer_processor.vllm import EngineSettings, parse_request_args

    monkeypatch.setenv("COSTEER_SMALL_MODEL", str(tiny_pair_dirs[1]))
    monkeypatch.setenv("COSTEER_STRENGTH", "2.5")
    monkeypatch.setenv("COSTEER_GATE_PATIENCE", "4")
    s = EngineSettings.from_sources({"costeer": {"eos_guard": 0.5}})
    assert s.small_model == str(tiny_pair_dirs[1]) and s.strength == 2.5 and s.gate_patience == 4
    assert s.eos_guard == 0.5
    a = parse_request_args({"costeer_context": "c"}, s)
    assert a.gain == 2.5 and a.eos_guard == 0.5
    # explicit hyper-parameters beat an engine-wide strength; costeer_strength beats both
    assert math.isclose(parse_request_args({"costeer_context": "c", "costeer_T": 1}, s).gain, 1 / 2.1, rel_tol=1e-9)
    assert parse_request_args({"costeer_context": "c", "costeer_strength": 1.0, "costeer_T": 3}, s).gain == 1.0
    assert parse_request_args({"costeer_context": "c", "costeer_eos_guard": 0}, s).eos_guard is None
    assert parse_request_args({"other_key": 1}, s) is None
    monkeypatch.setenv("COSTEER_T", "abc")
    with pytest.raises(ValueError, match="COSTEER_T"):
        EngineSettings.from_sources({})


def test_v1_threads_setting_is_scoped_to_the_small_model(v1_parts):
    from vllm.v1.sample.logits_processor import BatchUpdate

    tok, model, new_proc = v1_parts
    before = torch.get_num_threads()
    proc = new_proc(threads=1)
    seen = []
    step = proc.runner.step
    proc.runner.step = lambda batch: (seen.append(torch.get_num_threads()), step(batch))[1]
    r = make_request(tok, PROMPTS[0], CONTEXTS[0])
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, r["params"], r["prompt"], r["out"])]))
    proc.apply(torch.randn(1, len(tok)))
    assert seen == [1] and torch.get_num_threads() == before


def test_v1_finished_requests_are_not_parked_preempted_ones_are(v1_parts):
    """A row that leaves is parked (AdaCoSteer state kept) only while its request may still come back."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    tok, model, new_proc = v1_parts
    proc = new_proc(gate_threshold=0.999, gate_patience=10)  # every step counts as confident: state to keep
    d = Driver(proc, model)
    reqs = [make_request(tok, PROMPTS[i], CONTEXTS[i], max_tokens=3 if i == 0 else 256) for i in range(3)]
    d.rows = list(reqs)
    d.update(added=[(i, r["params"], r["prompt"], r["out"]) for i, r in enumerate(reqs)])
    for _ in range(3):
        d.step()
    assert all(h.streak == 3 for h in proc.steered_rows.values())
    eos_req = reqs[2]
    eos_req["params"]._eos_token_id = eos_req["out"][-1]  # as if its last token were EOS: finished too
    d.rows = []
    d.update(removed=[0, 1, 2])  # 0 reached max_tokens, 2 ended with EOS: gone; 1 was preempted
    assert len(proc.engine.parking) == 1 and proc.runner.cached_rows == 0
    handle_1 = proc.engine.parking.take(reqs[1]["params"], len(reqs[1]["out"]))
    assert handle_1 is not None and handle_1.streak == 3
    proc.engine.parking.put(handle_1)
    # vLLM dropping the request (aborted while preempted) drops the parked handle with it
    del reqs[1], handle_1
    assert len(proc.engine.parking) == 0
    # a fresh request never takes a parked handle, even with the same SamplingParams object
    r = make_request(tok, PROMPTS[3], CONTEXTS[3])
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, r["params"], r["prompt"], r["out"])]))
    d.rows = [r]
    d.step()
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], moved=[], added=[]))
    assert len(proc.engine.parking) == 1
    twin = {**r, "out": []}  # an unseeded n > 1 sibling: same params object, no output yet
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, twin["params"], twin["prompt"],
                                                                             twin["out"])]))
    assert proc.steered_rows[0].streak == 0 and len(proc.engine.parking) == 1


def test_v1_n_children_sharing_one_params_object_are_steered_separately(v1_parts):
    tok, model, new_proc = v1_parts
    steps = 5
    want = run_alone(v1_parts, (PROMPTS[1], CONTEXTS[1]), steps)
    d = Driver(new_proc(), model)
    first = make_request(tok, PROMPTS[1], CONTEXTS[1])
    d.rows = [{**first, "out": []} for _ in range(3)]
    d.update(added=[(i, r["params"], r["prompt"], r["out"]) for i, r in enumerate(d.rows)])
    for _ in range(steps):
        d.step()
    assert [r["out"] for r in d.rows] == [want] * 3
    assert len({id(h) for h in d.proc.steered_rows.values()}) == 3


def test_v1_warnings_are_bounded_per_reason(v1_parts, caplog):
    """Per-request failures warn once per reason: the set of warned keys cannot grow with traffic."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    tok, model, new_proc = v1_parts
    proc = new_proc()
    engine = proc.engine
    for i in range(50):
        r = make_request(tok, PROMPTS[0], CONTEXTS[0])
        r["params"].extra_args["costeer_T"] = 0  # passed no frontend: refused by the engine, ended (fail closed)
        proc.update_state(BatchUpdate(batch_size=1, removed=[0] if i else [], moved=[],
                                      added=[(0, r["params"], r["prompt"], r["out"])]))
    (handle,) = proc.steered_rows.values()
    assert handle.failed and "costeer_T" in handle.failed and not handle.active
    logits = torch.randn(3, len(tok))
    logits[:, 0] = float("nan")
    reqs = [make_request(tok, PROMPTS[i], CONTEXTS[i]) for i in range(3)]
    for _ in range(20):
        proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                      added=[(i, r["params"], r["prompt"], r["out"]) for i, r in enumerate(reqs)]))
        proc.apply(logits.clone())
    assert engine._warned == {"nonfinite"}


# ------------------------------------------------------------------------------------------------
# arguments and the frontend check (no engine: validate_params as vLLM's frontend calls it)
# ------------------------------------------------------------------------------------------------
NUMERIC_ARGS = ["costeer_strength", "costeer_T", "costeer_alpha", "costeer_beta", "costeer_lam", "costeer_eta",
                "costeer_gate_threshold", "costeer_gate_patience", "costeer_eos_guard"]


@pytest.mark.parametrize("name", NUMERIC_ARGS)
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_refused_for_every_numeric_argument(name, value, tiny_pair_dirs):
    from vllm import SamplingParams

    from costeer_processor.vllm import CoSteerLogitsProcessor, EngineSettings, parse_request_args
    from costeer_processor.vllm.settings import REQUEST_ARGS

    assert REQUEST_ARGS[name] in ("int", "float")
    extra = {"costeer_context": "I am vegan.", name: value}
    with pytest.raises(ValueError, match=f"^{name} must be an? (integer|number), got bool {value}"):
        parse_request_args(extra)
    with pytest.raises(ValueError, match=f"{name} must be an? (integer|number), got bool"):
        CoSteerLogitsProcessor.validate_params(SamplingParams(extra_args=extra))
    key = name[len("costeer_"):]
    with pytest.raises(ValueError, match=f"CoSteer engine settings: {key} must be an? (integer|number), got bool"):
        EngineSettings.from_sources({"costeer": {"small_model": str(tiny_pair_dirs[1]), key: value}}, environ={})


@pytest.mark.parametrize("key", ["threads", "max_context_tokens"])
def test_booleans_are_refused_for_numeric_engine_settings(key):
    from costeer_processor.vllm import EngineSettings

    with pytest.raises(ValueError, match=f"{key} must be an integer, got bool"):
        EngineSettings(**{key: True})


def test_the_context_cache_size_is_an_engine_setting():
    from costeer_processor.vllm import EngineSettings

    assert EngineSettings().context_cache_mb == 256 and EngineSettings(context_cache_mb=0).context_cache_mb == 0
    with pytest.raises(ValueError, match="context_cache_mb must be a number, got bool"):
        EngineSettings(context_cache_mb=True)
    with pytest.raises(ValueError, match=r"context_cache_mb must be in \[0, inf\]"):
        EngineSettings(context_cache_mb=-1)
    assert EngineSettings.from_sources({}, environ={"COSTEER_CONTEXT_CACHE_MB": "0"}).context_cache_mb == 0


def test_defaults_are_the_cores():
    from costeer_processor.core import CoSteerConfig, Variants
    from costeer_processor.vllm import EngineSettings

    s = EngineSettings()
    assert (s.T, s.alpha, s.beta, s.lam, s.eta, s.strength) == (
        CoSteerConfig.T, CoSteerConfig.alpha, CoSteerConfig.beta, CoSteerConfig.lam, CoSteerConfig.eta, None)
    assert s.variants == Variants() and s.config == CoSteerConfig()
    assert s.default_gain == CoSteerConfig().gain


@pytest.fixture
def frontend_cfg(tiny_pair_dirs, monkeypatch):
    """What vLLM's frame shows validate_params: the engine config (and the prompt ids, set per test)."""
    from costeer_processor.vllm import frontend

    monkeypatch.delenv("COSTEER_SMALL_MODEL", raising=False)
    seen = {"cfg": fake_vllm_config(tiny_pair_dirs[0], {"small_model": str(tiny_pair_dirs[1])}), "ids": None}
    monkeypatch.setattr(frontend, "caller_engine_context", lambda: frontend.CallerContext(seen["cfg"], seen["ids"], None))
    return seen


def _validate(context):
    from vllm import SamplingParams

    from costeer_processor.vllm import CoSteerLogitsProcessor

    CoSteerLogitsProcessor.validate_params(SamplingParams(extra_args={"costeer_context": context}))


def test_frontend_counts_the_prompt_with_the_context(frontend_cfg, tiny_pair_dirs):
    tok = AutoTokenizer.from_pretrained(str(tiny_pair_dirs[0]))
    context = "I like green tea. " * 30  # ~330 tokens: fits the small model's 512-token window alone ...
    _validate(context)
    frontend_cfg["ids"] = tok(chat_text(tok, "Tell me about the history of tea. " * 25),
                              add_special_tokens=False)["input_ids"]  # ~230 tokens
    with pytest.raises(ValueError, match="costeer_context: context \\+ prompt is .* over the limit of 512"):
        _validate(context)  # ... but not next to this long prompt


def test_frontend_fails_closed(frontend_cfg, tiny_pair_dirs, monkeypatch):
    # the settings are visible but the prompt ids are not: the context alone is still checked
    _validate("I am vegan.")
    with pytest.raises(ValueError, match="costeer_context: .*over the limit of 512"):
        _validate("word " * 600)
    # nothing visible and no COSTEER_SMALL_MODEL: a steered request is refused, not admitted unchecked
    frontend_cfg["cfg"] = None
    with pytest.raises(ValueError, match="cannot check costeer_context here: vLLM's engine config is not visible"):
        _validate("I am vegan.")
    from vllm import SamplingParams

    from costeer_processor.vllm import CoSteerLogitsProcessor

    CoSteerLogitsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))  # unsteered: nothing to check
    # nothing visible but the environment names the small model: the context alone is checked
    monkeypatch.setenv("COSTEER_SMALL_MODEL", str(tiny_pair_dirs[1]))
    _validate("I am vegan.")
    with pytest.raises(ValueError, match="costeer_context: .*over the limit of 512"):
        _validate("word " * 600)
    # a small model the frontend cannot load: refused with the reason
    monkeypatch.setenv("COSTEER_SMALL_MODEL", str(tiny_pair_dirs[1] / "missing"))
    with pytest.raises(ValueError, match="cannot check costeer_context here: .*cannot resolve the small model"):
        _validate("I am vegan.")


def test_frontend_refuses_a_huge_context_before_tokenising(frontend_cfg, tiny_pair_dirs, monkeypatch):
    from costeer_processor.vllm.frontend import BranchBuilder

    tok = AutoTokenizer.from_pretrained(str(tiny_pair_dirs[0]))
    frontend_cfg["ids"] = tok(chat_text(tok, "Hi"), add_special_tokens=False)["input_ids"]
    _validate("I am vegan.")  # builds the checker

    def no_tokenising(*a, **k):
        raise AssertionError("a context that cannot fit was tokenised")

    monkeypatch.setattr(BranchBuilder, "encode_text", no_tokenising)
    with pytest.raises(ValueError, match="costeer_context: the context is 20,000,000 characters, .*over the limit"):
        _validate("x" * 20_000_000)


VARIANT_ARGS = [dict(costeer_ngram_guard=2), dict(costeer_plausibility=0.05),
                dict(costeer_plausibility=0.05, costeer_plausibility_mode="large"), dict(costeer_delta_clip=0.5),
                dict(costeer_placebo=1), dict(costeer_ngram_guard=3, costeer_delta_clip=1.0, costeer_eos_guard=0.9)]


@pytest.mark.parametrize("extra", VARIANT_ARGS, ids=lambda e: ",".join(f"{k[8:]}={v}" for k, v in e.items()))
def test_v1_options_of_the_steering_step_equal_hf(v1_parts, tiny_pair_dirs, extra):
    """Each option of the one steering step, as a per-request argument, gives the HF processor's tokens."""
    from costeer_processor.vllm.settings import parse_request_args

    tok, model, new_proc = v1_parts
    n = 10
    d = Driver(new_proc(), model)
    r = make_request(tok, PROMPTS[0], CONTEXTS[0], costeer_strength=4.0, **extra)
    d.rows = [r]
    d.update(added=[(0, r["params"], r["prompt"], r["out"])])
    for _ in range(n):
        d.step()
    variants = parse_request_args(r["params"].extra_args).variants
    small = AutoModelForCausalLM.from_pretrained(str(tiny_pair_dirs[1]), dtype=torch.float32).eval()
    proc = HFProcessor(SmallModelRunner(small, tok), [CONTEXTS[0]], CoSteerConfig(strength=4.0), variants=variants)
    enc = tok([chat_text(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([proc]),
                             pad_token_id=tok.pad_token_id)
    want = out[0, enc["input_ids"].shape[1]:].tolist()
    got = r["out"][:len(want)]  # HF stops at EOS; the driver keeps stepping
    assert got == want


def test_speculative_decoding_with_the_processor_is_refused_at_start(tiny_pair_dirs, monkeypatch):
    """vLLM 0.32's V1 runner (the CPU build's only one) refuses custom logits processors under speculative
    decoding when the engine starts: a clear error naming it, never an engine that serves unsteered
    answers (docs/speculative.md#vllm). CoSteer's own check (test_vllm_v2) covers V2."""
    from vllm import LLM

    from costeer_processor.vllm import CoSteerLogitsProcessor

    for k, v in ENGINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the error itself, not "engine core failed"
    large, small = tiny_pair_dirs
    with pytest.raises(ValueError, match="speculative decoding"):
        LLM(model=str(large), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
                                "prompt_lookup_min": 1},
            logits_processors=[CoSteerLogitsProcessor], additional_config={"costeer": {"small_model": str(small)}})
