"""The PEFT path against structlora's own model class, same layers (issue 27): does `peft.get_peft_model` with a
structlora config (peft's PeftModel + StructloraTuner) cost anything over `structlora.get_peft_model`?

One process builds both models per method on the same seeded random-weight Llama (hidden 256, 4 layers, q/v
targets, batch 8 x 64 tokens), then times a training step (forward + backward) and a no-grad forward, round after
round, the two models alternating. The clock is this process's CPU time on one thread (neighbours on a shared
machine do not count); the reported ratio is the median over rounds of (PEFT path / own model).

    python benchmarks/peft_path_speed.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import structlora

CONFIGS = {
    "lora": lambda: structlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mtlora-icfm": lambda: structlora.MTLoraConfig(r=8, lora_alpha=16, structure="icfm",
                                                   target_modules=["q_proj", "v_proj"]),
    "loretta_rep": lambda: structlora.LorettaRepConfig(r=8, tensor_rank=5, target_modules=["q_proj", "v_proj"],
                                                       train_norms=False),
}


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids).logits.float().pow(2).mean().backward()


def no_grad_forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.rounds} rounds, CPU time, 1 thread")
    print("| method | measured | own model (ms) | PEFT path (ms) | PEFT path / own (median of rounds) |")
    print("|---|---|---|---|---|")
    for method, make in CONFIGS.items():
        models = {"own": structlora.get_peft_model(base(), make()), "peft": peft.get_peft_model(base(), make())}
        for what, run in (("train step", train_step), ("no-grad forward", no_grad_forward)):
            for model in models.values():
                run(model, ids)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    start = time.process_time()
                    run(model, ids)
                    times[name].append(time.process_time() - start)
            ratio = statistics.median(p / o for p, o in zip(times["peft"], times["own"]))
            own, path = (statistics.median(times[n]) * 1000 for n in ("own", "peft"))
            print(f"| {method} | {what} | {own:.1f} | {path:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
