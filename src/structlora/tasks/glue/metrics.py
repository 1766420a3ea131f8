"""GLUE metrics with scikit-learn / scipy (the `evaluate` package needs the network)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .data import GLUE_TASKS


def compute_glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """Metrics of ``task`` from predicted classes (or scores, for STS-B) and gold labels.

    CoLA: Matthews correlation; STS-B: Pearson and Spearman; MRPC/QQP: accuracy and F1 (positive class 1);
    the others (MNLI, QNLI, RTE, SST-2): accuracy."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if task == "stsb":
        predictions, labels = predictions.astype(np.float64).ravel(), labels.astype(np.float64).ravel()
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predictions))
    return metrics


def make_compute_metrics(task: str) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for transformers' Trainer: logits -> classes (argmax) or scores (STS-B)."""
    is_regression = GLUE_TASKS[task].num_labels == 1

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):  # models that also return hidden states
            logits = logits[0]
        logits = np.asarray(logits)
        predictions = logits.reshape(-1) if is_regression else logits.argmax(axis=-1)
        return compute_glue_metrics(task, predictions, eval_prediction.label_ids)

    return compute_metrics
