"""The fused low-rank path equals the plain formula in outputs and in every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from structlora import engine
from structlora.config import LoraConfig, MTLoraConfig
from structlora.layers import LowRankLayer


def plain(x, weight, bias, a_eff, b, scaling):
    out = x @ weight.t() + scaling * (x @ a_eff.t()) @ b.t()
    return out if bias is None else out + bias


@pytest.mark.parametrize("dtype,factor_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                    (torch.bfloat16, torch.bfloat16, 3e-2),
                                                    (torch.bfloat16, torch.float32, 3e-2),
                                                    (torch.float16, torch.float16, 5e-3),
                                                    (torch.float16, torch.float32, 5e-3)],
                         ids=["fp32", "bf16", "bf16-with-fp32-factors", "fp16", "fp16-with-fp32-factors"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scaling", [1.5, 1.0])
def test_fused_function_matches_the_formula(dtype, factor_dtype, tol, with_bias, scaling):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 24, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True) if with_bias else None
    a_eff = torch.randn(6, 24, dtype=factor_dtype, requires_grad=True)
    b = torch.randn(40, 6, dtype=factor_dtype, requires_grad=True)
    leaves = [t for t in (x, weight, bias, a_eff, b) if t is not None]
    grad_out = torch.randn(3, 7, 40, dtype=dtype)

    fused = engine.dense_lowrank(x, weight, bias, a_eff, b, scaling)
    assert fused.dtype == dtype
    fused_grads = torch.autograd.grad(fused, leaves, grad_out)
    reference = plain(x.float(), weight.float(), None if bias is None else bias.float(), a_eff.float(), b.float(),
                      scaling)
    reference_grads = torch.autograd.grad(reference, leaves, grad_out.float())
    scale = float(reference.abs().max())
    assert torch.allclose(fused.float(), reference, atol=tol * scale, rtol=tol)
    for leaf, got, want in zip(leaves, fused_grads, reference_grads):
        assert got.dtype == leaf.dtype  # fp32 factors get fp32 gradients
        want = want.float()
        assert torch.allclose(got.float(), want, atol=tol * float(want.abs().max()), rtol=tol)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(24, 40), lambda: Conv1D(40, 24), lambda: nn.Linear(24, 40, bias=False)],
                         ids=["linear", "conv1d", "linear-nobias"])
@pytest.mark.parametrize("config", [LoraConfig(r=4, lora_alpha=8), MTLoraConfig(r=4, structure="icfm")],
                         ids=["lora", "mtlora-icfm"])
def test_layer_fast_path_equals_generic_path(make_base, config, monkeypatch):
    torch.manual_seed(0)
    layer = LowRankLayer(make_base())
    layer.add_adapter("default", config, None)
    with torch.no_grad():
        for parameter in layer.adapters.parameters():
            parameter.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = layer(x)
        params = [x] + list(layer.adapters.parameters())
        return out, list(torch.autograd.grad(out.pow(2).sum(), params))

    calls = []
    original = engine._DenseLowRank.apply
    monkeypatch.setattr(engine._DenseLowRank, "apply", lambda *a: calls.append(1) or original(*a))
    fast_out, fast_grads = run()
    assert calls, "the fused path was not taken"
    monkeypatch.setattr(LowRankLayer, "_fast_path_weight", lambda self, adapter: None)
    slow_out, slow_grads = run()
    assert torch.allclose(fast_out, slow_out, atol=1e-5)
    for got, want in zip(fast_grads, slow_grads):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
        assert got.abs().sum() > 0


def test_dropout_takes_the_generic_path():
    layer = LowRankLayer(nn.Linear(8, 8))
    layer.add_adapter("default", LoraConfig(r=2, lora_dropout=0.1), None)
    assert layer._fast_path_weight(layer.adapters["default"]) is None


@pytest.mark.parametrize("config", [MTLoraConfig(r=4, structure="dtsm"), LoraConfig(r=4, lora_dropout=0.1)],
                         ids=["fused-mtlora", "generic-dropout"])
def test_adapter_path_compiles_without_graph_breaks(config):
    torch.manual_seed(0)
    layer = LowRankLayer(nn.Linear(16, 16))
    layer.add_adapter("default", config, None)
    layer.eval()
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    out = compiled(x)
    assert torch.allclose(out, layer(x), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fused_path_with_fp32_adapters_on_a_bf16_layer_compiles_and_matches_eager():
    torch.manual_seed(0)
    layer = LowRankLayer(nn.Linear(16, 16).to(torch.bfloat16))
    layer.add_adapter("default", LoraConfig(r=4), None)
    with torch.no_grad():
        for parameter in layer.adapters.parameters():
            parameter.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)

    def run(module):
        out = module(x)
        grads = torch.autograd.grad(out.float().sum(), list(layer.adapters.parameters()))
        return out, grads

    eager_out, eager_grads = run(layer)
    compiled_out, compiled_grads = run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    assert compiled_out.dtype == torch.bfloat16 and torch.equal(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        assert got.dtype == torch.float32 and torch.equal(got, want) and got.abs().sum() > 0


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "generic"])
def test_autocast_bf16_over_fp32_weights(fast, monkeypatch):
    """Trainer --bf16 runs the fp32 model under autocast: the adapter path must follow autocast's dtype."""
    torch.manual_seed(0)
    layer = LowRankLayer(nn.Linear(16, 24))
    layer.add_adapter("default", LoraConfig(r=4), None)
    with torch.no_grad():
        for parameter in layer.adapters.parameters():
            parameter.normal_()
    if not fast:
        monkeypatch.setattr(LowRankLayer, "_fast_path_weight", lambda self, adapter: None)
    x = torch.randn(5, 16)
    reference = layer(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=3e-2 * float(reference.abs().max()))
    out.float().sum().backward()
    for parameter in layer.adapters.parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32 and parameter.grad.abs().sum() > 0
