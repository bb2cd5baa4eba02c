"""The documentation is tested like code: its examples run, its links resolve, the README stays short.

* Every fenced ``python`` block of README.md and docs/*.md runs: each file's blocks in order, in one
  namespace (later blocks use earlier names), in a temporary working directory. Blocks fenced
  ``python slow`` need the real models (and may start a vLLM server); they run only in the test
  marked ``slow``, together with the file's other blocks. Tracebacks point at the Markdown line.
* Every fence names a known language, so an example cannot hide from these tests by accident.
* Every relative link (and its ``#anchor`` on Markdown pages), every repository path named in
  backticks and every ``module:Class`` the pages tell users to load exists.
* Docstrings that point to ``docs/<page>.md`` point to a page that exists; README.md links every
  page and has at most 260 lines.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

LANGUAGES = {"python", "bash", "console", "text", "json"}
PYTHON_FLAGS = {"slow"}
# Top-level folders of this repository: a backticked path starting with one of these must exist.
REPO_DIRS = ("costeer_processor/", "benchmarks/", "scripts/", "tests/", "docs/", ".ci/")

_FENCE_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+)(?P<code>(?:(?!\n[ \t]*\n).)+?)\1", re.S)  # may wrap, not cross a paragraph
_QUALNAME = re.compile(r"\bcosteer_processor(?:\.\w+)+:\w+")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    flags: tuple[str, ...]
    source: str

    @property
    def slow(self) -> bool:
        return "slow" in self.flags

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """(fenced code blocks, the lines outside them) of a Markdown file."""
    blocks, prose = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        info = m["info"].split()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            j += 1
        assert j < len(lines), f"{path.relative_to(ROOT)}:{i + 1}: code block never closed"
        blocks.append(Block(path, i + 2, info[0] if info else "", tuple(info[1:]), "\n".join(body) + "\n"))
        prose.append("")  # a block separates paragraphs
        i = j + 1
    return blocks, prose


def python_blocks(path: Path, *, slow: bool) -> list[Block]:
    return [b for b in parse(path)[0] if b.lang == "python" and (slow or not b.slow)]


def compiled(block: Block):
    # Leading newlines make tracebacks and syntax errors name the Markdown file's own line numbers.
    return compile("\n" * (block.line - 1) + block.source, str(block.path), "exec")


def run_blocks(blocks: list[Block], workdir: Path, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        exec(compiled(block), namespace)  # noqa: S102 - running the documentation's own examples is the test


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in parse(path)[1]:
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m["title"])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_without_code(path: Path) -> str:
    return _CODE_SPAN.sub("", "\n".join(parse(path)[1]))


def code_spans(path: Path) -> list[str]:
    return [m["code"].strip() for m in _CODE_SPAN.finditer("\n".join(parse(path)[1]))]


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


FAST_PAGES = [p for p in PAGES if python_blocks(p, slow=False)]
SLOW_PAGES = [p for p in PAGES if any(b.slow for b in python_blocks(p, slow=True))]


# ------------------------------------------------------------------------------------------ examples
def test_pages_exist_and_have_runnable_examples():
    assert README.is_file() and len(PAGES) > 5
    # The docstrings of the package point to these two pages.
    assert {"vllm.md", "eval.md"} <= {p.name for p in PAGES}
    assert README in FAST_PAGES, "the README's HF example must run on tiny models"


@pytest.mark.parametrize("page", FAST_PAGES, ids=_ids(FAST_PAGES))
def test_python_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page, slow=False)
    assert blocks
    run_blocks(blocks, tmp_path, monkeypatch)


def cpu_engine_defaults(monkeypatch) -> None:
    """On a CPU, vLLM needs a KV-cache size and thread binding: the defaults `costeer` itself uses."""
    import torch
    from costeer_processor.vllm_server import CPU_DEFAULTS

    if not torch.cuda.is_available():
        for key, value in CPU_DEFAULTS.items():
            if key not in os.environ:
                monkeypatch.setenv(key, value)


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_ids(SLOW_PAGES))
def test_python_examples_with_real_models_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page, slow=True)
    assert any(b.slow for b in blocks)
    cpu_engine_defaults(monkeypatch)
    run_blocks(blocks, tmp_path, monkeypatch)


def test_every_fence_names_a_known_language():
    bad = []
    for page in PAGES:
        for b in parse(page)[0]:
            flags_ok = set(b.flags) <= PYTHON_FLAGS if b.lang == "python" else not b.flags
            if b.lang not in LANGUAGES or not flags_ok:
                bad.append(f"{b.where()}: ```{' '.join((b.lang, *b.flags))}")
    assert not bad, "fences must read one of " + ", ".join(sorted(LANGUAGES)) + " (or 'python slow'):\n" + "\n".join(bad)


def test_every_python_example_compiles():
    blocks = [b for page in PAGES for b in python_blocks(page, slow=True)]
    assert any(b.slow for b in blocks)
    for b in blocks:
        compiled(b)  # a SyntaxError names the Markdown file and line


def test_slow_examples_import_names_that_exist():
    """The real-model examples cannot run here, but what they import from this package must exist."""
    checked = 0
    for page in SLOW_PAGES:
        for b in python_blocks(page, slow=True):
            for node in ast.walk(ast.parse(b.source)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("costeer_processor"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{b.where()}: {node.module} has no {alias.name}"
                        checked += 1
    assert checked


def test_processor_names_users_are_told_to_load_exist():
    names = sorted({m for page in PAGES for m in _QUALNAME.findall(page.read_text(encoding="utf-8"))})
    assert "costeer_processor.vllm:CoSteerLogitsProcessor" in names
    pytest.importorskip("vllm")
    for name in names:
        module, attr = name.split(":")
        assert hasattr(importlib.import_module(module), attr), f"{name} does not exist"


# ------------------------------------------------------------------------------------------ links, paths
def test_relative_links_point_to_files_that_exist():
    broken, checked = [], 0
    for page in PAGES:
        for m in _LINK.finditer(prose_without_code(page)):
            target = m["target"].strip("<>")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert checked > 20
    assert not broken, "\n".join(broken)


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m[1].split(",") for q in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def test_repository_paths_named_in_the_pages_exist():
    missing, checked = [], 0
    for page in PAGES:
        for span in code_spans(page):
            word = span.split()[0] if span.split() else ""
            word = word.rstrip(".,;:)")
            if not word.startswith(REPO_DIRS) or "<" in word or "*" in word:
                continue
            for path in _expand_braces(word):
                checked += 1
                path, _, test = path.partition("::")  # `tests/x.py::test_name`: the test must exist too
                if not (ROOT / path).exists() or (test and f"def {test}(" not in (ROOT / path).read_text()):
                    missing.append(f"{page.relative_to(ROOT)}: `{path}{'::' + test if test else ''}`")
    assert checked > 20
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(missing)


def test_docs_named_in_docstrings_exist():
    named = set()
    for source in [*(ROOT / "costeer_processor").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        named |= set(re.findall(r"\bdocs/[\w-]+\.md\b", source.read_text(encoding="utf-8")))
    assert {"docs/vllm.md", "docs/eval.md"} <= named
    assert not [n for n in named if not (ROOT / n).is_file()]


# ------------------------------------------------------------------------------------------ the README
def test_readme_is_the_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"
    linked = {(README.parent / m["target"].partition("#")[0]).resolve()
              for m in _LINK.finditer(prose_without_code(README))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_link_and_fence_parsers_on_a_known_page(tmp_path):
    """The helpers above find what they must (so the checks cannot pass by finding nothing)."""
    page = tmp_path / "page.md"
    page.write_text("# A `code` title: here\n\nsee [x](other.md#a-code-title-here) and `[no](link.md)`\n\n"
                    "  ```python slow\n  x = 1\n  ```\n\n```text\n[not](a-link.md)\n```\n## A code title: here\n",
                    encoding="utf-8")
    blocks, _ = parse(page)
    assert [(b.lang, b.flags, b.source, b.line) for b in blocks] == [
        ("python", ("slow",), "x = 1\n", 6), ("text", (), "[not](a-link.md)\n", 10)]
    assert [m["target"] for m in _LINK.finditer(prose_without_code(page))] == ["other.md#a-code-title-here"]
    assert anchors(page) == {"a-code-title-here", "a-code-title-here-1"}
    assert _expand_braces("a/b.{json,md}") == ["a/b.json", "a/b.md"]
