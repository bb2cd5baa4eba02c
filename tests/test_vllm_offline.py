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

from costeer_processor import SmallModelRunner
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
        proc = HFProcessor(runner, prompts, contexts, **kw)
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

    want = hf(PROMPTS, CONTEXTS, config=CoSteerConfig(strength=3.0), gate_threshold=0.05, gate_patience=2)
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
    assert after["cache_length"] == 0 and after["parked"] == 0
    # batched: per engine step one decode forward plus at most one prefill forward per branch for
    # all new requests together, never one forward per request
    assert after["forwards"] - base["forwards"] <= 3 * (after["steps"] - base["steps"]) < 500


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


def make_request(tok, prompt, context, **extra):
    args = {"costeer_context": context, **extra} if context else None
    return {"prompt": tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"], "out": [],
            "params": SimpleNamespace(extra_args=args)}


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
    assert proc.runner.cached_rows == 0 and len(proc.engine._parked) == 1
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
    with pytest.raises(ValueError, match="does not match the large model.*vocab_map is 'off'"):
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
