"""Evaluation of a causal LM on prompted examples, and the Trainer that trains on candidate scores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .metrics import choice_accuracy, generation_metrics
from .scoring import Objective, example_loss, generate_answers, score_candidates
from .tasks import PromptedExample, TaskSpec


@dataclass(frozen=True)
class EvaluationSettings:
    max_length: int
    batch_size: int = 8
    max_new_tokens: int = 50


def primary_metric(spec: TaskSpec) -> str:
    return "f1" if spec.family == "generation" else "accuracy"


def evaluate_examples(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, examples: Sequence[PromptedExample],
                      settings: EvaluationSettings, objective: Objective | None = None,
                      with_loss: bool = False, progress: str | None = None
                      ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (accuracy, or F1 / exact match for generation; `loss` = the training objective when
    `with_loss`) and one prediction record per example. `progress`: the title of a progress bar on stderr
    (None: no bar)."""
    objective = objective or spec.objective
    metrics: dict[str, float] = {}
    if spec.family == "generation":
        answers = generate_answers(model, tokenizer, examples, settings.max_length, settings.max_new_tokens,
                                   settings.batch_size, progress=progress and f"{progress}: generate")
        metrics.update(generation_metrics(answers, [e.answers for e in examples]))
        predictions = [{"prediction": a, "answers": list(e.answers)} for a, e in zip(answers, examples)]
        if with_loss:  # the gold completion is the only candidate of a generation example
            scores = score_candidates(model, tokenizer, examples, settings.max_length, settings.batch_size,
                                      progress=progress and f"{progress}: loss")
            metrics["loss"] = scores.objective_loss([0] * len(examples), "lm")
        return metrics, predictions
    scores = score_candidates(model, tokenizer, examples, settings.max_length, settings.batch_size,
                              progress=progress)
    chosen = scores.predictions()
    metrics["accuracy"] = choice_accuracy(chosen, [e.gold for e in examples])
    if with_loss:
        metrics["loss"] = scores.objective_loss([e.gold[0] for e in examples], objective)
    predictions = [{"prediction": c, "gold": list(e.gold), "scores": [round(m, 5) for m in means]}
                   for c, e, means in zip(chosen, examples, scores.means)]
    return metrics, predictions


def llm_trainer_class(base: type) -> type:
    """`base` (AdapterTrainer or Trainer) with the candidate / gold-completion loss and an `evaluate`
    that scores the dev examples the way the final evaluation does (so the best checkpoint is the one
    with the best dev accuracy or F1)."""

    class LLMTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, task: TaskSpec, tokenizer: Any, objective: Objective,
                     evaluation: EvaluationSettings, **kwargs: Any) -> None:
            training_args = kwargs.get("args")
            if not kwargs.get("eval_dataset") and training_args is not None:
                # No dev examples: train for the given epochs without selection.
                kwargs["args"] = dataclasses.replace(training_args, eval_strategy="no",
                                                     load_best_model_at_end=False)
                kwargs["eval_dataset"] = None
            super().__init__(*args, **kwargs)
            self.task, self.llm_tokenizer, self.objective, self.evaluation = task, tokenizer, objective, evaluation
            # Our loss is already a mean over the micro-batch: let Trainer divide by accumulation steps.
            self.model_accepts_loss_kwargs = False
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = False

        def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                         return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            loss = example_loss(model, inputs, self.objective)
            return (loss, None) if return_outputs else loss

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:
            examples = eval_dataset if eval_dataset is not None else self.eval_dataset
            metrics, _ = evaluate_examples(self.model, self.llm_tokenizer, self.task, examples, self.evaluation,
                                           self.objective, with_loss=True,
                                           progress=None if self.args.disable_tqdm else f"dev {self.task.name}")
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return LLMTrainer
