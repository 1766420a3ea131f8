"""What training the norms costs a LoRETTA step: frozen norms, lean trained copies (`structlora.norms`), and plain
trained copies of the stock module, in one process with `step_time.py`'s builders and clock (issue 16).

Each round times every (method, variant) once, alternating the order; a variant's cost is the median over rounds
of its step time divided by the frozen-norm step time of the same method in the same round.

    python benchmarks/trained_norms_step.py --rounds 5 --json runs/trained_norms.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

import structlora.layers  # noqa: E402

CONFIGURATIONS = {"loretta_rep": "qv", "loretta_adp": step_time.ADP_DEFAULT_TARGETS}
# variant -> (train_norms, lean copies)
VARIANTS = {"frozen": (False, True), "lean": (True, True), "stock": (True, False)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(CONFIGURATIONS))
    parser.add_argument("--shape", default="small", choices=sorted(step_time.SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = step_time.SHAPES[args.shape]
    settings = step_time.BenchSettings(
        device=torch.device("cpu"), dtype=torch.float32, shape_name=args.shape, batch_size=shape.batch_size,
        seq_len=shape.seq_len, rank=8, lora_alpha=16.0, tensor_rank=5, bottleneck_size=64, warmup_steps=2,
        timed_steps=args.steps, learning_rate=1e-4, seed=0, cpu_clock="cpu")
    real_config, real_copy = step_time.adapter_config, structlora.layers.lean_norm_copy
    medians: dict[tuple[str, str], list[float]] = {}
    methods = args.methods.split(",")
    try:
        for round_index in range(args.rounds):
            order = list(VARIANTS) if round_index % 2 == 0 else list(VARIANTS)[::-1]
            for method in methods:
                for variant in order:
                    train_norms, lean = VARIANTS[variant]
                    step_time.adapter_config = (lambda *a, train_norms=train_norms: dataclasses.replace(
                        real_config(*a), train_norms=train_norms))
                    structlora.layers.lean_norm_copy = real_copy if lean else (lambda module: None)
                    configuration = step_time.Configuration(method, CONFIGURATIONS[method], False)
                    measurement = step_time.Measurement(configuration)
                    step_time.measure_once(configuration, shape, settings, measurement)
                    medians.setdefault((method, variant), []).append(statistics.median(measurement.step_times_ms))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        step_time.adapter_config, structlora.layers.lean_norm_copy = real_config, real_copy
    print(f"{shape.description}, one training step, CPU time, {args.threads} thread(s), {args.rounds} rounds x "
          f"{args.steps} steps; ratio = median over rounds of (step / frozen-norm step)\n")
    print("| method | frozen norms (ms) | lean trained (ms) | stock trained (ms) | lean / frozen | stock / frozen |"
          "\n|---|---:|---:|---:|---:|---:|")
    report: dict[str, Any] = {"shape": args.shape, "rounds": args.rounds, "steps": args.steps, "methods": {}}
    for method in methods:
        frozen = medians[(method, "frozen")]
        ratio = {v: statistics.median(t / f for t, f in zip(medians[(method, v)], frozen)) for v in ("lean", "stock")}
        ms = {v: statistics.median(medians[(method, v)]) for v in VARIANTS}
        report["methods"][method] = {"median_ms": ms, "ratio_to_frozen": ratio,
                                     "round_medians_ms": {v: medians[(method, v)] for v in VARIANTS}}
        print(f"| {method} | {ms['frozen']:.1f} | {ms['lean']:.1f} | {ms['stock']:.1f} | {ratio['lean']:.3f} | "
              f"{ratio['stock']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
