"""Numerical check of every method on a device and dtype against a float64 reference on that device.

Issue 15, item 4: the engine's fused node and the factor bank were only ever checked on CPU tensors. This
script loads one trained adapter per method (LoRA, the four MTLoRA structures, LoRETTA_rep, LoRETTA_adp)
onto a random-weight Llama whose base is in the checked dtype on the checked device — what a user does
with a bf16 or fp16 model on a GPU — and compares with the same weights in float64 (same device):

- ``logits``: ‖out − ref‖ / ‖ref‖ of the forward;
- ``grads``: ‖g − g_ref‖ / ‖g_ref‖ over all the adapter's trainable tensors together (one loss.backward());
  the worst single tensor is reported beside it (a bias gradient summed over many tokens can cancel, so
  its relative error says more about the dtype than about the adapter);
- ``bank off`` and ``plain formula``: the same errors with the factor bank switched off, and with the
  fused node replaced by the plain formula in ordinary autograd ops: the fused node and the bank may round
  differently from them, never worse (a row fails where ours is over 1.5x the plain formula's error and
  over the dtype's tolerance);
- ``merged``: logits after merge_adapter() against the reference (low-rank methods);
- ``unmerge drift``: the largest |W − W₀| / max|W₀| of the base weights after merge + unmerge.

The base model's own error in that dtype (no adapter, same inputs) is printed beside it, so an adapter's
error can be read against what the dtype costs anyway. A row fails where an error exceeds the dtype's
tolerance (bf16 operands land between 1e-3 and 1e-2; fp16 about 8x lower), and the exit code says so.

    python benchmarks/cuda_check.py --device cuda --dtypes bfloat16,float16 --json runs/cuda_check.json
    python benchmarks/cuda_check.py --device cpu --dtypes float32,bfloat16 --shape micro   # what CI runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest.mock import patch

import torch
from peft.utils import set_peft_model_state_dict

import structlora
import structlora.peft_tuner as tuner_module
from structlora.layers import LowRankLayer

# fp16 training needs loss scaling (transformers' Trainer uses a GradScaler): without it small gradients
# underflow to zero, which measures the dtype, not the adapter. A fixed scale stands in for the scaler.
LOSS_SCALES = {torch.float16: 1024.0}

# Tolerances on relative (norm-wise) errors against float64, per checked dtype: (logits, gradients, unmerge drift).
TOLERANCES = {
    torch.float32: (1e-4, 1e-3, 1e-6),
    torch.bfloat16: (3e-2, 6e-2, 1e-2),
    torch.float16: (5e-3, 1e-2, 2e-3),
}
SHAPES = {
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, batch=2, seq=16),
    # Large enough that the GPU runs its real GEMM kernels (tensor cores, split-K), small enough for seconds.
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=4096, batch=4, seq=256),
}
QV = ["q_proj", "v_proj"]
METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: structlora.LoraConfig(r=8, lora_alpha=16, target_modules=QV),
    **{f"mtlora_{s}": (lambda s=s: structlora.MTLoraConfig(r=8, lora_alpha=16, structure=s, target_modules=QV))
       for s in ("shim", "icfm", "ctcm", "dtsm")},
    "lora_all": lambda: structlora.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "loretta_rep": lambda: structlora.LorettaRepConfig(r=8, lora_alpha=16, tensor_rank=5, target_modules=QV),
    "loretta_adp": lambda: structlora.LorettaAdpConfig(bottleneck_size=64, tensor_rank=5),
}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def build_base(shape: dict[str, int], seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    config = LlamaConfig(**fields, max_position_embeddings=max(64, shape["seq"]))
    config._attn_implementation = "eager"  # the same attention on every device and dtype, float64 included
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()  # eval: no dropout anywhere


def trained_adapter(method: str, shape: dict[str, int], ids: torch.Tensor, device: torch.device, seed: int
                    ) -> dict[str, torch.Tensor]:
    """A few fp32 AdamW steps from the zero-update start, so every factor (and ΔW) is non-trivial."""
    model = structlora.get_peft_model(build_base(shape, seed).to(device), METHODS[method]())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def forward_and_grads(model: torch.nn.Module, ids: torch.Tensor, loss_scale: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    (out.loss * loss_scale).backward()
    grads = {n: p.grad.detach().double() / loss_scale for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def bank_switched_off() -> Any:
    return patch.object(tuner_module, "bank", lambda members: 0)  # the tuner's pre-forward bank hook


def generic_path() -> Any:
    """The plain formula in ordinary autograd ops instead of the fused node (what the engine must match)."""
    return patch.object(LowRankLayer, "_fast_path_weight", lambda self, adapter: None)


def gradient_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Norm-wise over all trainable tensors together."""
    return relative_error(torch.cat([grads[n].flatten().cpu() for n in reference]),
                          torch.cat([reference[n].flatten().cpu() for n in reference]))


def adapted(method: str, shape: dict[str, int], adapter: dict[str, torch.Tensor], device: torch.device,
            dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The seeded base in `dtype` on `device` with the trained adapter loaded (adapters keep their own dtype)."""
    model = structlora.get_peft_model(build_base(shape, seed).to(device=device, dtype=dtype), METHODS[method]())
    set_peft_model_state_dict(model, adapter)
    return model


def check_method(method: str, dtypes: Sequence[torch.dtype], device: torch.device, shape: dict[str, int],
                 seed: int) -> list[dict[str, Any]]:
    """One row per dtype; the adapter is trained once and the float64 reference computed once, on `device`,
    through the plain formula without the bank (float64 on the device: no reduced-precision kernel)."""
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    adapter = trained_adapter(method, shape, ids, device, seed)
    with generic_path(), bank_switched_off():  # the reference is the plain formula, not the code under test
        ref_logits, ref_grads = forward_and_grads(adapted(method, shape, adapter, device, torch.float64, seed), ids)
    rows = []
    for dtype in dtypes:
        model = adapted(method, shape, adapter, device, dtype, seed)
        scale = LOSS_SCALES.get(dtype, 1.0)
        logits, grads = forward_and_grads(model, ids, scale)
        with bank_switched_off():
            unbanked_logits, unbanked_grads = forward_and_grads(model, ids, scale)
        with generic_path(), bank_switched_off():
            generic_logits, generic_grads = forward_and_grads(model, ids, scale)
        grad_errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
        worst = max(grad_errors, key=grad_errors.__getitem__)
        row: dict[str, Any] = {
            "method": method, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "loss_scale": scale,
            "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                                      if p.requires_grad}),
            "logits": relative_error(logits, ref_logits),
            "grads": gradient_error(grads, ref_grads),
            "unbanked_logits": relative_error(unbanked_logits, ref_logits),
            "unbanked_grads": gradient_error(unbanked_grads, ref_grads),
            "generic_logits": relative_error(generic_logits, ref_logits),
            "generic_grads": gradient_error(generic_grads, ref_grads),
            "grads_worst": grad_errors[worst], "grads_worst_tensor": worst,
            "grads_worst_dtype": str(dict(model.named_parameters())[worst].dtype).removeprefix("torch."),
            "grads_nonzero": all(bool(g.abs().sum() > 0) for g in grads.values()),
        }
        if not isinstance(model.peft_config["default"], structlora.LorettaAdpConfig):
            weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            model.merge_adapter()
            with torch.no_grad():
                row["merged"] = relative_error(model(input_ids=ids).logits, ref_logits)
            model.unmerge_adapter()
            row["unmerge_drift"] = max(
                float((p.detach() - weights_before[n]).abs().max() / weights_before[n].abs().max().clamp_min(1e-30))
                for n, p in model.named_parameters() if not p.requires_grad)
        rows.append(row)
        del model
    return rows


def base_error(dtype: torch.dtype, device: torch.device, shape: dict[str, int], seed: int) -> float:
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        want = build_base(shape, seed).to(device=device, dtype=torch.float64)(input_ids=ids).logits
        got = build_base(shape, seed).to(device=device, dtype=dtype)(input_ids=ids).logits
    return relative_error(got, want)


def failures(row: dict[str, Any], dtype: torch.dtype) -> list[str]:
    """Errors against float64 must be within the dtype's tolerance, or (where the dtype itself costs more)
    no worse than 1.5x what the plain formula in ordinary autograd ops gets (``generic``, no bank): the
    fused node and the bank may round differently, never worse."""
    logits_tol, grads_tol, drift_tol = TOLERANCES[dtype]
    failed = []
    for key, tol in (("logits", logits_tol), ("merged", logits_tol), ("grads", grads_tol),
                     ("unbanked_logits", logits_tol), ("unbanked_grads", grads_tol)):
        if key not in row:
            continue
        plain = row["generic_grads" if key.endswith("grads") else "generic_logits"]
        limit = max(tol, 1.5 * plain)
        if not row[key] <= limit:  # NaN fails too
            failed.append(f"{key} {row[key]:.2e} > {limit:.1e}")
    if "unmerge_drift" in row and not row["unmerge_drift"] <= drift_tol:
        failed.append(f"unmerge_drift {row['unmerge_drift']:.2e} > {drift_tol:.0e}")
    if not row["grads_nonzero"]:
        failed.append("a gradient is all zeros")
    return failed


def run(device: torch.device, dtypes: Sequence[torch.dtype], shape_name: str, methods: Sequence[str], seed: int
        ) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    own = {dtype: base_error(dtype, device, shape, seed) for dtype in dtypes}
    rows = []
    for method in methods:
        for dtype, row in zip(dtypes, check_method(method, dtypes, device, shape, seed)):
            row["base_model_logits_error"] = own[dtype]
            row["failures"] = failures(row, dtype)
            rows.append(row)
    rows.sort(key=lambda row: dtypes.index(getattr(torch, row["dtype"])))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": shape_name, "seed": seed}
    return {"meta": meta, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "—" if value is None else f"{value:.1e}"

    lines = [f"Device: {report['meta']['device']} · torch {report['meta']['torch']} · shape "
             f"{report['meta']['shape']}; relative errors (norm-wise) against float64 on the same device; fp16 "
             f"gradients with a loss scale of {LOSS_SCALES.get(torch.float16)}",
             "", "| dtype | method | adapter dtypes | logits | base model alone | merged | grads | grads, bank off "
             "| grads, plain formula | unmerge drift | worst single gradient | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in report["rows"]:
        where = row["grads_worst_tensor"].split(".adapters.")
        worst = f"{fmt(row['grads_worst'])} {where[-1].removeprefix('default.')} ({row['grads_worst_dtype']})"
        lines.append(
            f"| {row['dtype']} | {row['method']} | {','.join(row['adapter_dtypes'])} | {fmt(row['logits'])} | "
            f"{fmt(row['base_model_logits_error'])} | {fmt(row.get('merged'))} | {fmt(row['grads'])} | "
            f"{fmt(row['unbanked_grads'])} | {fmt(row['generic_grads'])} | {fmt(row.get('unmerge_drift'))} | "
            f"{worst} | {'ok' if not row['failures'] else 'FAIL: ' + '; '.join(row['failures'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS] + [d for d in dtypes if d not in TOLERANCES]
    if unknown:
        parser.error(f"unknown method or dtype: {unknown}")
    report = run(torch.device(args.device), dtypes, args.shape, methods, args.seed)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    failed = [r for r in report["rows"] if r["failures"]]
    print(f"cuda_check: {len(report['rows']) - len(failed)} rows within tolerance, {len(failed)} outside", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
