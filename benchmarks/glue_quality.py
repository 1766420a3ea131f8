"""GLUE quality benchmark: all-MiniLM-L6-v2 on SST-2 and CoLA, every method and baseline, several seeds.

    python benchmarks/glue_quality.py                                  # the default CPU budget (see --help)
    python benchmarks/glue_quality.py --max-train-samples 0 --epochs 3  # whole training sets, the issue's budget
    python benchmarks/glue_quality.py --task-budget "cola=--max-train-samples 0 --epochs 1"  # one task's own budget
    python benchmarks/glue_quality.py --render-only --output runs/x     # rewrite RESULTS.md from finished runs
    python benchmarks/glue_quality.py --tasks sst2 --max-train-samples 0 --epochs 3 \
        --methods lora,mtlora-shim,lora+rslora,mtlora-shim+loraplus16,mtlora-shim+pissa,mtlora-shim+lora-xs  # issue 29

The grid runs through `structlora sweep` (seed by seed, finished runs kept, so an interrupted benchmark
resumes; each task in OUTPUT/<task>, with its own budget), the table is `structlora report`'s paper table, the plot
its metric-vs-parameters PNG; each run's process-CPU seconds per training step and per evaluated example give the
projected CPU cost of the issue's budget (whole training sets, 3 epochs, 3 seeds, every method). Writes the
section between ``<!-- glue_quality -->`` and ``<!-- /glue_quality -->`` of benchmarks/RESULTS.md (other
sections are left alone) and says which of the papers' orderings hold, are within noise, or are reversed.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))  # runnable from a checkout without installing

from structlora.demo import HEAD_MODULES, default_data_dir, minilm_path  # noqa: E402
from structlora.recipes import report, sweep  # noqa: E402

START, END = "<!-- glue_quality -->", "<!-- /glue_quality -->"
METHODS = ("lora", "mtlora-shim", "loretta-rep", "loretta-adp", "adapter-houlsby", "adapter-pfeiffer", "bitfit",
           "ia3", "prompt", "ptuning", "prefix", "full")
# One learning rate (--lr) for the adapter methods; these take their usual, larger or smaller, steps.
METHOD_LR = {"full": "5e-5", "ia3": "3e-3", "prompt": "3e-2", "ptuning": "1e-2", "prefix": "1e-2"}
# Issue 29's LoRA-family rows (not in the default grid; `--methods` names them): rsLoRA at r 32 as PEFT's comparison.
OPTION_METHODS = ("lora+rslora", "mtlora-shim+loraplus16", "mtlora-shim+pissa", "mtlora-shim+lora-xs")
METHOD_FLAGS = {"lora+rslora": ["--r", "32"]}
CHANCE = {"sst2": 55.0, "cola": 5.0}  # at or below (×100): the model has not learned the task
ISSUE_EPOCHS = 3  # the issue's budget: whole training sets, 3 epochs, 3 seeds, every method
# The papers' orderings, (better, worse, source): MTLoRA's table (vs LoRA and the LoRA paper's baselines) and
# LoRETTA's (vs LoRA, adapters, prompt/P-tuning, IA3, BitFit).
ORDERINGS = (
    ("mtlora-shim", "lora", "MTLoRA"), ("lora", "bitfit", "MTLoRA/LoRA"), ("lora", "adapter-houlsby", "MTLoRA/LoRA"),
    ("lora", "adapter-pfeiffer", "MTLoRA/LoRA"), ("full", "lora", "MTLoRA (FT row)"),
    ("loretta-rep", "prompt", "LoRETTA"), ("loretta-rep", "ptuning", "LoRETTA"), ("loretta-rep", "ia3", "LoRETTA"),
    ("loretta-rep", "bitfit", "LoRETTA"), ("loretta-adp", "adapter-houlsby", "LoRETTA"),
    ("loretta-rep", "lora", "LoRETTA (≈ LoRA)"), ("loretta-adp", "lora", "LoRETTA (≈ LoRA)"),
    # Issue 29: each option against the method it modifies (LoRA-XS, r² parameters, against LoRA: the paper's claim).
    ("lora+rslora", "lora", "rsLoRA"), ("mtlora-shim+loraplus16", "mtlora-shim", "LoRA+"),
    ("mtlora-shim+pissa", "mtlora-shim", "PiSSA"), ("mtlora-shim+lora-xs", "lora", "LoRA-XS (≈ LoRA)"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cola")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"default: the papers' grid; issue 29's options: {','.join(OPTION_METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train-samples", type=int, default=640, help="0: the whole training set")
    parser.add_argument("--max-eval-samples", type=int, default=400, help="0: the whole dev set")
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--max-length", default="64")
    parser.add_argument("--lr", default="1e-3", help="learning rate of the adapter methods (see METHOD_LR)")
    parser.add_argument("--task-budget", action="append", default=[], metavar="TASK=FLAGS",
                        help="one task's own budget flags, e.g. 'cola=--max-train-samples 0 --epochs 1' (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: share the machine fairly)")
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data-dir", default=None, help="default: $STRUCTLORA_DATA or ../shared/data")
    parser.add_argument("--output", default=str(REPO_ROOT / "runs" / "glue_quality"))
    parser.add_argument("--results-md", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--plot", default=str(REPO_ROOT / "benchmarks" / "glue_quality.png"))
    parser.add_argument("--render-only", action="store_true", help="train nothing: tabulate the finished runs")
    parser.add_argument("--note", default="", help="free text for the write-up (what did not run, and why)")
    parser.add_argument("--device-note", default="CPU (AMD EPYC, 2 cores shared with other jobs, 1 torch thread)",
                        help="where it ran, for the write-up")
    return parser.parse_args(argv)


def task_budgets(argv: Sequence[str], args: argparse.Namespace, tasks: Sequence[str]) -> dict[str, argparse.Namespace]:
    """Each task's flags: the command line, then that task's --task-budget flags (later flags win)."""
    overrides: dict[str, list[str]] = {}
    for entry in args.task_budget:
        task, sep, flags = entry.partition("=")
        if not sep or task not in tasks:
            raise SystemExit(f"error: --task-budget {entry!r}: expected TASK=FLAGS with TASK one of {', '.join(tasks)}")
        overrides.setdefault(task, []).extend(shlex.split(flags))
    return {task: parse_args([*argv, *overrides.get(task, [])]) for task in tasks}


def train_args(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model or str(minilm_path())]
    data_dir = args.data_dir or default_data_dir()
    if data_dir:
        flags += ["--data-dir", data_dir]
    if args.max_train_samples:
        flags += ["--max-train-samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        flags += ["--max-eval-samples", str(args.max_eval_samples)]
    return flags + ["--epochs", args.epochs, "--batch-size", args.batch_size, "--max-length", args.max_length,
                    "--lr", args.lr, "--warmup-ratio", "0.06", "--modules-to-save", HEAD_MODULES,
                    "--logging-steps", "10"]


def run_times(output: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(task, method) -> the sweep's per-run records (wall and process-CPU seconds, status)."""
    times: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(output.rglob(sweep.RUN_FILE)):
        record = json.loads(path.read_text())
        times.setdefault((record.get("task", "?"), record.get("method", "?")), []).append(record)
    return times


def compare(cells: dict[tuple[str, str], report.Cell], task: str, better: str,
            worse: str) -> tuple[str, str] | None:
    """(verdict, detail) for "better ≥ worse" on task: holds / within noise / reversed; None if a side is missing."""
    a, b = cells.get((better, task)), cells.get((worse, task))
    if a is None or b is None or a.score() is None or b.score() is None:
        return None
    gap = a.score() - b.score()
    detail = f"{a.score():.1f} vs {b.score():.1f}, gap {gap:+.1f}, n={a.n}/{b.n}"
    own = [a.spread(), b.spread()]  # None for a side with one seed
    measured = [s for s in own if s is not None]
    if not measured:
        return ("holds" if gap >= 0 else "reversed") + " (one seed each: no noise estimate)", detail
    # A side with one seed borrows the seed-to-seed spread measured on the other side.
    spreads = [max(measured) if s is None else s for s in own]
    noise = 2 * math.sqrt(spreads[0] ** 2 / a.n + spreads[1] ** 2 / b.n)  # two standard errors of the gap
    verdict = "within noise" if abs(gap) <= noise else ("holds" if gap > 0 else "reversed")
    borrowed = ", one side's spread borrowed" if None in own else ""
    return verdict, f"{detail}, 2·SE {noise:.1f}{borrowed}"


def verdicts(cells: dict[tuple[str, str], report.Cell], tasks: Sequence[str]) -> list[str]:
    lines = []
    for task in tasks:
        lora = cells.get(("lora", task))
        if lora is not None and lora.score() is not None and lora.score() <= CHANCE.get(task, -1):
            lines.append(f"- {task}: **inconclusive** — LoRA stays at chance level in this budget "
                         f"({lora.score():.1f}); the orderings below say nothing about the papers' claims here.")
        for better, worse, source in ORDERINGS:
            result = compare(cells, task, better, worse)
            if result:
                lines.append(f"- {task}: {better} ≥ {worse} ({source}): **{result[0]}** ({result[1]})")
    return lines


def budget_text(budget: argparse.Namespace) -> str:
    train = "all" if not budget.max_train_samples else budget.max_train_samples
    dev = "whole dev set" if not budget.max_eval_samples else f"first {budget.max_eval_samples} dev examples"
    return (f"{train} training examples, {budget.epochs} epoch(s), batch {budget.batch_size}, max length "
            f"{budget.max_length}, {dev}, adapter-method learning rate {budget.lr}")


def run_costs(output: Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """(task, method) -> per finished run: process-CPU seconds per optimiser step and per evaluated example."""
    costs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for path in sorted(output.rglob("results.json")):
        record = json.loads(path.read_text())
        flags, history = record.get("flags", {}), record.get("history", [])
        steps = max((h.get("step", 0) for h in history), default=0)
        evaluated = sum(record.get("eval_examples", {}).values()) * max(len(history), 1)
        if not steps or "train_cpu_seconds" not in record or not evaluated:
            continue
        costs.setdefault((record["task"], record["method"]), []).append({
            "step": record["train_cpu_seconds"] / steps, "example": record["eval_cpu_seconds"] / evaluated,
            "batch": float(flags.get("batch_size", 32))})
    return costs


def issue_epochs(task: str, budget: argparse.Namespace) -> float:
    """The issue's epochs for ``task``: 3 for SST-2; for CoLA "enough for LoRA to leave chance", which is the
    budget the CoLA grid runs at."""
    return float(budget.epochs) if task == "cola" else float(ISSUE_EPOCHS)


def issue_budget_projection(output: Path, budgets: dict[str, argparse.Namespace], data_dir: str | None,
                            sweep_cpu: dict[tuple[str, str], float]) -> list[str]:
    """The issue's budget (whole training set × the issue's epochs, one evaluation of the whole dev set per epoch,
    3 seeds, every method that ran) in CPU time, from what each finished run measured here."""
    from structlora.tasks.glue import load_glue
    from structlora.tasks.glue.data import get_task

    costs = run_costs(output)
    lines = ["| task | method | CPU s / step | CPU ms / dev example | epochs | steps per run | projected CPU min "
             "per run | × 3 seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    total = 0.0
    for task, budget in budgets.items():
        sizes = load_glue(task, data_dir)
        train_size, dev_size = len(sizes["train"]), len(sizes[get_task(task).eval_splits[0]])
        epochs = issue_epochs(task, budget)
        for method in [m for m in report.METHOD_ORDER if (task, m) in costs]:
            runs = costs[(task, method)]
            step = statistics.fmean(r["step"] for r in runs)
            example = statistics.fmean(r["example"] for r in runs)
            steps = math.ceil(math.ceil(train_size / runs[0]["batch"]) * epochs)
            overhead = sweep_cpu.get((task, method), 0.0)  # loading, tokenising, saving: CPU outside train/eval
            minutes = (steps * step + math.ceil(epochs) * dev_size * example + overhead) / 60
            total += 3 * minutes
            lines.append(f"| {task} | {method} | {step:.2f} | {1000 * example:.1f} | {epochs:g} | {steps} | "
                         f"{minutes:.1f} | {3 * minutes:.0f} |")
    lines.append(f"| **all** | | | | | | | **{total:.0f} CPU min = {total / 60:.1f} CPU h** |")
    return lines


def render(budgets: dict[str, argparse.Namespace], output: Path, seeds: Sequence[int], plot: Path,
           device_note: str, note: str) -> str:
    tasks = list(budgets)
    runs = report.load_runs([output])
    cells = report.build_cells(runs)
    table = report.paper_table(runs, expected_seeds=len(seeds))
    report.plot(cells, plot, len(seeds))
    times = run_times(output)
    lrs = ", ".join(f"{m} {lr}" for m, lr in METHOD_LR.items())
    ran = {method for method, _ in cells}
    lrs += "".join(f"; {m} with {' '.join(flags)}" for m, flags in METHOD_FLAGS.items() if m in ran)
    time_rows = ["| task | method | runs finished / failed | wall s per run (mean) | process CPU s per run (mean) |",
                 "|---|---|---:|---:|---:|"]
    overheads: dict[tuple[str, str], float] = {}
    for (task, method), records in sorted(times.items(), key=lambda kv: (kv[0][0], report.METHOD_ORDER.index(kv[0][1])
                                                                        if kv[0][1] in report.METHOD_ORDER else 99)):
        done = [r for r in records if r.get("status") == "finished"]
        wall = f"{statistics.fmean(r['wall_seconds'] for r in done):.0f}" if done else "–"
        cpu = f"{statistics.fmean(r['process_cpu_seconds'] for r in done):.0f}" if done else "–"
        time_rows.append(f"| {task} | {method} | {len(done)} / {len(records) - len(done)} | {wall} | {cpu} |")
        overheads[(task, method)] = _overhead(output, task, method)
    total_wall = sum(r["wall_seconds"] for records in times.values() for r in records)
    total_cpu = sum(r["process_cpu_seconds"] for records in times.values() for r in records)
    data_dir = next(iter(budgets.values())).data_dir or default_data_dir()
    lines = [START, "## GLUE quality: every method and baseline (all-MiniLM-L6-v2, `benchmarks/glue_quality.py`)", "",
             "Budgets: " + "; ".join(f"**{task}**: {budget_text(b)}" for task, b in budgets.items()) +
             f"; seeds {','.join(map(str, seeds))}. Other methods' learning rates: {lrs} (linear schedule, 6% "
             f"warm-up); LoRA/MTLoRA r 8, LoRETTA tensor rank 5, dense adapters bottleneck 64, prompt/P-tuning 20 "
             f"virtual tokens, default targets; every method also trains the head (BERT pooler + classifier: "
             f"MiniLM's pooler output is near-constant). Ran on {device_note}: {total_wall / 60:.0f} min of wall time "
             f"and {total_cpu / 60:.0f} min of process CPU time for the runs below. Grid run by `structlora sweep`, "
             f"table by `structlora report`.", "", *_budget_warning(budgets, cells), *([note, ""] if note else []),
             table, "", f"![metric vs trainable parameters]({plot.name})", "",
             "Time per run (wall: what the shared machine gave; process CPU: this process's own CPU time, "
             "less sensitive to the other jobs):", "", *time_rows, "",
             "**The issue's budget, projected** from the CPU time each run above measured per training step and per "
             "evaluated dev example (plus its loading/saving overhead), for the whole training set × the issue's "
             "epochs (SST-2: 3; CoLA: the CoLA budget above), one whole-dev-set evaluation per epoch, 3 seeds, the "
             "methods that ran (not run: see above):", "",
             *issue_budget_projection(output, budgets, data_dir, overheads), "",
             "Do the papers' orderings hold here? (a gap within two standard errors of the seed means is "
             "\"within noise\")", "", *verdicts(cells, tasks), END]
    return "\n".join(lines)


def _overhead(output: Path, task: str, method: str) -> float:
    """Mean process-CPU seconds of a finished run spent outside its training loop and evaluations."""
    values = []
    for path in (output / task).rglob(sweep.RUN_FILE) if (output / task).is_dir() else ():
        record = json.loads(path.read_text())
        results = path.parent / "results.json"
        if record.get("method") != method or record.get("status") != "finished" or not results.is_file():
            continue
        measured = json.loads(results.read_text())
        values.append(record["process_cpu_seconds"] - measured.get("train_cpu_seconds", 0.0)
                      - measured.get("eval_cpu_seconds", 0.0))
    return statistics.fmean(values) if values else 0.0


def _budget_warning(budgets: dict[str, argparse.Namespace], cells: dict[tuple[str, str], report.Cell]) -> list[str]:
    """Say plainly, task by task, where this is not the issue's budget (whole SST-2 × 3 epochs; CoLA until LoRA's
    MCC > 0.3; 3 seeds, every method)."""
    lines = []
    for task, budget in budgets.items():
        whole = not budget.max_train_samples and not budget.max_eval_samples
        if task == "cola":
            lora = cells.get(("lora", "cola"))
            left_chance = lora is not None and lora.score() is not None and lora.score() > 30.0
            if not (whole and left_chance):
                lines.append(f"- **cola is not at the issue's budget**: LoRA's MCC {lora.score():.1f} ≤ 30 here" if
                             lora is not None and lora.score() is not None else "- **cola did not run**")
        elif not (whole and budget.epochs == str(ISSUE_EPOCHS)):
            lines.append(f"- **{task} is not at the issue's budget** (whole training set, {ISSUE_EPOCHS} epochs): "
                         f"{budget_text(budget)}.")
    return [*lines, ""] if lines else []


def write_section(path: Path, section: str) -> None:
    """Replace our section between the markers (or append it); leave the rest of the file alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    budgets = task_budgets(argv, args, tasks)
    output = Path(args.output)
    if not args.render_only:
        import torch

        torch.set_num_threads(args.threads)
        method_args = {m: ["--lr", lr] for m, lr in METHOD_LR.items() if m in methods}
        for method, flags in METHOD_FLAGS.items():
            if method in methods:
                method_args.setdefault(method, []).extend(flags)
        for task, budget in budgets.items():  # one sweep folder per task: one budget per folder
            flags = train_args(budget)
            sweep._check_grid_flags(output / task, "glue", flags, method_args)
        for seed in seeds:  # seed-major across tasks too: an interrupted benchmark has every cell's first seeds
            for task, budget in budgets.items():
                sweep.sweep("glue", [task], methods, [seed], output / task, train_args(budget), method_args)
    section = render(budgets, output, seeds, Path(args.plot), args.device_note, args.note)
    write_section(Path(args.results_md), section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
