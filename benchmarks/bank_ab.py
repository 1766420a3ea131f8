"""The factor bank on and off, in one process: step time of the configurations that compute factors.

`structlora.bank` computes the tensor trains and MTLoRA's T·A of all layers in one batched chain per forward.
This times each configuration with the bank and with every layer computing its own factors (the bank call
replaced by a no-op), alternating the order every round, with `step_time.py`'s builders and clock.

    python benchmarks/bank_ab.py --rounds 4 --layers 16 --hidden 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

import structlora.peft_tuner  # noqa: E402 - its forward pre-hook banks the factors

CONFIGURATIONS = {"loretta_rep": "all", "loretta_adp": step_time.ADP_DEFAULT_TARGETS, "mtlora_icfm": "all"}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(CONFIGURATIONS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = step_time.Shape(dict(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                                 num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                 num_key_value_heads=max(1, args.hidden // 64), vocab_size=8192,
                                 max_position_embeddings=512),
                            batch_size=2, seq_len=128, description=f"Llama {args.layers} x {args.hidden}")
    step_time.SHAPES["bank_ab"] = shape
    settings = step_time.BenchSettings(
        device=torch.device("cpu"), dtype=torch.float32, shape_name="bank_ab", batch_size=2, seq_len=128, rank=8,
        lora_alpha=16.0, tensor_rank=5, bottleneck_size=64, warmup_steps=2, timed_steps=args.steps,
        learning_rate=1e-4, seed=0, cpu_clock="cpu")
    real_bank = structlora.peft_tuner.bank
    times: dict[tuple[str, bool], list[float]] = {}
    try:
        for round_index in range(args.rounds):
            for method in args.methods.split(","):
                for banked in ((True, False) if round_index % 2 == 0 else (False, True)):
                    structlora.peft_tuner.bank = real_bank if banked else (lambda members: 0)
                    configuration = step_time.Configuration(method, CONFIGURATIONS[method], False)
                    measurement = step_time.Measurement(configuration)
                    step_time.measure_once(configuration, shape, settings, measurement)
                    times.setdefault((method, banked), []).extend(measurement.step_times_ms)
    finally:
        structlora.peft_tuner.bank = real_bank
    print(f"{shape.description}, one training step, CPU time, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| method | targets | bank on (ms) | bank off (ms) | change |\n|---|---|---:|---:|---:|")
    report = {}
    for method in args.methods.split(","):
        on, off = statistics.median(times[(method, True)]), statistics.median(times[(method, False)])
        report[method] = {"bank_on_ms": on, "bank_off_ms": off}
        print(f"| {method} | {CONFIGURATIONS[method]} | {on:.1f} | {off:.1f} | {100 * (on / off - 1):+.1f}% |")
    return report


if __name__ == "__main__":
    main()
