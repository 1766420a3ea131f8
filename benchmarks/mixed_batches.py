"""Mixed-adapter batches: tokens/s of one batch of k rows each with its own adapter (`adapter_names=`) against
k separate batches of one row (`set_adapter` between them), on SmolLM2-135M (fp32, CPU, one thread).

    python benchmarks/quantized_bases.py --bases fp32 --methods lora --steps 0   # writes the fp32 cache once
    python benchmarks/mixed_batches.py --k 4 --tokens 64 --new-tokens 16

Prefill: one forward over k x `--tokens` tokens. Generate: greedy decoding of `--new-tokens` tokens per row.
The clock is process CPU time; the median of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from quantized_bases import _config, _load

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_models import perturb_adapters  # noqa: E402  (the tests' stand-in for trained adapters)

METHODS = ("lora", "mtlora", "loretta_rep", "loretta_adp")


def _timed(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default="/tmp/smollm2-135m-fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from structlora import get_peft_model

    print("| method | k | prefill mixed (tok/s) | prefill k batches (tok/s) | generate mixed (tok/s) | "
          "generate k batches (tok/s) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        names = [f"a{i}" for i in range(args.k)]
        model = get_peft_model(_load("fp32", args.cache), _config(method), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, _config(method))
        generator = torch.Generator().manual_seed(0)  # the adapters' noise, then the token ids
        perturb_adapters(model, 0.01, generator=generator).eval()
        ids = torch.randint(0, 49152, (args.k, args.tokens), generator=generator)
        mask = torch.ones_like(ids)
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=0)

        def separately(fn):
            for row, name in enumerate(names):
                model.set_adapter(name)
                fn(row)

        with torch.no_grad():
            prefill_mixed = _timed(lambda: model(input_ids=ids, adapter_names=names), args.rounds)
            prefill_split = _timed(lambda: separately(lambda r: model(input_ids=ids[r:r + 1])), args.rounds)
            generate_mixed = _timed(lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                           adapter_names=names, **options), args.rounds)
            generate_split = _timed(lambda: separately(lambda r: model.generate(
                input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1], **options)), args.rounds)
        prefill, generated = ids.numel(), args.k * args.new_tokens
        print(f"| {method} | {args.k} | {prefill / prefill_mixed:.0f} | {prefill / prefill_split:.0f} | "
              f"{generated / generate_mixed:.1f} | {generated / generate_split:.1f} |", flush=True)


if __name__ == "__main__":
    main()
