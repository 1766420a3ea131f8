"""Generation speed with adapters, unmerged and merged, against the base model and PEFT's LoRA (issue 16).

One process builds every configuration on the same seeded random-weight Llama (the issue's shape: hidden 768,
4 layers), then times `generate()` round after round, every configuration once per round in alternating order,
greedy and beam search at batch 1 and batch 8. The clock is this process's CPU time on one thread, so time
slices lost to neighbours on a shared machine do not count. Each configuration's time is divided by the base
model's time in the same round; the reported ratio is the median of those per-round ratios (drift on a shared
machine moves both sides of a ratio together). Merged configurations are the same models after
`merge_adapter()` (LoRETTA_adp is not mergeable). Every run generates exactly `--new-tokens` tokens.

    python benchmarks/generate_speed.py --rounds 7 --json runs/generate_speed.json --markdown runs/generate_speed.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402  (adapter configs and target sets shared with the training benchmark)

BASE = "base"
LLAMA_768 = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=8192, max_position_embeddings=512)
# (method, targets): the base, PEFT's LoRA and ours on q,v and all linear layers, every MTLoRA structure and
# LoRETTA_rep on q,v, LoRETTA_adp on its default placement. "base control" is a second, separately built copy of
# the base model: its ratio to the base is the floor of what the run can resolve between two model objects.
CONTROL = "control"
VARIANTS: list[tuple[str, str]] = [
    (BASE, "-"), (BASE, CONTROL),
    ("peft_lora", "qv"), ("lora", "qv"), ("peft_lora", "all"), ("lora", "all"),
    *((f"mtlora_{s}", "qv") for s in step_time.MTLORA_STRUCTURES),
    ("loretta_rep", "qv"), ("loretta_adp", "default"),
]
MODES = {"greedy": dict(num_beams=1, do_sample=False), "beam": dict(num_beams=4, do_sample=False, early_stopping=False)}


@dataclass(frozen=True)
class Case:
    mode: str
    batch: int


def build(method: str, targets: str, settings: step_time.BenchSettings, shape: dict[str, int]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same base weights for every configuration
    base = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    base.requires_grad_(False)
    if method == BASE:
        return base
    torch.manual_seed(1)
    if method == "peft_lora":
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha,
                                                          lora_dropout=0.0, target_modules=list(step_time.TARGET_SETS[targets]),
                                                          task_type="CAUSAL_LM"))
    else:
        import structlora

        model = structlora.get_peft_model(base, step_time.adapter_config(method, targets, settings))
    return perturb_trainable(model).eval()


def perturb_trainable(model: nn.Module, scale: float = 0.01) -> nn.Module:
    """Adds N(0, scale²) noise (torch's global generator) to every trainable parameter: non-zero updates, as trained
    (a zero B would let a library skip work it must do when trained). Returns the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * scale)
    return model


def mergeable(method: str) -> bool:
    return method not in (BASE, "loretta_adp")


def generate_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int, mode: str) -> float:
    """CPU seconds of one generate() call producing exactly `new_tokens` tokens per sequence."""
    gc.collect()
    begin = time.process_time()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **MODES[mode])
    elapsed = time.process_time() - begin
    assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
    return elapsed


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beam-tokens", type=int, default=32, help="new tokens for beam search (4 beams)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--modes", default="greedy,beam")
    parser.add_argument("--methods", default=",".join(dict.fromkeys(m for m, _ in VARIANTS)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a hidden-64 model, for the smoke test")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler's top operations (self CPU time) of one greedy batch-1 "
                             "generate per configuration")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = step_time.BenchSettings(
        device=torch.device("cpu"), dtype=torch.float32, shape_name="generate", batch_size=1, seq_len=1, rank=8,
        lora_alpha=16.0, tensor_rank=5, bottleneck_size=64, warmup_steps=0, timed_steps=0, learning_rate=0.0,
        seed=0)
    wanted = set(args.methods.split(",")) | {BASE}  # with its control copy
    variants = [v for v in VARIANTS if v[0] in wanted]
    shape = dict(LLAMA_768, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=256) if args.tiny else LLAMA_768
    models = {v: build(*v, settings, shape) for v in variants}
    cases = [Case(mode, int(b)) for mode in args.modes.split(",") for b in args.batches.split(",")]
    prompts = {b: torch.randint(3, shape["vocab_size"], (b, args.prompt_len), generator=torch.Generator().manual_seed(b))
               for b in {c.batch for c in cases}}
    tokens_for = {"greedy": args.new_tokens, "beam": args.beam_tokens}
    if args.profile:
        return profile(models, prompts[min(prompts)], args.new_tokens)
    # (method, targets, merged) -> case -> per-round seconds
    times: dict[tuple[str, str, bool], dict[Case, list[float]]] = {}
    for case in cases:  # warm-up: one untimed run of everything
        for variant, model in models.items():
            generate_once(model, prompts[case.batch], 4, case.mode)
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for case in cases:
            for variant in order:
                model = models[variant]
                for merged in ((False, True) if mergeable(variant[0]) else (False,)):
                    if merged:
                        model.merge_adapter()
                    seconds = generate_once(model, prompts[case.batch], tokens_for[case.mode], case.mode)
                    if merged:
                        model.unmerge_adapter()
                    times.setdefault((*variant, merged), {}).setdefault(case, []).append(seconds)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        # Written after every round, so an interrupted run still leaves its completed rounds.
        report = summarize(times, cases, tokens_for, shape, args, rounds_done=round_index + 1)
    print(render_markdown(report))
    return report


def profile(models: dict[tuple[str, str], nn.Module], prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    tables = {}
    for (method, targets), model in models.items():
        generate_once(model, prompt, 4, "greedy")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_once(model, prompt, new_tokens, "greedy")
        tables[f"{method} {targets}"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"## {method} {targets}\n{tables[f'{method} {targets}']}")
    return {"profiles": tables}


def summarize(times: dict, cases: list[Case], tokens_for: dict[str, int], shape: dict[str, int],
              args: argparse.Namespace, rounds_done: int) -> dict[str, Any]:
    rows = []
    for key, per_case in times.items():
        for case, seconds in per_case.items():
            base_seconds = times[(BASE, "-", False)][case]
            ratios = [s / b for s, b in zip(seconds, base_seconds)]
            median_s = statistics.median(seconds)
            rows.append({"method": key[0], "targets": key[1], "merged": key[2], "mode": case.mode,
                         "batch": case.batch, "new_tokens": tokens_for[case.mode], "seconds": seconds,
                         "median_s": median_s,
                         "tokens_per_s": case.batch * tokens_for[case.mode] / median_s,
                         "ratio_to_base": statistics.median(ratios), "ratios": ratios})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor(),
        "threads": args.threads, "rounds": rounds_done, "shape": shape, "prompt_len": args.prompt_len,
        "clock": "process CPU time", "rows": rows, "targets": evaluate_targets(rows, times, cases),
        "unmerged_over_merged": [
            {"method": key[0], "targets": key[1], "mode": case.mode, "batch": case.batch,
             "ratio": _per_round_ratio(times, key, (*key[:2], True), case)}
            for key in times if not key[2] and (*key[:2], True) in times for case in cases],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(report))
    return report


def _per_round_ratio(times: dict, numerator: tuple, denominator: tuple, case: Case) -> float | None:
    if numerator not in times or denominator not in times:
        return None
    return statistics.median(n / d for n, d in zip(times[numerator][case], times[denominator][case]))


def _object_corrected_ratio(times: dict, numerator: tuple[str, str], denominator: tuple[str, str],
                            case: Case) -> float | None:
    """Unmerged time of `numerator` over `denominator`'s, each divided by its own object's merged time in the same
    round (median over rounds). Merged, a model runs the base's computation on its own memory, so this cancels
    what differs between model objects (merged copies of the same base read 0.93-1.07 of the base object) and
    keeps the adapter paths' cost. The base as denominator: the numerator's unmerged / merged."""
    def own(variant: tuple[str, str]) -> list[float] | None:
        unmerged, merged = times.get((*variant, False), {}).get(case), times.get((*variant, True), {}).get(case)
        return None if unmerged is None or merged is None else [u / m for u, m in zip(unmerged, merged)]

    top = own(numerator)
    bottom = [1.0] * len(top or []) if denominator == (BASE, "-") else own(denominator)
    if top is None or bottom is None:
        return None
    return statistics.median(t / b for t, b in zip(top, bottom))


def evaluate_targets(rows: list[dict], times: dict, cases: list[Case]) -> list[dict[str, Any]]:
    """The issue's inference targets, on the greedy cases (and beam where the target names no mode): each as
    measured between model objects and, where both sides are mergeable, corrected for the model object."""
    checks = []

    def check(target: str, numerator: tuple[str, str], denominator: tuple[str, str], case: Case,
              limit: float) -> None:
        for label, value in (("", _per_round_ratio(times, (*numerator, False), (*denominator, False), case)),
                             (" (object-corrected)", _object_corrected_ratio(times, numerator, denominator, case))):
            if value is not None:
                checks.append({"target": f"{case.mode} batch {case.batch}: {target}{label}",
                               "measured": round(value, 3), "limit": limit, "met": value <= limit})

    for case in cases:
        for targets in ("qv", "all"):
            check(f"our unmerged LoRA {targets} / PEFT LoRA {targets} <= 1", ("lora", targets),
                  ("peft_lora", targets), case, 1.0)
        for structure in step_time.MTLORA_STRUCTURES:
            check(f"MTLoRA {structure} qv / our LoRA qv <= 1.02", (f"mtlora_{structure}", "qv"), ("lora", "qv"),
                  case, 1.02)
        if case.batch == 1:
            check("LoRETTA_rep qv / base <= 1.05", ("loretta_rep", "qv"), (BASE, "-"), case, 1.05)
            check("LoRETTA_adp / base <= 1.15", ("loretta_adp", "default"), (BASE, "-"), case, 1.15)
    return checks


def render_markdown(report: dict[str, Any]) -> str:
    shape = report["shape"]
    lines = [f"Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, "
             f"fp32; prompt {report['prompt_len']} tokens; "
             f"{report['threads']} thread, {report['clock']}, {report['rounds']} interleaved rounds, "
             f"ratio = median over rounds of (time / base time in the same round); torch {report['torch']}.", ""]
    cases = sorted({(r["mode"], r["batch"]) for r in report["rows"]})
    header = "| method | targets | " + " | ".join(f"{m} b{b}" for m, b in cases) + " |"
    lines += [header, "|---|---|" + "---:|" * len(cases)]
    keys = list(dict.fromkeys((r["method"], r["targets"], r["merged"]) for r in report["rows"]))
    for method, targets, merged in keys:
        cells = []
        for mode, batch in cases:
            row = next(r for r in report["rows"] if (r["method"], r["targets"], r["merged"], r["mode"], r["batch"])
                       == (method, targets, merged, mode, batch))
            cells.append(f"{row['ratio_to_base']:.3f} ({row['tokens_per_s']:.0f} tok/s)")
        label = f"{method}{' merged' if merged else ''}"
        lines.append(f"| {label} | {targets} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {c['target']} | {c['measured']:.3f} | {'yes' if c['met'] else 'NO'} |" for c in report["targets"]]
    same = report.get("unmerged_over_merged", [])
    if same:
        lines += ["", "The same model object unmerged / merged (median over rounds; merged = the base's compute, so this "
                  "is the adapter path's cost without the difference between model objects):", "",
                  "| method | targets | " + " | ".join(f"{m} b{b}" for m, b in cases) + " |",
                  "|---|---|" + "---:|" * len(cases)]
        for method, targets in dict.fromkeys((r["method"], r["targets"]) for r in same):
            cells = [next((f"{r['ratio']:.3f}" for r in same if (r["method"], r["targets"], r["mode"], r["batch"])
                           == (method, targets, mode, batch)), "-") for mode, batch in cases]
            lines.append(f"| {method} | {targets} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
