"""GLUE metrics against hand-computed values, and the shared layer's metric/history helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from structlora.tasks.glue import compute_glue_metrics, make_compute_metrics
from structlora.recipes.outputs import clean_eval_metrics, history_from_log


def test_cola_matthews_by_hand():
    # TP=2 (items 0, 4), FP=1 (item 1), TN=1 (item 2), FN=1 (item 3):
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    metrics = compute_glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert metrics == {"matthews_correlation": pytest.approx(1 / 6)}


def test_mrpc_and_qqp_accuracy_and_f1_by_hand():
    # 3 of 4 right; precision 2/3, recall 2/2 -> F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
    for task in ("mrpc", "qqp"):
        metrics = compute_glue_metrics(task, [1, 0, 1, 1], [1, 0, 0, 1])
        assert metrics == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(0.8)}


def test_stsb_pearson_and_spearman_by_hand():
    # x = [1, 2, 3], y = [1, 2, 4]: deviations [-1, 0, 1] and [-4/3, -1/3, 5/3];
    # r = 3 / (sqrt(2) * sqrt(42)/3) = 9 / sqrt(84); same ranks -> Spearman 1.
    metrics = compute_glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert metrics["spearmanr"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte"])
def test_accuracy_only_tasks(task):
    assert compute_glue_metrics(task, [0, 1, 2, 1, 0], [0, 1, 1, 1, 2]) == {"accuracy": pytest.approx(0.6)}


def test_trainer_compute_metrics_takes_argmax_of_logits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-1.0, 1.0]])  # -> 1, 0, 0, 1
    metrics = make_compute_metrics("mrpc")(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 1, 1])))
    # 3 of 4 right; precision 1, recall 2/3 -> F1 = 0.8
    assert metrics == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(0.8)}


def test_trainer_compute_metrics_regression_uses_raw_scores():
    scores = np.array([[1.0], [2.0], [3.0]])
    metrics = make_compute_metrics("stsb")(EvalPrediction(predictions=scores, label_ids=np.array([1.0, 2.0, 4.0])))
    assert metrics["pearson"] == pytest.approx(9 / math.sqrt(84))


def test_clean_eval_metrics_drops_bookkeeping_and_prefix():
    raw = {"eval_loss": 0.5, "eval_accuracy": 0.9, "eval_runtime": 3.0, "eval_samples_per_second": 10.0,
           "eval_matched_accuracy": 0.8, "eval_matched_loss": 0.6, "epoch": 2.0}
    assert clean_eval_metrics(raw) == {"accuracy": 0.9, "matched_accuracy": 0.8}
    assert clean_eval_metrics(raw, keep_loss=True) == {"eval_loss": 0.5, "accuracy": 0.9,
                                                       "matched_accuracy": 0.8, "eval_matched_loss": 0.6}


def test_history_merges_losses_and_eval_sets_per_step():
    log = [
        {"loss": 1.0, "epoch": 0.5, "step": 1},
        {"loss": 0.5, "epoch": 1.0, "step": 2},
        {"eval_matched_accuracy": 0.6, "eval_matched_loss": 0.9, "epoch": 1.0, "step": 2},
        {"eval_mismatched_accuracy": 0.7, "epoch": 1.0, "step": 2},
        {"loss": 0.25, "epoch": 2.0, "step": 4},
        {"eval_matched_accuracy": 0.8, "epoch": 2.0, "step": 4},
        {"train_runtime": 1.0, "train_loss": 0.6, "epoch": 2.0, "step": 4},
    ]
    assert history_from_log(log) == [
        {"epoch": 1.0, "step": 2, "train_loss": 0.75, "matched_accuracy": 0.6, "eval_matched_loss": 0.9,
         "mismatched_accuracy": 0.7},
        {"epoch": 2.0, "step": 4, "train_loss": 0.25, "matched_accuracy": 0.8},
    ]
