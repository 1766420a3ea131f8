"""Why `merge_adapter` refuses on a 4-bit base: how far re-quantizing W + ΔW to nf4 moves the update.

    python benchmarks/quantized_bases.py ...   # once: writes the fp32 SmolLM2-135M folder (default cache below)
    python benchmarks/requantize_error.py [--weights /tmp/smollm2-135m-fp32]

For q_proj, v_proj and down_proj of layers 0, 10 and 20 of SmolLM2-135M, a rank-8 ΔW scaled to
||ΔW|| = rho·||W||: the update the re-quantized model applies is Q(W + ΔW) - Q(W) (bitsandbytes nf4, block 64,
double quantization). Printed: its error relative to ΔW, and the fraction of ΔW it keeps (projection).
Results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch


def main() -> None:
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="/tmp/smollm2-135m-fp32")
    weights = load_file(glob.glob(os.path.join(parser.parse_args().weights, "*.safetensors"))[0])
    names = [k for k in weights if any(p in k for p in ("q_proj", "v_proj", "down_proj"))
             and any(f"layers.{i}." in k for i in (0, 10, 20))]

    def nf4(x: torch.Tensor) -> torch.Tensor:
        packed, state = bnb_functional.quantize_4bit(x.contiguous(), quant_type="nf4", blocksize=64,
                                                     compress_statistics=True)
        return bnb_functional.dequantize_4bit(packed, state).float()

    generator = torch.Generator().manual_seed(0)
    for rho in (1e-3, 1e-2, 1e-1):
        errors, kept = [], []
        for name in names:
            w = weights[name].float()
            delta = torch.randn(w.shape[0], 8, generator=generator) @ torch.randn(8, w.shape[1], generator=generator)
            delta *= rho * w.norm() / delta.norm()
            realised = nf4(w + delta) - nf4(w)
            errors.append(float((realised - delta).norm() / delta.norm()))
            kept.append(float((realised * delta).sum() / delta.norm() ** 2))
        errors.sort()
        kept.sort()
        print(f"||dW||/||W|| = {rho:g}: |Q(W+dW) - Q(W) - dW| / |dW| median {errors[len(errors) // 2]:.2f} "
              f"(range {errors[0]:.2f}-{errors[-1]:.2f}); share of dW kept (projection) median {kept[len(kept) // 2]:.2f}"
              f" over {len(names)} matrices")


if __name__ == "__main__":
    main()
