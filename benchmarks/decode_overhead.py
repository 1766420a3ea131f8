"""What an unmerged adapter adds to each decoded token, counted rather than timed end to end (issue 16).

End-to-end generation ratios at batch 1 differ by a few percent, which a shared machine cannot resolve. This
benchmark measures the parts that decide them in ways load does not move:

- per decoded token: Python function calls (cProfile) and tensor operations (aten ops, counted by a dispatch
  mode) of greedy `generate()`, taken as the difference between a run of 2·N and one of N new tokens, so setup
  and prompt cost cancel; extra calls and ops over the base model are the adapter's fixed cost per token;
- one adapted projection at the decode shape (1 token per sequence, batch 1 and 8 by default): the forward's CPU
  time, the minimum over blocks of many calls (the minimum is what load inflates least), ours against PEFT's
  LoRA layer and the bare nn.Linear. Unlike whole-model ratios, this compares the adapter paths on the same
  weight tensor, so the memory placement of different model objects (±5 % on whole generations) cannot enter.

Same models as `generate_speed.py` (hidden 768, 4 layers by default; `--tiny` for the smoke test).

    python benchmarks/decode_overhead.py --json runs/decode_overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_speed  # noqa: E402
import step_time  # noqa: E402

# (method, targets) as in generate_speed.VARIANTS
DEFAULT_VARIANTS = ["base:-", "peft_lora:qv", "lora:qv", "peft_lora:all", "lora:all", "mtlora_icfm:qv",
                    "loretta_rep:qv", "loretta_adp:default"]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, do_sample=False)


def python_calls(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> int:
    profiler = cProfile.Profile()
    profiler.enable()
    _generate(model, prompt, new_tokens)
    profiler.disable()
    return pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]


def aten_ops(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> collections.Counter[str]:
    with _OpCounter() as counter:
        _generate(model, prompt, new_tokens)
    return counter.counts


def per_token(measure: Callable[[int], Any], tokens: int) -> Any:
    """measure(2·tokens) − measure(tokens), divided by tokens: the cost of one more decoded token."""
    short, long = measure(tokens), measure(2 * tokens)
    if isinstance(short, collections.Counter):
        return {op: (long[op] - short[op]) / tokens for op in long if long[op] != short[op]}
    return (long - short) / tokens


def cpu_time_per_call(function: Callable[[], Any], calls: int, blocks: int) -> float:
    """Minimum over blocks of the process CPU time per call, in microseconds."""
    best = float("inf")
    for _ in range(blocks):
        begin = time.process_time()
        for _ in range(calls):
            function()
        best = min(best, (time.process_time() - begin) / calls)
    return best * 1e6


def same_weight_layers(width: int, rank: int, batches: Sequence[int], rounds: int, calls: int
                       ) -> dict[str, dict[str, float]]:
    """One projection (width x width, no bias) wrapped by PEFT's LoRA layer and by ours, both over copies of the
    same weight, timed in alternating order round after round with the bare projection: batch -> {bare, ours,
    peft: median µs per call; ours_extra, peft_extra: median over rounds of (wrapper − bare)}. Interleaving and
    per-round differences cancel drift; no model object is involved."""
    import copy

    import peft

    import structlora

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(width, width, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    torch.manual_seed(0)
    bare = One()
    ours = structlora.get_peft_model(copy.deepcopy(bare), structlora.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj"]))
    theirs = peft.get_peft_model(copy.deepcopy(bare), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                     target_modules=["q_proj"]))
    layers = {"bare": bare.q_proj, "ours": next(m for n, m in ours.named_modules() if n.endswith("q_proj")),
              "peft": next(m for n, m in theirs.named_modules() if n.endswith("q_proj"))}
    for model in (ours, theirs):
        generate_speed.perturb_trainable(model).eval()
    result = {}
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 1, width)
            times: dict[str, list[float]] = {name: [] for name in layers}
            for round_index in range(rounds):
                for name in (list(layers) if round_index % 2 == 0 else list(layers)[::-1]):
                    layer = layers[name]
                    begin = time.process_time()
                    for _ in range(calls):
                        layer(x)
                    times[name].append((time.process_time() - begin) / calls * 1e6)
            row = {name: statistics.median(values) for name, values in times.items()}
            for name in ("ours", "peft"):
                row[f"{name}_extra"] = statistics.median(w - b for w, b in zip(times[name], times["bare"]))
            result[str(batch)] = row
    return result


def wrapped_modules(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, int]]:
    """The first module of each adapter-wrapper class in the model: wrapper, the module it wraps, input width."""
    from structlora.layers import AdapterLayerMixin

    found: dict[str, tuple[nn.Module, nn.Module, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayerMixin) and type(module).__name__ not in found:
            inner = getattr(module, "base_layer", None) or module.original
            width = getattr(inner, "in_features", None) or inner.weight.shape[-1]
            found[type(module).__name__] = (module, inner, width)
        elif type(module).__name__ == "Linear" and name.endswith("layers.0.self_attn.q_proj") and "lora_A" in dict(
                module.named_children()):  # PEFT's LoRA layer
            found["peft LoRA Linear"] = (module, module.base_layer, module.in_features)
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="method:targets, comma-separated")
    parser.add_argument("--tokens", type=int, default=16, help="N: per-token counts are (2N run) − (N run), / N")
    parser.add_argument("--calls", type=int, default=2000, help="calls per block in the one-layer timing")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--layer-batches", default="1,8", help="batch sizes of the one-layer timing")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = step_time.BenchSettings(
        device=torch.device("cpu"), dtype=torch.float32, shape_name="generate", batch_size=1, seq_len=1, rank=8,
        lora_alpha=16.0, tensor_rank=5, bottleneck_size=64, warmup_steps=0, timed_steps=0, learning_rate=0.0,
        seed=0)
    shape = dict(generate_speed.LLAMA_768, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256) if args.tiny else generate_speed.LLAMA_768
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    models = {v: generate_speed.build(*v, settings, shape) for v in variants}
    prompt = torch.randint(3, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    report: dict[str, Any] = {"shape": shape, "tokens": args.tokens, "torch": torch.__version__, "variants": {}}
    for (method, targets), model in models.items():
        _generate(model, prompt, 2)  # warm-up
        calls = per_token(lambda n: python_calls(model, prompt, n), args.tokens)
        ops = per_token(lambda n: aten_ops(model, prompt, n), args.tokens)
        report["variants"][f"{method} {targets}"] = {"python_calls_per_token": calls,
                                                     "aten_ops_per_token": sum(ops.values()), "aten_ops": ops}
    with torch.no_grad():
        for (method, targets), model in models.items():
            # batch (as a string: JSON keys) -> wrapper class -> µs per call
            timings = report["variants"][f"{method} {targets}"]["module_forward_us"] = {}
            for batch in args.layer_batches.split(","):
                for kind, (wrapper, inner, width) in wrapped_modules(model).items():
                    x = torch.randn(int(batch), 1, width)
                    timings.setdefault(batch, {})[kind] = {
                        "wrapper": cpu_time_per_call(lambda: wrapper(x), args.calls, args.blocks),
                        "wrapped": cpu_time_per_call(lambda: inner(x), args.calls, args.blocks)}
    width = shape["hidden_size"]
    report["same_weight_us"] = same_weight_layers(width, settings.rank, [int(b) for b in args.layer_batches.split(",")],
                                                  rounds=args.blocks, calls=args.calls)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


def render(report: dict[str, Any]) -> str:
    base = report["variants"].get("base -", {})
    lines = ["| configuration | Python calls / token | over base | aten ops / token | over base | "
             "one call, 1 token per sequence: wrapper / wrapped module alone (µs) |", "|---|---:|---:|---:|---:|---|"]
    for label, row in report["variants"].items():
        extra_calls = row["python_calls_per_token"] - base.get("python_calls_per_token", 0)
        extra_ops = row["aten_ops_per_token"] - base.get("aten_ops_per_token", 0)
        forwards = "; ".join(f"b{batch} {kind} {t['wrapper']:.1f} / {t['wrapped']:.1f}"
                             for batch, kinds in row.get("module_forward_us", {}).items()
                             for kind, t in kinds.items()) or "-"
        lines.append(f"| {label} | {row['python_calls_per_token']:.0f} | {extra_calls:+.0f} | "
                     f"{row['aten_ops_per_token']:.0f} | {extra_ops:+.0f} | {forwards} |")
    same = report.get("same_weight_us", {})
    if same:
        lines += ["", "One projection, the same weight, wrapped by each library (interleaved rounds; medians, µs per call):",
                  "", "| batch | bare | ours | PEFT | ours − bare | PEFT − bare |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {batch} | {r['bare']:.1f} | {r['ours']:.1f} | {r['peft']:.1f} | {r['ours_extra']:+.1f} | "
                  f"{r['peft_extra']:+.1f} |" for batch, r in same.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
