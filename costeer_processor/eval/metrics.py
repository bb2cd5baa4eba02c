"""Metrics: ROUGE-1/L, METEOR (only with a local WordNet), length, sentiment, distinct-n, and the
persona task's leak terms, copied runs and collapsed answers.

Everything runs offline. METEOR needs WordNet; it is used only when one is found locally
(:func:`find_wordnet`), otherwise it is reported as ``None`` ("unavailable").
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "words",
    "word_count",
    "rouge_scores",
    "sentiment",
    "distinct_n",
    "meteor",
    "meteor_available",
    "find_wordnet",
    "install_wordnet_from_deb",
    "summary_stats",
    "leak_terms_in",
    "copied_run",
    "collapsed",
    "COPY_MIN_WORDS",
]

_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Whitespace words (what "response length in words" counts)."""
    return text.split()


def word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- ROUGE
@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict:
    """ROUGE-1 and ROUGE-L F-measures (``rouge-score``, Porter stemmer on)."""
    s = _rouge_scorer().score(reference, prediction)
    return {"rouge1": s["rouge1"].fmeasure, "rougeL": s["rougeL"].fmeasure}


# --------------------------------------------------------------------------- sentiment
@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1] (lexicon ships with ``vaderSentiment``)."""
    return float(_vader().polarity_scores(text)["compound"])


# --------------------------------------------------------------------------- distinct-n
def _ngram_tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def distinct_n(texts: Sequence[str] | str, n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams, pooled over ``texts``.

    Tokens are lower-cased words and punctuation marks. 0.0 when there is no n-gram at all.
    """
    if isinstance(texts, str):
        texts = [texts]
    total = 0
    unique = set()
    for text in texts:
        toks = _ngram_tokens(text)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


# --------------------------------------------------------------------------- persona: topic drift
COPY_MIN_WORDS = 4  # a copied run is at least this many consecutive words of the context
_COPY_WORD = re.compile(r"\w+(?:'\w+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@lru_cache(maxsize=4096)
def _term_pattern(term: str) -> re.Pattern:
    # a word prefix: the term starts where a word starts; its spaces match any run of whitespace
    body = r"\s+".join(re.escape(part) for part in term.translate(_APOSTROPHES).split())
    return re.compile(r"(?<!\w)" + body, re.IGNORECASE)


def _has_term(text: str, term: str) -> bool:
    return _term_pattern(term).search(text.translate(_APOSTROPHES)) is not None


def leak_terms_in(answer: str, terms: Sequence[str], question: str = "") -> list[str]:
    """The leak terms the answer contains and the question does not (in ``terms`` order).

    A term matches case-insensitively as a word prefix: where a word starts (no letter, digit or
    ``_`` just before it), with any continuation (``"unemploy"`` matches "Unemployment",
    ``"patient"`` matches "patients" but not "outpatient"); the spaces of a multi-word term match
    any whitespace (``"night shift"`` matches "night  shifts"). A term the question itself
    contains is not a leak (the answer may repeat the question's words).
    """
    return [t for t in terms if _has_term(answer, t) and not _has_term(question, t)]


def _copy_words(text: str) -> list[str]:
    return _COPY_WORD.findall(text.translate(_APOSTROPHES).lower())


def copied_run(answer: str, context: str, question: str = "", min_words: int = COPY_MIN_WORDS) -> Optional[str]:
    """The first run of ``min_words`` consecutive context words that the answer repeats and the
    question does not contain, or ``None``.

    Words are lower-cased runs of letters / digits / ``_`` (apostrophes inside kept: "I'm");
    punctuation and whitespace between them do not count, so "phone, between calls" repeats
    "phone between calls". A longer copied run always contains such a ``min_words`` run.
    """
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}")

    def grams(words):
        return {tuple(words[i:i + min_words]) for i in range(len(words) - min_words + 1)}

    ctx = _copy_words(context)
    in_answer, in_question = grams(_copy_words(answer)), grams(_copy_words(question))
    for i in range(len(ctx) - min_words + 1):
        g = tuple(ctx[i:i + min_words])
        if g in in_answer and g not in in_question:
            return " ".join(g)
    return None


def collapsed(text: str, *, min_tokens: int = 8, min_distinct_2: float = 0.5) -> bool:
    """A degenerate answer: no word at all, or at least ``min_tokens`` tokens (words and punctuation
    marks, as for distinct-n) of which fewer than half the bigrams are distinct (a loop such as
    "I'm a paramedic. I'm a paramedic. ..."), i.e. the answer's own distinct-2 < ``min_distinct_2``."""
    toks = _ngram_tokens(text)
    if not any(re.search(r"\w", t) for t in toks):
        return True
    return len(toks) >= min_tokens and distinct_n(text, 2) < min_distinct_2


# --------------------------------------------------------------------------- METEOR
NLTK_DATA_ENV = "COSTEER_NLTK_DATA"
DEFAULT_NLTK_DATA = Path.home() / ".cache" / "costeer_eval" / "nltk_data"
# WordNet 3.0's lexicographer file list; Debian's wordnet-base ships the database without it,
# and NLTK's reader needs it (it is the fixed table from the WordNet documentation, lexnames(5)).
_LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
_LEX_SYNTACTIC = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def _nltk_data_roots() -> list[Path]:
    roots = [os.environ.get(NLTK_DATA_ENV), str(DEFAULT_NLTK_DATA)]
    return [Path(r) for r in roots if r]


@lru_cache(maxsize=1)
def find_wordnet():
    """A WordNet corpus reader from local files, or ``None``.

    Looks in NLTK's data path (``nltk.data.find("corpora/wordnet")``), extended with
    ``$COSTEER_NLTK_DATA`` and ``~/.cache/costeer_eval/nltk_data`` (where
    :func:`install_wordnet_from_deb` puts it). Nothing is downloaded.
    """
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        return None
    for root in _nltk_data_roots():
        if root.is_dir() and str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
    class _EnglishWordNet(WordNetCorpusReader):
        # The reader maps WordNet versions for the multilingual (OMW) functions through
        # index.sense, which Debian's package lacks; METEOR needs English synsets only.
        def map_wn(self, version="wordnet"):
            return None

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available"
            reader = (WordNetCorpusReader if (Path(str(root)) / "index.sense").exists() else _EnglishWordNet)(root, None)
        reader.synsets("dog")  # fail here, not in the middle of an evaluation
        return reader
    except (OSError, LookupError, ValueError, IndexError):  # unreadable files or a broken database
        return None


def install_wordnet_from_deb(deb: os.PathLike, nltk_data: os.PathLike = DEFAULT_NLTK_DATA) -> Path:
    """Unpacks Debian's ``wordnet-base`` package (the WordNet 3.0 database) for METEOR, offline.

    Copies ``usr/share/wordnet/*`` from the ``.deb`` (via ``dpkg-deb -x``) into
    ``<nltk_data>/corpora/wordnet`` and writes the ``lexnames`` table NLTK's reader expects
    (Debian leaves it out). NLTK's own ``wordnet`` corpus is the same WordNet 3.0 database, so
    METEOR scores match. Returns the corpus folder.
    """
    dest = Path(nltk_data) / "corpora" / "wordnet"
    dpkg = shutil.which("dpkg-deb")
    if dpkg is None:
        raise RuntimeError("dpkg-deb is not available; unpack usr/share/wordnet from the .deb by hand")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([dpkg, "-x", str(deb), tmp], check=True)
        src = Path(tmp) / "usr" / "share" / "wordnet"
        if not (src / "data.noun").is_file():
            raise RuntimeError(f"{deb} holds no usr/share/wordnet/data.noun; is it wordnet-base?")
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            shutil.copy2(f, dest / f.name)
    if not (dest / "lexnames").exists():
        lines = [f"{i:02d}\t{name}\t{_LEX_SYNTACTIC[name.split('.')[0]]}" for i, name in enumerate(_LEXNAMES)]
        (dest / "lexnames").write_text("\n".join(lines) + "\n", encoding="utf-8")
    find_wordnet.cache_clear()
    return dest


def meteor_available() -> bool:
    return find_wordnet() is not None


def meteor(prediction: str, reference: str) -> Optional[float]:
    """NLTK's METEOR against one reference (tokens: lower-cased words and punctuation marks),
    or ``None`` when no local WordNet is found."""
    wn = find_wordnet()
    if wn is None:
        return None
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([_ngram_tokens(reference)], _ngram_tokens(prediction), wordnet=wn))


# --------------------------------------------------------------------------- aggregation
def summary_stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "median": None, "std": None}
    return {
        "mean": statistics.fmean(vals),
        "median": statistics.median(vals),
        "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
    }
