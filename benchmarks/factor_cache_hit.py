"""What a factor-cache hit costs (structlora.inference): one adapted 768x768 projection's no-grad forward at the
decode shape (1x1x768), and `FactorCache.get` alone (the hit: key built and compared), timed with timeit in this
thread's CPU time (`time.thread_time`: a shared machine's other processes do not enter, as they do in wall time),
the minimum over repeats of the mean per call. Plain LoRA in fp32 reads its parameters (its forward asks no cache):
its forward is the control; its `get` row is the cost for an owner of two parameters.

    PYTHONPATH=src python benchmarks/factor_cache_hit.py [--repeats 15] [--number 2000]
"""

from __future__ import annotations

import argparse
import time
import timeit

import torch
from torch import nn

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig
from structlora.bottleneck_layers import BottleneckLayer
from structlora.layers import LowRankLayer

HIDDEN = 768


def layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    made = {}
    for name, config in (("lora (scaling 2)", LoraConfig(r=8, lora_alpha=16)),
                         ("mtlora icfm", MTLoraConfig(r=8, structure="icfm", init="reference")),
                         ("loretta_rep", LorettaRepConfig(r=8, tensor_rank=5))):
        layer = LowRankLayer(nn.Linear(HIDDEN, HIDDEN))
        layer.add_adapter("default", config, None)
        made[name] = layer.eval()
    layer = BottleneckLayer(nn.Linear(HIDDEN, HIDDEN))
    layer.add_adapter("default", LorettaAdpConfig(bottleneck_size=64, tensor_rank=5, init="reference"), "output")
    made["loretta_adp (output)"] = layer.eval()
    return made


def per_call_us(call, repeats: int, number: int) -> float:
    return min(timeit.repeat(call, repeat=repeats, number=number, timer=time.thread_time)) / number * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(1, 1, HIDDEN)
    print(f"torch {torch.__version__}, 1 thread, thread CPU time, min of {args.repeats} x {args.number} calls")
    for name, layer in layers().items():
        adapter = layer.adapters["default"]
        with torch.no_grad():
            layer(x)  # fills the cache
            forward = per_call_us(lambda: layer(x), args.repeats, args.number)
            cache, owner = adapter._factor_cache, adapter
            key = (torch.float32, adapter.scaling) if isinstance(layer, LowRankLayer) else (torch.float32,)
            value = cache._value
            get = per_call_us(lambda: cache.get(owner, key, lambda: value), args.repeats, args.number)
        print(f"{name:22s} forward {forward:7.2f} us   FactorCache.get {get:6.2f} us")


if __name__ == "__main__":
    main()
