"""`structlora report DIR...`: the papers' comparison table from run folders (their results.json files).

    structlora report runs/table --output table.md --csv table.csv --plot table.png

Each DIR is a run folder (holding results.json) or a folder of run folders (searched recursively; a
`structlora sweep` output is one). Rows are methods (``<model> · <method>`` when the runs have several base
models), columns tasks; each cell is the mean ± std over seeds of the metric the papers report for that task (MCC for
CoLA, Pearson for STS-B, accuracy/F1 for MRPC and QQP, matched accuracy for MNLI, accuracy otherwise; fractions ×100,
other metrics such as a loss as recorded), with trainable parameters (adapter alone and
with the head) and an average column. Cells with fewer seeds than the others, failed runs (a sweep's
failed.json) and missing tasks are marked, and an average over such cells is marked too: nothing is
averaged silently. ``--per-run`` prints the old one-line-per-run table instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .glue import GLUE_TASK_NAMES
from .methods import PEFT_LIBRARY_METHODS, STRUCTLORA_METHODS, method_labels

# The metric(s) each paper reports per GLUE task (two: "a/b" in the cell, their mean in the average).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"), "stsb": ("pearson",), "mnli": ("matched_accuracy",), "qnli": ("accuracy",),
    "rte": ("accuracy",),
}
METRIC_SHORT = {"matthews_correlation": "MCC", "accuracy": "acc", "f1": "F1", "pearson": "Pearson",
                "matched_accuracy": "acc (m)", "spearmanr": "Spearman"}
TASK_ORDER = GLUE_TASK_NAMES
# The papers' row order: full fine-tuning, the baselines, then structlora's methods (every --method once).
_TABLE_ORDER = ("full", "bitfit", "adapter", *PEFT_LIBRARY_METHODS, *STRUCTLORA_METHODS)
METHOD_ORDER = tuple(label for method in _TABLE_ORDER for label in method_labels(method))
# Metrics that are fractions (accuracy, F1, correlations): shown ×100 as in the papers. Others (a loss, BLEU) as
# recorded: an E2E eval_loss of 3.32 is 3.3, not 332.
FRACTION_METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "exact_match")
MODEL_SEPARATOR = " · "  # a row's label when the runs have several base models: "<model> · <method>"
INCOMPLETE = "†"
FAILED = "✗"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run folders (or folders containing them)")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument("--csv", default=None, help="write the table as CSV (one row per method and task)")
    parser.add_argument("--plot", default=None, help="write a PNG: metric vs trainable parameters (log scale)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds each cell should have (default: the most any cell has)")
    parser.add_argument("--per-run", action="store_true", help="one line per run instead of the paper table")


def run(args: argparse.Namespace) -> int:
    results, left_out = find_runs(args.runs)
    print_left_out(left_out)
    if not results:
        raise SystemExit(f"error: no finished run under {', '.join(args.runs)}"
                         + (" (see the notes above)" if left_out else ""))
    seeds, csv_path, plot_path = (getattr(args, name, None) for name in ("seeds", "csv", "plot"))
    if getattr(args, "per_run", False):
        table = markdown_table([r for r in results if r.get("status") != "failed"])
    else:
        cells = build_cells(results)
        table = paper_table(results, expected_seeds=seeds)
        if csv_path:
            Path(csv_path).write_text(csv_table(cells, seeds))
        if plot_path:
            plot(cells, plot_path, seeds)
    print(table)
    if getattr(args, "output", None):
        Path(args.output).write_text(table + "\n")
    return 0


def is_reevaluation(record: dict[str, Any]) -> bool:
    """A results.json written by `structlora eval` (older ones: a split and no training record)."""
    return "evaluation_of" in record or ("split" in record and "trainable_params" not in record)


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """results.json of each run folder (``run`` set to the folder), plus a ``status: failed`` record for each
    sweep run folder with a failed.json and no results.json."""
    return find_runs(paths)[0]


def find_runs(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """``(runs, left_out)``: the records of ``load_runs``, and each folder that holds a run (or was given) but has
    no place in the table, with why: unfinished, diverged, unreadable, not a run."""
    runs: list[dict[str, Any]] = []
    left_out: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            left_out.append((path, "does not exist"))
            continue
        if path.is_file():
            files = [path]
        elif (path / "results.json").is_file() or (path / "failed.json").is_file():
            files = [f for f in (path / "results.json", path / "failed.json") if f.is_file()]
        else:
            files = sorted([*path.rglob("results.json"), *path.rglob("failed.json")])
            left_out += [(folder, _unfinished(folder)) for folder in _unfinished_runs(path, files)]
            if not files and not any(folder == path for folder, _ in left_out):
                left_out.append((path, "no results.json in it or below: not a run folder"))
        for file in files:
            if file.name == "failed.json" and (file.parent / "results.json").is_file():
                continue  # retried since, and finished
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as error:
                left_out.append((file.parent, f"unreadable {file.name} ({error})"))
                continue
            if is_reevaluation(record):
                if file.parent == path:  # named on the command line: say why it is not in the table
                    left_out.append((path, "a `structlora eval` output, not a training run (its run is counted)"))
                continue  # `structlora eval` output (RUN/eval-dev by default): the run itself is counted
            if file.name == "failed.json":
                record["status"] = "failed"
            elif record.get("status", "completed") != "completed":
                left_out.append((file.parent, f"{record['status']}: {record.get('error', 'no result')}"))
                continue
            record["run"] = str(file.parent)
            runs.append(record)
    return runs, left_out


_RUN_MARKERS = ("checkpoints", "run_flags.json", "adapter")


def _unfinished_runs(root: Path, files: Sequence[Path]) -> list[Path]:
    """Run folders under ``root`` (the root included) that have started (checkpoints, a flags record or an
    adapter) but hold neither results.json nor failed.json."""
    finished = {file.parent for file in files}
    started = {marker.parent for name in _RUN_MARKERS for marker in [root / name, *root.rglob(name)] if marker.exists()}
    return sorted(folder for folder in started
                  if folder not in finished and not any(parent in started for parent in folder.parents))


def _unfinished(folder: Path) -> str:
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    last = f"; its last checkpoint is {checkpoints[-1].name}" if checkpoints else ""
    return f"no results.json: an unfinished run (resume it with --resume){last}"


def print_left_out(left_out: Sequence[tuple[Path, str]]) -> None:
    """One stderr line per folder that is not in the table, with why."""
    for folder, why in left_out:
        print(f"note: not in the table: {folder}: {why}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Cell:
    """One method on one task: the per-seed values of each reported metric, failures, sizes, times."""

    method: str
    task: str
    metrics: tuple[str, ...]
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> per finished seed (×100)
    seeds: list[Any] = field(default_factory=list)
    failed: int = 0
    nan: int = 0
    adapter_params: set[int] = field(default_factory=set)
    trainable_params: set[int] = field(default_factory=set)
    train_seconds: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, metric: str) -> float | None:
        values = self.values.get(metric, [])
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        """Sample standard deviation over the finished seeds; None for one seed (a 0 would claim certainty)."""
        values = self.values.get(metric, [])
        return statistics.stdev(values) if len(values) > 1 else None

    def spread(self) -> float | None:
        """The std averaged over this task's reported metrics (as the score averages their means); None for one seed."""
        stds = [self.std(m) for m in self.metrics]
        return None if not stds or None in stds else statistics.fmean(stds)  # type: ignore[arg-type]

    def score(self) -> float | None:
        """What the average column uses: the mean of this task's reported metrics."""
        means = [self.mean(m) for m in self.metrics]
        return None if not means or any(m is None for m in means) else statistics.fmean(means)  # type: ignore[arg-type]

    def complete(self, expected: int) -> bool:
        return self.n >= expected and not self.failed and not self.nan


def task_metrics(task: str, record: dict[str, Any]) -> tuple[str, ...]:
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    main = record.get("main_metric")
    return (main,) if main else tuple(list(record.get("eval", {}))[:1])


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` is a fraction (shown ×100): accuracy, F1, MCC, correlations, exact match."""
    return metric.removeprefix("eval_").endswith(FRACTION_METRICS)


def build_cells(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """Cells keyed by (row, task); a row is the method, or ``<model> · <method>`` when the runs have several base
    models (one model's numbers never average with another's)."""
    cells: dict[tuple[str, str], Cell] = {}
    several_models = len({str(r.get("model")) for r in results if r.get("model")}) > 1
    for record in results:
        method, task = str(record.get("method", "?")), str(record.get("task", "?"))
        if several_models:
            method = f"{record.get('model', '?')}{MODEL_SEPARATOR}{method}"
        cell = cells.get((method, task))
        if cell is None:
            cell = cells[(method, task)] = Cell(method, task, task_metrics(task, record))
        if record.get("status") == "failed":
            cell.failed += 1
            continue
        metrics = record.get("eval", {})
        values = [metrics.get(m) for m in cell.metrics]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            cell.nan += 1  # NaN is written as null: the metric is undefined for this run (e.g. constant output)
            continue
        cell.seeds.append(record.get("seed"))
        for metric, value in zip(cell.metrics, values, strict=True):
            cell.values.setdefault(metric, []).append((100.0 if is_fraction(metric) else 1.0) * float(value))
        if "adapter_params" in record:
            cell.adapter_params.add(int(record["adapter_params"]))
        cell.trainable_params.add(int(record.get("trainable_params", 0)))
        cell.train_seconds.append(float(record.get("train_seconds", 0.0)))
    return cells


def _ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """``names`` in the papers' ``order`` (unknown names after, alphabetically); rows of several models grouped by
    model."""
    def key(name: str) -> tuple[str, int, str]:
        model, _, plain = name.rpartition(MODEL_SEPARATOR)
        return model, order.index(plain) if plain in order else len(order), plain

    return sorted(set(names), key=key)


def _count_range(counts: set[int]) -> str:
    if not counts:
        return "–"
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _mean_std(cell: Cell, metric: str) -> str:
    std = cell.std(metric)
    return f"{cell.mean(metric):.1f}" + ("" if std is None else f" ± {std:.1f}")


def cell_text(cell: Cell | None, expected: int) -> str:
    if cell is None:
        return "–"
    if cell.n == 0:
        return f"{FAILED} {cell.failed} failed" if cell.failed else f"{FAILED} NaN ({cell.nan})"
    parts = " / ".join(_mean_std(cell, m) for m in cell.metrics)
    notes = []
    if cell.n < expected:
        notes.append(f"n={cell.n}/{expected}")
    if cell.failed:
        notes.append(f"{cell.failed} failed")
    if cell.nan:
        notes.append(f"{cell.nan} NaN")
    return parts + (f" {INCOMPLETE}({', '.join(notes)})" if notes else "")


def expected_seed_count(cells: dict[tuple[str, str], Cell], expected: int | None) -> int:
    return expected or max((c.n + c.failed + c.nan for c in cells.values()), default=0)


def average(cells: dict[tuple[str, str], Cell], method: str, tasks: Sequence[str],
            expected: int) -> tuple[float | None, bool]:
    """(mean over tasks of the cells' scores, whether every cell is complete); None if a task has no value."""
    scores, complete = [], True
    for task in tasks:
        cell = cells.get((method, task))
        score = cell.score() if cell else None
        if score is None:
            return None, False
        scores.append(score)
        complete = complete and cell.complete(expected)
    return statistics.fmean(scores), complete


def paper_table(results: Sequence[dict[str, Any]], expected_seeds: int | None = None) -> str:
    """Markdown: | method | params (adapter) | params (with head) | <task metric>… | avg | train s/run |."""
    cells = build_cells(results)
    expected = expected_seed_count(cells, expected_seeds)
    methods = _ordered([m for m, _ in cells], METHOD_ORDER)
    tasks = _ordered([t for _, t in cells], TASK_ORDER)
    headers = []
    for task in tasks:
        metrics = next(c.metrics for (m, t), c in cells.items() if t == task)
        headers.append(f"{task} ({'/'.join(METRIC_SHORT.get(x, x) for x in metrics)})")
    lines = ["| method | trainable params (adapter) | trainable params (with head) | " + " | ".join(headers)
             + " | avg | train s/run |",
             "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    notes = False
    for method in methods:
        row = [cells[(method, t)] for t in tasks if (method, t) in cells]
        adapter = set().union(*(c.adapter_params for c in row))
        trainable = set().union(*(c.trainable_params for c in row))
        texts = [cell_text(cells.get((method, t)), expected) for t in tasks]
        notes = notes or any(INCOMPLETE in text or FAILED in text or text == "–" for text in texts)
        mean, complete = average(cells, method, tasks, expected)
        avg = "–" if mean is None else f"{mean:.1f}" + ("" if complete else f" {INCOMPLETE}")
        seconds = [s for c in row for s in c.train_seconds]
        time_text = f"{statistics.fmean(seconds):.0f}" if seconds else "–"
        lines.append(f"| {method} | {_count_range(adapter)} | {_count_range(trainable)} | " + " | ".join(texts)
                     + f" | {avg} | {time_text} |")
    lines += ["", "Mean ± std over seeds (fractions ×100, other metrics as recorded; a single seed shows its value "
              "alone); "
              f"{expected} seed(s) expected per cell. avg: mean over tasks (MRPC/QQP: of accuracy and F1)."]
    if notes:
        lines.append(f"{INCOMPLETE}: fewer seeds than expected, failed runs or undefined (NaN) metrics — the mean is "
                     f"over the finished seeds only, and an average over such a cell carries {INCOMPLETE}. "
                     f"{FAILED}: no finished run. –: not run.")
    return "\n".join(lines)


def csv_table(cells: dict[tuple[str, str], Cell], expected_seeds: int | None = None) -> str:
    """One row per (method, task, metric): mean, std, seeds finished / expected, failures, sizes, time."""
    expected = expected_seed_count(cells, expected_seeds)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "task", "metric", "mean", "std", "n_seeds", "n_expected", "n_failed", "n_nan",
                     "values", "adapter_params", "trainable_params", "train_seconds_mean", "complete"])
    for method in _ordered([m for m, _ in cells], METHOD_ORDER):
        for task in _ordered([t for m, t in cells if m == method], TASK_ORDER):
            cell = cells[(method, task)]
            for metric in cell.metrics:
                mean = cell.mean(metric)
                std = cell.std(metric)
                writer.writerow([method, task, metric, "" if mean is None else f"{mean:.4f}",
                                 "" if std is None else f"{std:.4f}", cell.n, expected,
                                 cell.failed, cell.nan, ";".join(f"{v:.4f}" for v in cell.values.get(metric, [])),
                                 _count_range(cell.adapter_params).replace(",", ""),
                                 _count_range(cell.trainable_params).replace(",", ""),
                                 f"{statistics.fmean(cell.train_seconds):.1f}" if cell.train_seconds else "",
                                 cell.complete(expected)])
    return buffer.getvalue()


def plot(cells: dict[tuple[str, str], Cell], path: str | Path, expected_seeds: int | None = None) -> str:
    """PNG: one panel per task, the metric (mean ± std) against adapter parameters on a log axis."""
    import matplotlib

    expected = expected_seed_count(cells, expected_seeds)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _ordered([t for _, t in cells], TASK_ORDER)
    methods = _ordered([m for m, _ in cells], METHOD_ORDER)
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for method in methods:
            cell = cells.get((method, task))
            score = cell.score() if cell else None
            if score is None or not cell.adapter_params:
                continue
            x = min(cell.adapter_params)
            spread = cell.spread()
            axis.errorbar([x], [score], yerr=None if spread is None else [spread],  # one seed: no error bar
                          fmt="o", color=colours[method], capsize=3,
                          label=method + ("" if cell.complete(expected) else f" {INCOMPLETE}"))
            axis.annotate(method, (x, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xscale("log")
        metrics = next(c.metrics for (m, t), c in cells.items() if t == task)
        axis.set_xlabel("trainable parameters, adapter alone (log scale)")
        axis.set_ylabel(" / ".join(METRIC_SHORT.get(m, m) for m in metrics)
                        + (" (×100)" if all(is_fraction(m) for m in metrics) else ""))
        axis.set_title(task)
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="center right", fontsize=8)
        figure.subplots_adjust(right=0.82)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


# ----------------------------------------------------------------------------------- one line per run
def _format_number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """| run | task | method | trainable params | <each metric> | train time (s) |"""
    metric_names: list[str] = []
    for record in results:
        for name in record.get("eval", {}):
            if name not in metric_names:
                metric_names.append(name)
    header = ["run", "task", "method", "trainable params", *metric_names, "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for record in results:
        cells = [record.get("run", ""), record.get("task", ""), record.get("method", ""),
                 f"{int(record.get('trainable_params', 0)):,}",
                 *(_format_number(record.get("eval", {}).get(name)) for name in metric_names),
                 f"{float(record.get('train_seconds', 0.0)):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
