"""Evaluation: zero-shot classification and image-text retrieval (CLIP_benchmark layouts and schema)."""
from ..data.labelled import build_folder_loader, default_templates, find_classes, folder_samples
from .retrieval import (
    RetrievalDataError,
    RetrievalEmbeddings,
    RetrievalSet,
    embed_retrieval_set,
    evaluate_retrieval,
    load_retrieval_set,
    retrieval_metrics,
)
from .zeroshot import (
    PREDICTION_COLUMNS,
    ZeroShotDataError,
    ZeroShotPredictions,
    ZeroShotSet,
    build_classifier,
    classification_metrics,
    evaluate_zeroshot,
    load_zeroshot_set,
    predict_zeroshot,
    write_predictions,
    write_result,
)

__all__ = [
    "PREDICTION_COLUMNS",
    "RetrievalDataError",
    "RetrievalEmbeddings",
    "RetrievalSet",
    "ZeroShotDataError",
    "ZeroShotPredictions",
    "ZeroShotSet",
    "build_classifier",
    "build_folder_loader",
    "classification_metrics",
    "default_templates",
    "embed_retrieval_set",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "find_classes",
    "folder_samples",
    "load_retrieval_set",
    "load_zeroshot_set",
    "predict_zeroshot",
    "retrieval_metrics",
    "write_predictions",
    "write_result",
]
