"""Evaluation: zero-shot classification."""
from .zeroshot import (
    ZeroShotDataError,
    ZeroShotSet,
    build_classifier,
    classification_metrics,
    evaluate_zeroshot,
    load_zeroshot_set,
    write_result,
)

__all__ = [
    "ZeroShotDataError",
    "ZeroShotSet",
    "build_classifier",
    "classification_metrics",
    "evaluate_zeroshot",
    "load_zeroshot_set",
    "write_result",
]
