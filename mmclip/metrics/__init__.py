"""Evaluation metrics: retrieval recall@k, zero-shot classification, linear probe (distributed-safe)."""

from mmclip.metrics.linear_probe import (
    DEFAULT_L2_GRID,
    LinearClassifier,
    LinearProbeResult,
    fit_linear_probe,
    fit_logistic_regression,
    split_validation,
)
from mmclip.metrics.retrieval import (
    RetrievalMetric,
    RetrievalRanks,
    retrieval_metrics,
    retrieval_ranks,
    summarize_ranks,
)
from mmclip.metrics.zeroshot import (
    DEFAULT_TEMPLATES,
    PLACEHOLDER,
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    expand_prompts,
    subset_scores,
    zeroshot_logits,
)

__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_TEMPLATES",
    "PLACEHOLDER",
    "LinearClassifier",
    "LinearProbeResult",
    "RetrievalMetric",
    "RetrievalRanks",
    "ZeroShotAccuracy",
    "build_zeroshot_classifier",
    "expand_prompts",
    "fit_linear_probe",
    "fit_logistic_regression",
    "retrieval_metrics",
    "retrieval_ranks",
    "split_validation",
    "subset_scores",
    "summarize_ranks",
    "zeroshot_logits",
]
