"""One training step taken apart, counted exactly, for the full-size models on any machine: the memory it
holds for the backward, the operations it launches, and its matrix FLOPs.

Issue 3's targets are GPU numbers (Llama-2-7B shape, bf16, batch 4 x 1024). Two of the three things behind
them are properties of the autograd graph, not of the device, and this script counts them for every
configuration of `step_time.py`, built on PyTorch's meta device (shapes and dtypes, no storage, no
arithmetic). One forward with the loss and its backward run once per configuration, under three counters:

- **memory**: `torch.autograd.graph.saved_tensors_hooks` adds up every distinct storage saved for the
  backward that is not a model parameter (`step_time.recording_saved_storages`, which also fills the
  "saved for backward" column of the timed runs); to it comes the trainable state AdamW keeps (parameters,
  gradients, two moment buffers). The issue's memory target is about the *extra over the floor*; the
  published H100 measurements of PEFT are the check (the report sets them side by side).
- **operations**: a dispatch mode counts every aten operation that does work (views and allocations left
  out). On a GPU each is at least one kernel launch, and an adapter's
  small kernels cost their launch and minimum run time whatever their size: this is the "launch overhead"
  half of the issue's analysis. The optimizer step is not counted (its kernels depend on foreach grouping).
- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over the same forward and backward.

    python benchmarks/step_anatomy.py --shape 7b --json runs/step_anatomy_7b.json

Not seen: time. Transient buffers inside one op (the backward's temporaries, the loss's logits up-cast,
allocator fragmentation) are the same for the floor and every adapter to first order, which is why the
report compares extras over the floor.

Two things differ on the meta device and are put right here: the attention runs through the CUDA
flash-attention op (what `sdpa` picks on an H100 for bf16 without a mask; on meta `sdpa` would take the
math path, which saves the whole attention matrix), and transformers' packed-sequence check, which reads
tensor values, is skipped (the batch is not packed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402 - the configurations and model builders are step_time's, unchanged

# The H100 measurements (bf16, Llama-2-7B shape, batch 4 x 1024, r 8): peak memory in GiB.
PUBLISHED_H100_PEAK_GIB = {"floor": 30.5, ("peft_lora", "qv"): 34.5, ("peft_lora", "all"): 48.0}


@contextlib.contextmanager
def meta_device_patches(device: torch.device) -> Iterator[None]:
    """On the meta device: route causal sdpa to the CUDA flash-attention op and skip the packed-sequence check."""
    if device.type != "meta":
        yield
        return
    import transformers.masking_utils as masking_utils

    original_sdpa = torch.nn.functional.scaled_dot_product_attention
    original_packed = masking_utils.find_packed_sequence_indices

    def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        # (The flash op takes grouped-query shapes as they are, as flash attention does with enable_gqa.)
        if attn_mask is not None:
            return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = flash_sdpa
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original_sdpa
        masking_utils.find_packed_sequence_indices = original_packed


# Non-view operations that only allocate or relabel memory: no kernel runs for them.
NO_KERNEL_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
                           "_unsafe_view", "lift_fresh", "alias", "_local_scalar_dense"})


class OperationCounter(TorchDispatchMode):
    """Counts the aten operations that do work (below autograd, so the backward's are counted too)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_step(model: nn.Module, input_ids: torch.Tensor) -> tuple[dict[int, int], dict[str, int], int]:
    """One forward with the loss and its backward: the storages saved for the backward ({id: bytes}), the
    operations by aten name, and the total FLOPs."""
    counter, flops = OperationCounter(), FlopCounterMode(display=False)
    with step_time.recording_saved_storages(model) as saved, flops, counter:
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    return saved, counter.counts, flops.get_total_flops()


def optimizer_state_bytes(model: nn.Module) -> int:
    """Trainable parameters, their gradients and AdamW's two moment buffers (each in the parameter's dtype)."""
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def account(configuration: step_time.Configuration, settings: step_time.BenchSettings) -> dict[str, Any]:
    shape = step_time.SHAPES[settings.shape_name]
    model = step_time.build_model(configuration.method, configuration.targets, shape, settings)
    input_ids = torch.zeros(settings.batch_size, settings.seq_len, dtype=torch.long, device=settings.device)
    with meta_device_patches(settings.device):
        saved, operations, flops = count_step(model, input_ids)
    return {
        "method": configuration.method, "label": step_time.METHOD_LABELS[configuration.method],
        "targets": configuration.targets,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "saved_activation_bytes": sum(saved.values()), "saved_tensor_storages": len(saved),
        "optimizer_state_bytes": optimizer_state_bytes(model),
        "operations": sum(operations.values()), "operations_by_name": operations, "flops": flops,
    }


def with_extras(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's extra over the floor, and its ratio to PEFT LoRA's extra on the same targets."""
    floor = next(row for row in rows if row["method"] == step_time.FLOOR)
    floor_total = floor["saved_activation_bytes"] + floor["optimizer_state_bytes"]
    for row in rows:
        row["extra_over_floor_bytes"] = row["saved_activation_bytes"] + row["optimizer_state_bytes"] - floor_total
        row["extra_operations"] = row["operations"] - floor["operations"]
        row["extra_flops_pct"] = 100.0 * (row["flops"] / floor["flops"] - 1.0)
        names = set(row["operations_by_name"]) | set(floor["operations_by_name"])
        row["extra_operations_by_name"] = dict(sorted(
            ((name, row["operations_by_name"].get(name, 0) - floor["operations_by_name"].get(name, 0)) for name in names),
            key=lambda item: -item[1]))
    for row in rows:
        if row["method"] in (step_time.FLOOR, step_time.PEFT_LORA):
            continue
        # LoRETTA_adp has its own placement (gate/up/down): it is compared with PEFT on all-linear, or on
        # q,v (the stricter comparison) when all-linear is not in the run.
        peft_rows = {r["targets"]: r for r in rows if r["method"] == step_time.PEFT_LORA}
        if row["targets"] in step_time.TARGET_SETS:
            peft_targets = row["targets"]
        else:
            peft_targets = "all" if "all" in peft_rows else "qv"
        peft = peft_rows.get(peft_targets)
        if peft is not None and peft["extra_over_floor_bytes"] > 0:
            row["peft_targets_compared"] = peft_targets
            row["extra_vs_peft"] = row["extra_over_floor_bytes"] / peft["extra_over_floor_bytes"]
    return rows


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def markdown_report(rows: list[dict[str, Any]], meta: dict[str, Any], published: bool) -> str:
    lines = [
        f"{meta['shape_description']}, {meta['dtype']}, batch {meta['batch_size']} x {meta['seq_len']}, r={meta['rank']}, "
        f"TT rank {meta['tensor_rank']}, bottleneck {meta['bottleneck_size']}; counted on the {meta['device']} device; "
        f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"structlora core {meta['structlora_core_digest']}",
        "",
        "| method | targets | trainable params | saved for backward | AdamW state (p, grad, 2 moments) "
        "| extra over floor | extra / PEFT's (same targets) | <= half of PEFT's |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = row.get("extra_vs_peft")
        compared = "—" if ratio is None else f"{ratio:.2f} (vs {row['peft_targets_compared']})"
        met = "—" if ratio is None else ("yes" if ratio <= 0.5 else "NO")
        extra = "—" if row["method"] == step_time.FLOOR else gib(row["extra_over_floor_bytes"])
        lines.append(
            f"| {row['label']} | {row['targets']} | {row['trainable_params']:,} | {gib(row['saved_activation_bytes'])} | "
            f"{gib(row['optimizer_state_bytes'])} | {extra} | {compared} | {met} |")
    lines += ["", "| method | targets | operations (forward + backward) | extra over floor | largest extras "
              "| matrix FLOPs | extra FLOPs |", "|---|---|---:|---:|---|---:|---:|"]
    for row in rows:
        if row["method"] == step_time.FLOOR:
            extra_operations = largest = extra_flops = "—"
        else:
            extra_operations = f"{row['extra_operations']:+,}"
            largest = ", ".join(f"{name} {count:+,}" for name, count in
                                list(row["extra_operations_by_name"].items())[:3] if count > 0)
            extra_flops = f"{row['extra_flops_pct']:+.2f}%"
        lines.append(f"| {row['label']} | {row['targets']} | {row['operations']:,} | {extra_operations} | {largest} | "
                     f"{row['flops'] / 1e12:.1f} T | {extra_flops} |")
    if published:
        floor_gib = PUBLISHED_H100_PEAK_GIB["floor"]
        lines += ["", "PEFT's extra over the floor, counted here vs measured on an H100 (the issue's table):", "",
                  "| targets | counted here | H100 peak − floor peak |", "|---|---:|---:|"]
        for (method, targets), peak in ((k, v) for k, v in PUBLISHED_H100_PEAK_GIB.items() if k != "floor"):
            row = next((r for r in rows if (r["method"], r["targets"]) == (method, targets)), None)
            if row is not None:
                lines.append(f"| {targets} | {gib(row['extra_over_floor_bytes'])} | {peak - floor_gib:.2f} GiB |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(step_time.SHAPES), default="7b")
    parser.add_argument("--device", choices=("meta", "cpu"), default="meta",
                        help="meta: any size, no memory used (default); cpu: real tensors, to check the meta count")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shape's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the shape's")
    parser.add_argument("--methods", default=",".join(step_time.ALL_METHODS))
    parser.add_argument("--targets", default="qv,all")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tensor-rank", type=int, default=5)
    parser.add_argument("--bottleneck-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = ([m for m in args.methods if m not in step_time.ALL_METHODS]
               + [t for t in args.targets if t not in step_time.TARGET_SETS])
    if unknown:
        parser.error(f"unknown method or target set: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = step_time.SHAPES[args.shape]
    settings = step_time.BenchSettings(
        device=torch.device(args.device), dtype=getattr(torch, args.dtype), shape_name=args.shape,
        batch_size=args.batch_size or shape.batch_size, seq_len=args.seq_len or shape.seq_len,
        rank=args.rank, lora_alpha=2.0 * args.rank, tensor_rank=args.tensor_rank,
        bottleneck_size=args.bottleneck_size, warmup_steps=0, timed_steps=1, learning_rate=1e-4, seed=0)
    plan = step_time.configurations(args.methods, args.targets, [False])
    rows = with_extras([account(configuration, settings) for configuration in plan])
    environment = step_time.environment(replace(settings, device=torch.device("cpu")))
    meta = {**{k: environment[k] for k in ("date_utc", "torch", "transformers", "peft", "structlora_core_digest")},
            "device": args.device, "shape": args.shape, "shape_description": shape.description, "dtype": args.dtype,
            "batch_size": settings.batch_size, "seq_len": settings.seq_len, "rank": settings.rank,
            "tensor_rank": settings.tensor_rank, "bottleneck_size": settings.bottleneck_size,
            "command": " ".join(["python benchmarks/step_anatomy.py", *(argv if argv is not None else sys.argv[1:])])}
    published = (args.shape == "7b" and args.dtype == "bfloat16" and settings.batch_size == 4
                 and settings.seq_len == 1024 and args.rank == 8)
    table = markdown_report(rows, meta, published)
    print(table)
    report = {"meta": meta, "results": rows}
    for path, text in ((args.markdown, table), (args.json, json.dumps(report, indent=2))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return report


if __name__ == "__main__":
    main()
