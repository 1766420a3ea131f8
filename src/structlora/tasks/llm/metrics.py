"""SQuAD-style answer metrics (the normalisation of the official SQuAD v1.1 script) and accuracy."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        # Both empty counts as a match; one empty is a miss.
        return float(predicted_tokens == gold_tokens)
    common = Counter(predicted_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(F1, EM) of a prediction against its best-matching gold answer."""
    return (max(token_f1(prediction, g) for g in golds), max(exact_match(prediction, g) for g in golds))


def generation_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean F1 and EM, as fractions (like the GLUE metrics)."""
    if len(predictions) != len(golds) or not predictions:
        raise ValueError("need as many predictions as gold answer lists, and at least one")
    scores = [best_over_golds(p, g) for p, g in zip(predictions, golds)]
    return {"f1": sum(s[0] for s in scores) / len(scores),
            "exact_match": sum(s[1] for s in scores) / len(scores)}


def choice_accuracy(predictions: Sequence[int], golds: Sequence[Sequence[int]]) -> float:
    """Accuracy as a fraction; a prediction is right when it is one of the gold candidates (ReCoRD)."""
    if len(predictions) != len(golds) or not predictions:
        raise ValueError("need as many predictions as gold sets, and at least one")
    return sum(p in set(g) for p, g in zip(predictions, golds)) / len(predictions)
