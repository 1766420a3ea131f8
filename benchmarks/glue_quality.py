"""GLUE quality benchmark: all-MiniLM-L6-v2 on SST-2 and CoLA, each method, several seeds, a fixed budget.

    python benchmarks/glue_quality.py                       # the default CPU budget (see --help)
    python benchmarks/glue_quality.py --max-train-samples 0 --epochs 3 --seeds 0,1,2   # whole training sets

Writes the table of mean ± std (dev metric, trainable parameters, time) into benchmarks/RESULTS.md between
``<!-- glue_quality -->`` and ``<!-- /glue_quality -->`` (other sections of the file are left alone), and
states whether the papers' claims hold here: MTLoRA >= LoRA; LoRETTA close to LoRA with >= 10x fewer
trainable parameters. Finished runs (their results.json) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))  # runnable from a checkout without installing

from structlora.cli import main as structlora_main  # noqa: E402
from structlora.demo import DEFAULT_LR, HEAD_MODULES, default_data_dir, minilm_path  # noqa: E402

START, END = "<!-- glue_quality -->", "<!-- /glue_quality -->"
MAIN_METRIC = {"sst2": "accuracy", "cola": "matthews_correlation"}
CLOSE_TO_LORA = 0.02
CHANCE = {"sst2": 0.55, "cola": 0.05}  # at or below: the model has not learned the task yet  # "close": within 2 points of the dev metric


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cola")
    parser.add_argument("--methods", default="lora,mtlora,loretta-rep,loretta-adp")
    parser.add_argument("--structure", default="shim", help="MTLoRA structure")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train-samples", type=int, default=1280, help="0: the whole training set")
    parser.add_argument("--max-eval-samples", type=int, default=0, help="0: the whole dev set")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every method "
                        "(0: the demo's per-method defaults)")
    parser.add_argument("--eval-every", type=int, default=0, help="0: once, at the end of training")
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data-dir", default=None, help="default: $STRUCTLORA_DATA or ../shared/data")
    parser.add_argument("--output", default=str(REPO_ROOT / "runs" / "glue_quality"))
    parser.add_argument("--results-md", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--device-note", default="CPU (2 cores shared with other jobs)",
                        help="where it ran, for the write-up")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, task: str, method: str, seed: int, model: str, data_dir: str | None) -> dict:
    label = f"mtlora-{args.structure}" if method == "mtlora" else method
    output = Path(args.output) / task / label / f"seed{seed}"
    if (output / "results.json").is_file():
        return json.loads((output / "results.json").read_text())
    argv = ["train", "glue", "--task", task, "--model", model, "--method", method, "--structure", args.structure,
            "--output", str(output), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr or DEFAULT_LR[method]), "--warmup-ratio", "0.06",
            "--seed", str(seed), "--modules-to-save", HEAD_MODULES]
    steps = -(-(args.max_train_samples or 10**9) // args.batch_size) if args.max_train_samples else 0
    if args.eval_every or steps:
        argv += ["--eval-every", str(args.eval_every or int(steps * args.epochs))]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if args.max_train_samples:
        argv += ["--max-train-samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        argv += ["--max-eval-samples", str(args.max_eval_samples)]
    print(f"[glue_quality] {task} {label} seed {seed}", flush=True)
    structlora_main(argv)
    return json.loads((output / "results.json").read_text())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict[str, Any]]:
    summary = {}
    for (task, method), results in runs.items():
        values = [r["eval"][MAIN_METRIC[task]] or 0.0 for r in results]  # NaN (constant output) -> 0
        mean, std = mean_std(values)
        summary[(task, method)] = {"mean": mean, "std": std, "n": len(values),
                                   "params": results[0]["adapter_params"],
                                   "all_params": results[0]["trainable_params"],
                                   "seconds": statistics.fmean(r["train_seconds"] for r in results)}
    return summary


def verdicts(summary: dict[tuple[str, str], dict[str, Any]], tasks: Sequence[str], structure: str) -> list[str]:
    lines = []
    mtlora = f"mtlora-{structure}"
    for task in tasks:
        lora = summary.get((task, "lora"))
        if lora is None:
            continue
        metric = MAIN_METRIC[task]
        if lora["mean"] <= CHANCE[task]:
            lines.append(f"- {task}: **inconclusive** — LoRA itself stays at chance level within this budget "
                         f"({metric} {lora['mean']:.4f}), so the comparisons below say nothing about the claims.")
        if (task, mtlora) in summary:
            other = summary[(task, mtlora)]
            holds = other["mean"] >= lora["mean"]
            within_noise = abs(other["mean"] - lora["mean"]) <= max(other["std"], lora["std"])
            lines.append(f"- {task}: MTLoRA ({structure}) ≥ LoRA **{'holds' if holds else 'does not hold'}** "
                         f"({metric} {other['mean']:.4f} vs {lora['mean']:.4f}"
                         f"{'; the gap is within one std' if within_noise else ''}).")
        for method in ("loretta-rep", "loretta-adp"):
            if (task, method) not in summary:
                continue
            other = summary[(task, method)]
            fewer = lora["params"] / other["params"]
            fewer_all = lora["all_params"] / other["all_params"]
            close = lora["mean"] - other["mean"] <= CLOSE_TO_LORA
            lines.append(f"- {task}: {method} close to LoRA (within {CLOSE_TO_LORA:.2f}) "
                         f"**{'holds' if close else 'does not hold'}** ({other['mean']:.4f} vs {lora['mean']:.4f}); "
                         f"≥10× fewer trainable parameters **{'holds' if fewer_all >= 10 else 'does not hold'}** "
                         f"counting everything trained ({other['all_params']:,} vs {lora['all_params']:,}: "
                         f"{fewer_all:.1f}×; the full-rank pooler that every method trains dominates) and "
                         f"**{'holds' if fewer >= 10 else 'does not hold'}** for the adapters alone "
                         f"({other['params']:,} vs {lora['params']:,}: {fewer:.1f}×).")
    return lines


def render(args: argparse.Namespace, summary: dict, tasks: Sequence[str], methods: Sequence[str],
           wall_seconds: float) -> str:
    labels = [f"mtlora-{args.structure}" if m == "mtlora" else m for m in methods]
    budget = (f"{'all' if not args.max_train_samples else args.max_train_samples} training examples, "
              f"{args.epochs:g} epoch(s), batch {args.batch_size}, max length {args.max_length}, "
              f"{'whole dev set' if not args.max_eval_samples else f'first {args.max_eval_samples} dev examples'}, "
              f"seeds {args.seeds}")
    lines = [START, "## GLUE quality (all-MiniLM-L6-v2, `benchmarks/glue_quality.py`)", "",
             f"Budget: {budget}; learning rate "
             f"{f'{args.lr:g} for every method' if args.lr else ', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())} "
             f"(linear schedule, 6% warm-up); LoRA/MTLoRA r 8, LoRETTA tensor rank 5, default targets; every "
             f"method also trains the head (BERT pooler + classifier: MiniLM's pooler output is near-constant). "
             f"Ran on {args.device_note}; {wall_seconds / 60:.1f} min of training in all (evaluation and loading not counted). Dev metric: SST-2 accuracy, "
             "CoLA Matthews correlation (CoLA dev here is the out-of-domain dev set of ../shared/data).", "",
             "| task | method | dev metric (mean ± std) | adapter params (no head) | trainable params (all) "
             "| train time (s, mean) |",
             "|---|---|---:|---:|---:|---:|"]
    for task in tasks:
        for label in labels:
            s = summary.get((task, label))
            if s:
                lines.append(f"| {task} | {label} | {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']}) | "
                             f"{s['params']:,} | {s['all_params']:,} | {s['seconds']:.0f} |")
    lines += ["", "Do the papers' claims hold here?", "", *verdicts(summary, tasks, args.structure), "",
              "This is a small fixed budget on a 22M-parameter encoder, far from the papers' settings "
              "(RoBERTa/DeBERTa-base, tens of epochs); read the verdicts as a smoke test of the claims, not a "
              "replication.", END]
    return "\n".join(lines)


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
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    model = args.model or str(minilm_path())
    data_dir = args.data_dir or default_data_dir()
    runs: dict[tuple[str, str], list[dict]] = {}
    for task in tasks:
        for method in methods:
            for seed in seeds:
                result = run_one(args, task, method, seed, model, data_dir)
                runs.setdefault((task, result["method"]), []).append(result)
                # Rewrite the section after every run: an interrupted benchmark still leaves its numbers.
                train_total = sum(r["train_seconds"] for results in runs.values() for r in results)
                section = render(args, summarise(runs), tasks, methods, train_total)
                write_section(Path(args.results_md), section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
