"""Evaluation: one metric front-end (zero-shot, retrieval, linear probe) shared by ``evaluate()``, the
Lightning callbacks that evaluate during fit, ``mmclip eval`` and the run report writers.

The callbacks and report writers (which import Lightning and plotting) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmclip.evaluation.core import (
    TASKS,
    default_class_subsets,
    embed_classification,
    eval_mode,
    evaluate,
    key_ids,
    results_table,
    run_linear_probe,
    run_retrieval,
    run_zeroshot,
)

_LAZY = {
    "LinearProbeEval": "mmclip.evaluation.callbacks",
    "RetrievalEval": "mmclip.evaluation.callbacks",
    "ZeroShotEval": "mmclip.evaluation.callbacks",
    "write_report": "mmclip.evaluation.report",
    "caption_report": "mmclip.evaluation.caption_report",
}

__all__ = [
    "TASKS",
    "LinearProbeEval",
    "RetrievalEval",
    "ZeroShotEval",
    "caption_report",
    "default_class_subsets",
    "embed_classification",
    "eval_mode",
    "evaluate",
    "key_ids",
    "results_table",
    "run_linear_probe",
    "run_retrieval",
    "run_zeroshot",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
