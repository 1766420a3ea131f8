"""What a run leaves behind: ``results.json`` (``write_results``), ``curves.png`` (``plot_curves``), the final adapter
(``save_final_model``), and the records they hold (resolved flags, evaluation history, skipped steps and rows). Every
writer writes on the main process only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Mapping, Sequence

from ..tasks.data_errors import BadRows
from .resume import resumes_of


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# Trainer's own bookkeeping keys, not metrics of the model.
_NON_METRIC_KEYS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step"}


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved flags of a run (JSON values only), saved in results.json so that `structlora eval`
    can rebuild its data and model settings."""
    flags: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("_"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        flags[key] = value
    return flags


def history_from_log(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per evaluation, with the mean training loss logged since the previous one."""
    history: list[dict[str, Any]] = []
    pending_losses: list[float] = []
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry and not any(k.startswith("eval_") for k in entry):
            pending_losses.append(float(entry["loss"]))
            continue
        if not any(k.startswith("eval_") for k in entry):
            continue  # the final train summary (train_runtime, ...)
        step = int(entry.get("step", 0))
        record = by_step.get(step)
        if record is None:  # several eval sets at one step produce several entries: merge them
            record = {"epoch": round(float(entry.get("epoch", 0.0)), 4), "step": step,
                      "train_loss": (sum(pending_losses) / len(pending_losses)) if pending_losses else None}
            pending_losses = []
            by_step[step] = record
            history.append(record)
        record.update(clean_eval_metrics(entry, keep_loss=True))
    return history


def best_eval_metrics(trainer: Any, history: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Metrics of the evaluation that chose the best checkpoint (the one loaded at the end), read from
    ``history`` so the best model need not be evaluated again; None if it cannot be told."""
    state = trainer.state
    step = getattr(state, "best_global_step", None)
    if not step and state.best_model_checkpoint:
        step = int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[-1])
    record = next((r for r in history if r.get("step") == step), None)
    if record is None:
        return None
    return {k: float(v) for k, v in record.items()
            if k not in ("epoch", "step", "train_loss") and not k.endswith("loss") and v is not None}


def clean_eval_metrics(metrics: Mapping[str, Any], keep_loss: bool = False) -> dict[str, float]:
    """``{"eval_accuracy": .9, "eval_runtime": 3}`` -> ``{"accuracy": .9}`` (``eval_loss`` kept as
    ``eval_loss`` when ``keep_loss``; per-set losses ``eval_matched_loss`` likewise)."""
    cleaned: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("eval_") or not isinstance(value, (int, float)):
            continue
        name = key[len("eval_"):]
        if name in _NON_METRIC_KEYS or name.endswith(tuple("_" + k for k in _NON_METRIC_KEYS)):
            continue
        if name == "loss" or name.endswith("_loss"):
            if keep_loss:
                cleaned[key] = float(value)
            continue
        cleaned[name] = float(value)
    return cleaned


def save_final_model(trainer: Any, output_dir: str, subdir: str = "adapter") -> str:
    """Save the (best, already reloaded) adapter + head — or the whole model for ``full`` — to
    ``output_dir/subdir``. Trainer.save_model writes on the main process only."""
    path = os.path.join(output_dir, subdir)
    trainer.save_model(path)
    if trainer.is_world_process_zero():
        # Trainer pickles its arguments next to the weights; keep the output folder pickle-free (JSON).
        pickled = os.path.join(path, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(path, "training_args.json"), "w") as handle:
            handle.write(trainer.args.to_json_string())
    return path


def robustness_record(trainer: Any, bad_rows: BadRows | None) -> dict[str, Any]:
    """What results.json records of the run's skips: non-finite steps (``--skip-nonfinite-steps``) and bad data
    rows (``--skip-bad-rows``), printed too."""
    if bad_rows is not None:
        bad_rows.print_summary()
    return {"skipped_nonfinite_steps": int(getattr(trainer, "skipped_nonfinite_steps", 0) or 0),
            **(bad_rows.summary() if bad_rows is not None else {})}


def write_results(
    output_dir: str,
    task: str,
    method: str,
    trainable_params: int,
    eval_metrics: Mapping[str, float],
    history: Sequence[Mapping[str, Any]],
    train_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write ``output_dir/results.json`` (main process only) and return its path."""
    path = os.path.join(output_dir, "results.json")
    if not is_main_process():
        return path
    payload: dict[str, Any] = {
        "status": "completed",
        "task": task,
        "method": method,
        "trainable_params": int(trainable_params),
        "eval": {k: _json_number(v) for k, v in eval_metrics.items()},
        "history": [{k: _json_number(v) for k, v in record.items()} for record in history],
        "train_seconds": round(float(train_seconds), 3),
    }
    if extra:
        payload.update(extra)
    resumes = resumes_of(output_dir)
    if resumes:
        payload["resumes"] = resumes
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return path


def _json_number(value: Any) -> Any:
    # NaN (e.g. Matthews correlation of a constant prediction is 0, but Pearson can be NaN) is not JSON.
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def plot_curves(output_dir: str, history: Sequence[Mapping[str, Any]], metric: str) -> str:
    """``output_dir/curves.png``: training/eval loss against epochs and, when ``metric`` is not the loss
    itself, the eval ``metric`` in a second panel."""
    path = os.path.join(output_dir, "curves.png")
    if not is_main_process():
        return path
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers / CI
    import matplotlib.pyplot as plt

    metric_is_loss = metric in ("loss", "eval_loss")
    epochs = [record.get("epoch", i + 1) for i, record in enumerate(history)]
    figure, axes = plt.subplots(1, 1 if metric_is_loss else 2, figsize=(5 if metric_is_loss else 10, 4),
                                squeeze=False)
    loss_axis = axes[0][0]
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if r.get(key) is not None]
        if points:
            loss_axis.plot(*zip(*points, strict=True), marker="o", label=label)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.set_title("training and evaluation loss")
    if not metric_is_loss:
        metric_axis = axes[0][1]
        points = [(e, r[metric]) for e, r in zip(epochs, history, strict=True) if r.get(metric) is not None]
        if points:
            metric_axis.plot(*zip(*points, strict=True), marker="o", color="tab:green")
        metric_axis.set_xlabel("epoch")
        metric_axis.set_ylabel(metric)
        metric_axis.set_title(f"evaluation {metric}")
    figure.tight_layout()
    os.makedirs(output_dir, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
