"""Evaluation harness: tasks (preference alignment, LaMP-style personalization, personas), systems
(CoSteer and its baselines), metrics, and the ``benchmarks/eval.py`` command.

Run ``python -m costeer_processor.eval --quick`` for a smoke run on tiny models; see
``docs/eval.md``.
"""

from .metrics import distinct_n, meteor, rouge_scores, sentiment, word_count
from .tasks import Example, Task, longlamp_task, persona_tasks, preference_context, preference_tasks, sotu_task

__all__ = [
    "Example",
    "Task",
    "preference_tasks",
    "preference_context",
    "sotu_task",
    "longlamp_task",
    "persona_tasks",
    "rouge_scores",
    "meteor",
    "sentiment",
    "distinct_n",
    "word_count",
    "main",
]


def main(argv=None):
    """The evaluation command (``benchmarks/eval.py``); returns the summary dict."""
    from .run import main as _main

    return _main(argv)
