"""Text data for Pollinate: reading datasets into examples, built-in tasks, metrics.

Shared by client and server. :mod:`corpora.examples` owns the
:class:`Example` record and the canonical JSONL format,
:mod:`corpora.readers` loads local datasets (Dolly, Natural Instructions,
Alpaca, generic, classification) and the ``builtin:tasks`` source,
:mod:`corpora.tasks` generates the built-in checkable tasks and
:mod:`corpora.scoring` computes exact match, accuracy, Rouge-L and intervals.

Importing this package is cheap: each public name is imported from its module
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from corpora.examples import (
        DatasetError,
        Example,
        RunSplit,
        eval_size,
        open_text,
        read_jsonl,
        read_text,
        split_for_run,
        split_heldout_groups,
        split_holdout,
        write_jsonl,
    )
    from corpora.readers import (
        detect_schema,
        load_examples,
        ni_prompt,
        read_records,
    )
    from corpora.scoring import (
        METRICS,
        ScoringError,
        bootstrap_interval,
        exact_match,
        normalize_answer,
        per_example_scores,
        rouge_l,
        rouge_l_fedkseed,
        score,
    )
    from corpora.tasks import BUILTIN_TASKS, generate_tasks

__all__ = [
    "BUILTIN_TASKS",
    "DatasetError",
    "Example",
    "METRICS",
    "RunSplit",
    "ScoringError",
    "bootstrap_interval",
    "detect_schema",
    "eval_size",
    "exact_match",
    "generate_tasks",
    "load_examples",
    "ni_prompt",
    "normalize_answer",
    "open_text",
    "per_example_scores",
    "read_jsonl",
    "read_records",
    "read_text",
    "rouge_l",
    "rouge_l_fedkseed",
    "score",
    "split_for_run",
    "split_heldout_groups",
    "split_holdout",
    "write_jsonl",
]

_LAZY = {
    "BUILTIN_TASKS": "corpora.tasks",
    "DatasetError": "corpora.examples",
    "Example": "corpora.examples",
    "METRICS": "corpora.scoring",
    "RunSplit": "corpora.examples",
    "ScoringError": "corpora.scoring",
    "bootstrap_interval": "corpora.scoring",
    "detect_schema": "corpora.readers",
    "eval_size": "corpora.examples",
    "exact_match": "corpora.scoring",
    "generate_tasks": "corpora.tasks",
    "load_examples": "corpora.readers",
    "ni_prompt": "corpora.readers",
    "normalize_answer": "corpora.scoring",
    "open_text": "corpora.examples",
    "per_example_scores": "corpora.scoring",
    "read_jsonl": "corpora.examples",
    "read_records": "corpora.readers",
    "read_text": "corpora.examples",
    "rouge_l": "corpora.scoring",
    "rouge_l_fedkseed": "corpora.scoring",
    "score": "corpora.scoring",
    "split_for_run": "corpora.examples",
    "split_heldout_groups": "corpora.examples",
    "split_holdout": "corpora.examples",
    "write_jsonl": "corpora.examples",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
