"""What every benchmark shares: the prompts and personal contexts (one list, so their numbers compare),
and earlier small-model runners read from git (so before / after run side by side in one process)."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# first: the first release (one padded axis, torch.cat per step); padded: the same axis grown in place,
# with the context cache (the layout before costeer_processor/packed_kv.py)
REVISIONS = {"first": "f005533", "padded": "0b03b48"}

PROMPTS = [
    "Suggest a dinner recipe for tonight.", "Plan a weekend trip for me.", "Recommend a book to read.",
    "Write a short poem about autumn.", "How should I start learning to code?", "Give me a workout plan.",
    "What gift should I buy for a friend?", "Describe a perfect morning routine.",
]
CONTEXTS = [
    "I am vegan and I love very spicy food.", "I hate crowds and love mountains.", "I only read science fiction.",
    "I like funny, rhyming verse.", "I am a retired carpenter who likes practical examples.",
    "I have a bad knee and no gym.", "My friend loves tea and gardening.", "I wake up at 5am and meditate.",
]


def long_context(context: str, user: int, tok, n_tokens: int) -> str:
    """A user profile of about ``n_tokens`` tokens (LongLaMP-length personal contexts: 1,000-3,000)."""
    lines = [f"Profile of user {user}."]
    k = 0
    while len(tok(" ".join(lines), add_special_tokens=False)["input_ids"]) < n_tokens:
        k += 1
        lines.append(f"Record {k}: {context}")
    return " ".join(lines)


def _load_source(name: str, source: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def legacy_runner_class(rev: str, baseline_file: str = None):
    """``SmallModelRunner`` of an earlier commit (its own ``kv_cache`` too; other imports from today)."""
    def show(path):
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout
    source = Path(baseline_file).read_text() if baseline_file else show("costeer_processor/small_model.py")
    if "from .kv_cache import" in source:
        _load_source(f"legacy_kv_cache_{rev}", show("costeer_processor/kv_cache.py"))
        source = source.replace("from .kv_cache import", f"from legacy_kv_cache_{rev} import")
    source = source.replace("from .", "from costeer_processor.")
    return _load_source(f"legacy_small_model_{rev}", source).SmallModelRunner
