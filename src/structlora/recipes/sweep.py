"""`structlora sweep`: run a grid of tasks × methods × seeds, resumably, and build the paper table.

    structlora sweep glue --tasks sst2,cola --methods lora,mtlora-shim,adapter-houlsby,bitfit,ia3 \\
        --seeds 0,1,2 --output runs/table --method-args "ia3=--lr 3e-3" \
        --train-args "--model roberta-base --epochs 3"

``--train-args`` go to every ``structlora train <recipe>`` run. Runs land in
OUTPUT/<task>/<method>/seed<seed>/. A run whose results.json exists is finished and never run again; an
interrupted run restarts from its last checkpoint (``--resume``); a failed run leaves failed.json (the
error) and is retried by the next sweep. So the same command, re-issued, continues an interrupted grid,
and a grid can grow (more seeds, methods or tasks) into the same folder. Training flags are recorded in
OUTPUT/sweep.json: re-using the folder with other flags is refused, since one table must have one budget.

Method names: any ``--method`` of the recipe, plus ``mtlora-<structure>`` and ``adapter-<placement>``, each with
LoRA-family options after ``+`` (``lora+rslora``, ``mtlora-shim+pissa``, ``mtlora-shim+lora-xs+loraplus16``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .methods import (ADAPTER_PLACEMENTS, METHODS, MTLORA_STRUCTURES, add_method_arguments, check_method_flags,
                      default_label)

RECIPES = ("glue", "nlg", "llm")
SWEEP_FILE = "sweep.json"
FAILED_FILE = "failed.json"
RUN_FILE = "sweep_run.json"  # argv, wall and process-CPU seconds of the run
_PER_RUN_FLAGS = ("--task", "--method", "--seed", "--output", "--structure", "--adapter-placement", "--resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=RECIPES, help="which `structlora train` recipe runs the grid")
    parser.add_argument("--tasks", required=True, type=_csv, help="comma-separated tasks, e.g. sst2,cola")
    parser.add_argument("--methods", required=True, type=_csv,
                        help="comma-separated methods, e.g. lora,mtlora-shim,loretta-rep,adapter-pfeiffer,bitfit; options "
                             "after +: lora+rslora, mtlora-shim+pissa, mtlora-shim+lora-xs, lora+loraplus16")
    parser.add_argument("--seeds", default=[0, 1, 2], type=lambda v: [int(s) for s in _csv(v)],
                        help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--output", required=True, help="the grid's folder (one table)")
    parser.add_argument("--method-args", action="append", default=[], metavar="METHOD=ARGS",
                        help="extra flags for one method, e.g. 'prompt=--lr 3e-2' (repeatable)")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    parser.add_argument("--train-args", default="", type=shlex.split, metavar="FLAGS",
                        help="flags for every run (model, budget, data), e.g. '--model X --epochs 1'")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def method_flags(label: str) -> list[str]:
    """``mtlora-icfm`` -> ``--method mtlora --structure icfm``; ``adapter-pfeiffer`` -> placement flag; options after
    ``+`` as `methods.method_label` writes them: ``+rslora``, ``+pissa``, ``+lora-xs``, ``+loraplus<ratio>``."""
    label, *options = label.split("+")
    return [*_base_method_flags(label), *(flag for option in options for flag in _option_flags(option))]


def _option_flags(option: str) -> list[str]:
    if option == "rslora":
        return ["--use-rslora"]
    if option in ("pissa", "lora-xs"):
        return ["--init", option]
    ratio = option.removeprefix("loraplus")
    if ratio != option and re.fullmatch(r"\d+(\.\d+)?(e-?\d+)?", ratio):
        return ["--loraplus-lr-ratio", ratio]
    raise SystemExit(f"error: unknown method option '+{option}' in --methods; valid: +rslora, +pissa, +lora-xs, "
                     f"+loraplus<ratio> (e.g. lora+rslora, mtlora-shim+loraplus16)")


def _base_method_flags(label: str) -> list[str]:
    for prefix, flag, choices in (("mtlora-", "--structure", MTLORA_STRUCTURES),
                                  ("adapter-", "--adapter-placement", ADAPTER_PLACEMENTS)):
        if label.startswith(prefix) and label[len(prefix):] in choices:
            return ["--method", prefix[:-1], flag, label[len(prefix):]]
    if label not in METHODS:
        valid = [*METHODS, *(f"mtlora-{s}" for s in MTLORA_STRUCTURES),
                 *(f"adapter-{p}" for p in ADAPTER_PLACEMENTS)]
        raise SystemExit(f"error: unknown method {label!r} in --methods; valid: {', '.join(valid)}")
    return ["--method", label]


def canonical_label(label: str) -> str:
    """The method name the recipe writes into results.json (mtlora -> mtlora-shim, adapter -> adapter-houlsby)."""
    base, *options = label.split("+")
    order = {"rslora": 0, "pissa": 1, "lora-xs": 1}  # method_label's order; +loraplus<ratio> last
    options = sorted(options, key=lambda option: order.get(option, 2))
    return "+".join([default_label(base) if base in METHODS else base, *options])


def run_folder(output: str | Path, task: str, label: str, seed: int) -> Path:
    return Path(output) / task / canonical_label(label) / f"seed{seed}"


def is_finished(folder: Path) -> bool:
    path = folder / "results.json"
    if not path.is_file():
        return False
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a results.json cut off mid-write is not a finished run


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("checkpoint-*"))


def _parse_method_args(entries: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for entry in entries:
        label, sep, flags = entry.partition("=")
        if not sep or canonical_label(label.strip()) not in {canonical_label(m) for m in methods}:
            raise SystemExit(f"error: --method-args {entry!r}: expected METHOD=FLAGS with METHOD one of "
                             f"--methods ({', '.join(methods)})")
        parsed.setdefault(canonical_label(label.strip()), []).extend(shlex.split(flags))
    return parsed


def _check_grid_flags(output: Path, recipe: str, train_args: list[str], method_args: dict[str, list[str]]) -> None:
    """One folder, one budget: refuse to add runs made with other training flags."""
    path = output / SWEEP_FILE
    record = {"recipe": recipe, "train_args": train_args, "method_args": method_args}
    if path.is_file():
        previous = json.loads(path.read_text())
        old_methods = previous.get("method_args", {})
        same_shared = previous.get("recipe") == recipe and previous.get("train_args") == train_args
        clashing = {m for m in set(old_methods) & set(method_args) if old_methods[m] != method_args[m]}
        if not same_shared or clashing:
            raise SystemExit(
                f"error: {output} holds a sweep with other training flags ({path}: "
                f"{' '.join(previous.get('train_args', []))!r}"
                f"{', method args of ' + ', '.join(sorted(clashing)) if clashing else ''}); one table needs one "
                f"budget: use another --output, or the same flags")
        record["method_args"] = {**old_methods, **method_args}
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _check_method_flags(methods: Sequence[str], train_args: list[str], method_args: dict[str, list[str]]) -> None:
    """Before anything runs: every adapter flag that a method's runs get, from --train-args or its --method-args,
    is one that method reads (each run would refuse it anyway, one failed run per seed). Only flags on the
    command line are seen here; a --config file's are checked by each run."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_method_arguments(parser)
    for label in methods:
        run_flags = [*method_flags(label), *train_args, *method_args.get(canonical_label(label), [])]
        try:
            check_method_flags(parser.parse_known_args(run_flags)[0])
        except SystemExit as refusal:
            reason = str(refusal.code).removeprefix("error: ")
            raise SystemExit(f"error: --methods {label}: {reason}. In a sweep, give a flag that only some methods "
                             f"read with --method-args 'METHOD=FLAGS'") from None


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    given = [flag for flag in train_args if flag.split("=")[0] in _PER_RUN_FLAGS]
    if given:
        raise SystemExit(f"error: {', '.join(given)} in --train-args: the sweep sets these per run (use --tasks, "
                         f"--methods, --seeds, --output)")
    for label in args.methods:
        method_flags(label)  # every name valid before anything runs
    method_args = _parse_method_args(args.method_args, args.methods)
    _check_method_flags(args.methods, train_args, method_args)
    output = Path(args.output)
    _check_grid_flags(output, args.recipe, train_args, method_args)
    summary = sweep(args.recipe, args.tasks, args.methods, args.seeds, output, train_args, method_args,
                    stop_on_error=args.stop_on_error)
    print(f"[structlora sweep] {summary['ran']} run(s) trained, {summary['skipped']} already finished, "
          f"{summary['failed']} failed -> {output}")
    from . import report

    runs = report.load_runs([output])
    if runs:
        print(report.paper_table(runs, expected_seeds=len(args.seeds)))
    return 1 if summary["failed"] else 0


def sweep(recipe: str, tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], output: Path,
          train_args: Sequence[str], method_args: dict[str, list[str]] | None = None,
          stop_on_error: bool = False) -> dict[str, int]:
    """Run every (task, method, seed) not finished yet, seed by seed; return counts
    ``{"ran", "skipped", "failed"}``."""
    from .commands import main as cli_main

    counts = {"ran": 0, "skipped": 0, "failed": 0}
    # Seed-major: an unfinished grid still has every method and task at its first seeds.
    for seed in seeds:
        for task in tasks:
            for label in methods:
                folder = run_folder(output, task, label, seed)
                if is_finished(folder):
                    counts["skipped"] += 1
                    continue
                argv = ["train", recipe, "--task", task, *method_flags(label), "--seed", str(seed),
                        "--output", str(folder), *train_args, *(method_args or {}).get(canonical_label(label), [])]
                if _has_checkpoint(folder):
                    argv.append("--resume")
                print(f"[structlora sweep] {task} {canonical_label(label)} seed {seed}", flush=True)
                identity = {"task": task, "method": canonical_label(label), "seed": seed}
                error = _run_one(cli_main, argv, folder, identity)
                if error is None:
                    counts["ran"] += 1
                    continue
                counts["failed"] += 1
                if stop_on_error:
                    return counts
    return counts


def _run_one(cli_main: Any, argv: list[str], folder: Path, identity: dict[str, Any]) -> str | None:
    """Run one training in this process; None on success, else the error (also written to failed.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    error: str | None = None
    try:
        code = cli_main(argv)
        if code:
            error = f"exit status {code}"
    except SystemExit as exit_:  # the recipes report user errors as SystemExit("error: ...")
        if exit_.code not in (0, None):
            error = str(exit_.code)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the grid
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        traceback.print_exc()
    if error is None and not is_finished(folder):
        error = "the run ended without writing results.json"
    record: dict[str, Any] = {**identity, "argv": argv, "wall_seconds": round(time.perf_counter() - wall, 3),
                              "process_cpu_seconds": round(time.process_time() - cpu, 3),
                              "status": "finished" if error is None else "failed"}
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    failed = folder / FAILED_FILE
    if error is None:
        failed.unlink(missing_ok=True)
        return None
    print(f"[structlora sweep] failed: {error}", flush=True)
    failed.write_text(json.dumps({**record, "error": error}, indent=2) + "\n")
    return error
