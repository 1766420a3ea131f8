"""Inference without autograd: the factor cache and the lean path compute what the training path computes, reuse
factors across forwards, and never serve a stale factor after a mutation."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import structlora.engine as engine
import structlora.norms as norms
from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, get_peft_model
from structlora.inference import clear_factor_caches
from structlora.bottleneck_layers import BottleneckAdapter
from structlora.layers import LowRankAdapter
from structlora.tensor_train import TTMatrix


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=64))


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_alpha=8),
    "mtlora-icfm": lambda: MTLoraConfig(r=4, structure="icfm", init="reference"),
    "rep": lambda: LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"]),
    "adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, init="reference"),
    "adp-dense-learned": lambda: LorettaAdpConfig(bottleneck_size=8, tensorized=False, scaling="learned",
                                                  non_linearity="gelu", init="reference"),
    "adp-parallel": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, use_parallel_adapter=True,
                                             non_linearity="silu", init="reference"),
}
# Drawn on the CPU (seeded) and moved, so STRUCTLORA_TEST_DEVICE=cuda runs the same ids.
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0), device="cpu").to(torch.empty(0).device)


def adapted(kind: str) -> nn.Module:
    model = get_peft_model(tiny_llama(), CONFIGS[kind]())
    randomize(model, seed=1)
    return model.eval()


def randomize(model: nn.Module, seed: int) -> None:
    """Non-zero updates everywhere (as an optimizer step would write them: in place, under no_grad)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)


def uncached(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The training path: autograd on, every factor computed in this forward."""
    with torch.enable_grad():
        return model(input_ids=ids).logits.detach()


def cached(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.dtype == want.dtype
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_no_grad_forward_equals_the_training_path_and_reuses_factors(kind: str, monkeypatch) -> None:
    model = adapted(kind)
    want = uncached(model)
    assert_close(cached(model), want)
    # Second and third forwards: nothing is rebuilt, no autograd Function runs.
    calls = {"factors": 0}
    for cls in (LowRankAdapter, BottleneckAdapter):
        for method in ("_transposed_factors", "_dense_projections"):
            if hasattr(cls, method):
                original = getattr(cls, method)

                def counting(self, *args, original=original):
                    calls["factors"] += 1
                    return original(self, *args)
                monkeypatch.setattr(cls, method, counting)
    monkeypatch.setattr(engine._DenseLowRank, "apply", None)  # would raise if called
    monkeypatch.setattr(norms._RMSNorm, "apply", None)
    assert_close(cached(model), want)
    with torch.inference_mode():
        assert_close(model(input_ids=IDS).logits, want)
    assert calls["factors"] == 0


def test_greedy_generation_matches_the_uncached_model() -> None:
    model = adapted("rep")
    prompt = IDS[:1, :4]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    reference = prompt
    for _ in range(6):  # argmax step by step on the training path, no KV cache
        next_token = uncached(model, reference)[:, -1].argmax(-1, keepdim=True)
        reference = torch.cat([reference, next_token], dim=1)
    assert torch.equal(generated, reference)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    # Trainer's default (adamw_torch_fused): writes parameters without moving their version counters.
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
}


@pytest.mark.parametrize("kind,optimizer_name", [("mtlora-icfm", "sgd"), ("rep", "sgd"), ("adp-dense-learned", "sgd"),
                                                 ("mtlora-icfm", "adamw-fused"), ("adp-dense-learned", "adamw-fused")])
def test_an_optimizer_step_invalidates(kind: str, optimizer_name: str) -> None:
    model = adapted(kind)
    before = cached(model)
    model.train()
    optimizer = OPTIMIZERS[optimizer_name]([p for p in model.parameters() if p.requires_grad])
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    model.eval()
    after = cached(model)
    assert_close(after, uncached(model))
    assert (after - before).abs().max() > 1e-4  # the step changed the outputs, and the cache saw it


def test_load_and_state_dict_invalidate(tmp_path) -> None:
    model, other, original_state = adapted("rep"), adapted("rep"), copy.deepcopy(adapted("rep").state_dict())
    randomize(other, seed=7)
    other.save_pretrained(str(tmp_path))
    before = cached(model)  # built every model first: a new model's parameters alone would refresh the caches
    model.load_adapter(str(tmp_path), adapter_name="default")  # new weights for the existing adapter
    after_load = cached(model)
    assert not torch.allclose(after_load, before)
    assert_close(after_load, uncached(other))
    model.load_state_dict(original_state)
    assert_close(cached(model), before)


def test_adapter_switch_merge_and_disable() -> None:
    model = adapted("mtlora-icfm")
    model.add_adapter("other", LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("other")
    randomize(model, seed=4)
    other = cached(model)
    model.set_adapter("default")
    cached(model)  # both adapters have cached factors now
    randomize(model, seed=3)  # changes only "default", the trainable one
    default = cached(model)
    assert_close(default, uncached(model))
    model.set_adapter("other")
    assert_close(cached(model), other)
    # Every transition of the adapter state machine drops the cached factors (the next forward rebuilds them).
    caches = [m._factor_cache for m in model.modules() if hasattr(m, "_factor_cache")]
    assert any(c._value is not None for c in caches)
    model.set_adapter("default")
    model(input_ids=IDS[:, :1])  # the forward that sees the new state version
    assert all(c._value is None for c in caches)
    assert_close(cached(model), default)
    with model.disable_adapter():
        base = cached(model)
        assert_close(base, uncached(model))
    model.merge_adapter()
    assert_close(cached(model), default, tol=1e-4)
    assert all(a._factor_cache._value is None for n, a in model.named_modules()
               if isinstance(a, LowRankAdapter) and n.endswith(".default"))  # merged: its cache is dropped
    model.unmerge_adapter()
    randomize(model, seed=5)
    assert_close(cached(model), uncached(model))


def test_dtype_move_and_replaced_parameters_invalidate() -> None:
    model = adapted("rep")
    cached(model)
    model.to(torch.float64)
    double = cached(model)
    assert double.dtype == torch.float64
    assert_close(double, uncached(model), tol=1e-10)
    train = next(m for m in model.modules() if isinstance(m, TTMatrix))
    owner = train._home.owner  # the module whose flat parameter holds the train's cores
    owner.flat_cores = nn.Parameter(train.core_storage.detach() * 2)  # a new Parameter object
    assert_close(cached(model), uncached(model), tol=1e-10)
    train.core_storage.data = train.core_storage.detach() * 3  # a new storage behind the same Parameter
    assert_close(cached(model), uncached(model), tol=1e-10)


def test_writes_behind_autograd_need_an_explicit_clear() -> None:
    model = adapted("rep")
    before = cached(model)
    core = next(m for m in model.modules() if isinstance(m, TTMatrix)).cores[0]
    core.data.copy_(core.data * 2)  # no version bump: the documented blind spot
    assert torch.equal(cached(model), before)  # stale, as documented
    assert clear_factor_caches(model) > 0
    assert_close(cached(model), uncached(model))
    assert not torch.allclose(cached(model), before)


def test_plain_lora_reads_its_parameters_and_sees_every_write() -> None:
    """Plain LoRA in the compute dtype computes no factor, so nothing is cached and no write can be missed."""
    model = adapted("lora")
    before = cached(model)
    adapter = next(m for m in model.modules() if isinstance(m, LowRankAdapter))
    lora_b = adapter.parameterization.lora_B
    lora_b.data.copy_(lora_b.data * 3)  # behind autograd's back: no version bump
    after = cached(model)
    assert not torch.allclose(after, before)
    assert_close(after, uncached(model))
    assert adapter._factor_cache._value is None  # never filled


@pytest.mark.parametrize("kind, hooked", [("lora", "self_attn.q_proj.base_layer"),
                                          ("mtlora-icfm", "self_attn.q_proj.base_layer"),
                                          ("adp", "mlp.down_proj.adapters.default"),
                                          ("adp-parallel", "self_attn.v_proj.adapters.default")])
def test_hooks_on_the_wrapped_modules_run_in_every_path(kind: str, hooked: str) -> None:
    """A hook on a base module or an adapter module runs: the lean path then calls that module."""
    model = adapted(kind)
    want_no_grad, want_grad = cached(model), uncached(model)
    module = model.get_base_model().model.layers[0].get_submodule(hooked)
    calls = []
    handle = module.register_forward_hook(lambda module, args, output: calls.append(1))
    assert_close(cached(model), want_no_grad)
    assert_close(uncached(model), want_grad)
    handle.remove()
    assert len(calls) == 2


def test_copies_and_pickles_carry_no_cached_factor() -> None:
    import pickle

    model = adapted("rep")
    want = cached(model)
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(m._factor_cache._value is None for m in duplicate.modules() if hasattr(m, "_factor_cache"))
        assert_close(cached(duplicate), want)


def low_precision_rep(dtype: torch.dtype) -> nn.Module:
    """LoRETTA_rep on a low-precision Llama: its trained norms are fp32 masters computed in `dtype`."""
    model = get_peft_model(tiny_llama().to(dtype), LorettaRepConfig(r=4, tensor_rank=3,
                                                                   target_modules=["q_proj", "v_proj"]))
    randomize(model, seed=1)
    return model.eval()


def test_routed_rows_use_the_low_precision_norm_copies_as_the_model_does() -> None:
    """adapter_names (structlora.mixed) runs a trained norm copy in the model's dtype too: rows equal solo rows."""
    model = low_precision_rep(torch.bfloat16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and parameter.dim() == 1:  # the norm masters: far from their bf16 values
                parameter.add_(torch.randn_like(parameter) * 0.37)
        solo = model(input_ids=IDS).logits
        routed = model(input_ids=IDS, adapter_names=["default", "default"]).logits
    assert torch.equal(routed, solo)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norm_copies_cache_their_cast_weights(dtype: torch.dtype, monkeypatch) -> None:
    from structlora.layers import TrainableCopy

    model = low_precision_rep(dtype)
    copies = [m for m in model.modules() if isinstance(m, TrainableCopy)]
    assert copies and all(c.compute_dtypes["default"] == dtype for c in copies)
    assert all(p.dtype == torch.float32 for c in copies for p in c.adapters.parameters())
    want = uncached(model)  # functional_call on weights cast in this forward
    assert want.dtype == dtype
    assert torch.equal(cached(model), want)  # same ops on the same cast weights: bit-equal
    casts = {"count": 0}
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        casts["count"] += isinstance(self, nn.Parameter)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(torch.func, "functional_call", None)  # the cached path calls the norm directly
    assert torch.equal(cached(model), want)
    assert casts["count"] == 0  # nothing cast again
    monkeypatch.undo()
    # An optimizer step (in place on the fp32 masters) and a dtype move invalidate.
    model.train()
    optimizer = torch.optim.SGD([p for c in copies for p in c.adapters.parameters()], lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.float().backward()
    optimizer.step()
    model.eval()
    stepped = uncached(model)
    assert not torch.equal(stepped, want)
    assert torch.equal(cached(model), stepped)
    norm = copies[0].adapters["default"]
    norm.weight.data = norm.weight.detach() * 2  # a new storage behind the same Parameter
    assert torch.equal(cached(model), uncached(model))
    assert not torch.equal(cached(model), stepped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_norm_in_eval_is_the_stock_computation(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    stock = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        stock.weight.normal_(1.0, 0.3)
    lean = norms.lean_norm_copy(stock)
    x = (torch.randn(3, 7, 48) * 2.5).to(dtype)
    with torch.no_grad():
        assert torch.equal(lean(x), stock(x))


def test_dropout_in_train_mode_without_grad_still_drops() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    randomize(model, seed=1)
    model.train()
    torch.manual_seed(0)
    first = cached(model)
    torch.manual_seed(1)
    assert not torch.allclose(first, cached(model))
    model.eval()
    assert_close(cached(model), uncached(model))


# -- optimizer steps that move no version counter (fused AdamW), seen without any process-wide hook ---------------
FUSED_KINDS = ("lora", "mtlora-icfm", "rep", "adp")  # "lora": lora_alpha 8, r 4 (scaling 2)


def fused_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Trainer's default on a GPU (adamw_torch_fused); on the CPU too in torch >= 2.4. Its step leaves `_version`."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)


def train_forward_backward(model: nn.Module, ids: torch.Tensor = IDS) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def train_then_eval(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Trainer's order: forward, backward, step, zero_grad (to None), then evaluation or generate()."""
    train_forward_backward(model)
    optimizer.step()
    optimizer.zero_grad()


def eval_between_backward_and_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A manual loop that evaluates after backward(): the step still to come must not be answered from then."""
    train_forward_backward(model)
    model.eval()
    cached(model)  # with the gradients present (and no forward with autograd until the check)
    optimizer.step()
    optimizer.zero_grad()


def gradients_kept_as_zeros(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    train_forward_backward(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def accumulation_with_checkpointing(model: nn.Module, optimizer: torch.optim.Optimizer, reentrant: bool) -> None:
    """Two micro-batches; each checkpointed layer runs again in backward (reentrant: first without grad)."""
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    train_forward_backward(model, IDS[:1])
    train_forward_backward(model, IDS[1:])
    optimizer.step()
    optimizer.zero_grad()
    model.activation_checkpointing_disable()


LOOPS = {"train-then-eval": train_then_eval, "eval-between-backward-and-step": eval_between_backward_and_step,
         "zero-grad-keeps-tensors": gradients_kept_as_zeros,
         "accumulation-reentrant-checkpointing": functools.partial(accumulation_with_checkpointing, reentrant=True),
         "accumulation-checkpointing": functools.partial(accumulation_with_checkpointing, reentrant=False)}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_a_fused_adamw_step_is_seen(kind: str, loop: str) -> None:
    model = adapted(kind)
    before = cached(model)  # every cache filled
    LOOPS[loop](model, fused_adamw(model))
    model.eval()
    got = cached(model)
    assert clear_factor_caches(model) > 0
    assert torch.equal(got, cached(model))  # what a model without cached factors computes, bit for bit
    assert (got - before).abs().max() > 1e-3  # the step changed the outputs


@pytest.mark.parametrize("kind", ["mtlora-icfm", "rep", "adp"])
def test_factors_are_cached_again_once_the_gradients_are_gone(kind: str, monkeypatch) -> None:
    """After training the cache serves again (gradients set to None); while gradients are kept, it computes."""
    model = adapted(kind)
    optimizer = fused_adamw(model)
    calls = {"factors": 0}
    for cls, method in ((LowRankAdapter, "_transposed_factors"), (BottleneckAdapter, "_dense_projections")):
        def counting(self, *args, original=getattr(cls, method)):
            calls["factors"] += 1
            return original(self, *args)
        monkeypatch.setattr(cls, method, counting)
    adapters = sum(isinstance(m, (LowRankAdapter, BottleneckAdapter)) for m in model.modules())
    train_then_eval(model, optimizer)
    model.eval()
    for expected in (adapters, adapters):  # computed once after the step, then served
        cached(model)
        assert calls["factors"] == adapters
    gradients_kept_as_zeros(model, optimizer)
    model.eval()
    cached(model)
    cached(model)
    assert calls["factors"] == 3 * adapters  # zero_grad(set_to_none=False): computed in every forward


def test_importing_structlora_installs_no_process_wide_hook() -> None:
    """Nothing of structlora runs for the user's other modules and optimizers (no global registration, forward or
    optimizer hook), also once a model is adapted, trained one step and run without autograd."""
    import subprocess
    import sys

    script = """
import torch, torch.nn.modules.module as m, torch.optim.optimizer as o
def hooks():
    return {name: len(getattr(source, name)) for source in (m, o) for name in dir(source)
            if name.startswith("_global_") and name.endswith("hooks")}
before = hooks()
import structlora, structlora.inference, structlora.layers, structlora.peft_tuner
from structlora import LorettaRepConfig, get_peft_model
from torch import nn
model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LorettaRepConfig(r=2, tensor_rank=2, target_modules=["0"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
model(torch.ones(2, 8)).sum().backward()
optimizer.step()
with torch.no_grad():
    model(torch.ones(2, 8))
assert "_global_parameter_registration_hooks" in before and "_global_optimizer_post_hooks" in before, before
assert hooks() == before, (before, hooks())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_parameter_registered_anew_is_seen() -> None:
    model = adapted("mtlora-icfm")
    before = cached(model)
    parameterization = next(m for m in model.modules() if isinstance(m, LowRankAdapter)).parameterization
    parameterization.lora_C = nn.Parameter(parameterization.lora_C.detach() * 3)  # another tensor, same name
    after = cached(model)
    assert not torch.allclose(after, before)
    assert_close(after, uncached(model))


@pytest.mark.parametrize("init", ["pissa", "lora-xs"])
def test_a_write_to_an_svd_starts_frozen_factors_is_seen(init: str) -> None:
    """The frozen factors of an SVD start are buffers: their version counters are in the key as the parameters'."""
    model = get_peft_model(tiny_llama(), MTLoraConfig(r=4, structure="shim", init=init,
                                                      target_modules=["q_proj", "v_proj"]))
    randomize(model, seed=1)
    model.eval()
    before = cached(model)
    state = {name: tensor * 2 for name, tensor in model.named_buffers()
             if name.endswith(("lora_A", "lora_B", "lora_A_initial", "lora_B_initial"))}
    assert len(state) == 2 * 2 * 2  # A and B (or A₀ and B₀) of q and v in 2 layers
    model.load_state_dict(state, strict=False)
    after = cached(model)
    assert not torch.allclose(after, before)
    assert_close(after, uncached(model))


@pytest.mark.parametrize("kind", ["mtlora-icfm", "adp"])
def test_a_compiled_training_forward_empties_the_cache_without_a_graph_break(kind: str) -> None:
    """torch.compile'd training (fullgraph: a break is an error), fused step, then eager evaluation: current."""
    from structlora.bottleneck_layers import BottleneckLayer
    from structlora.layers import LowRankLayer

    torch.manual_seed(0)
    if kind == "adp":
        layer = BottleneckLayer(nn.Linear(16, 16))
        layer.add_adapter("default", LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, init="reference"), "output")
    else:
        layer = LowRankLayer(nn.Linear(16, 16))
        layer.add_adapter("default", MTLoraConfig(r=4, structure="icfm", init="reference"), None)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
    assert layer.adapters["default"]._factor_cache._value is not None
    optimizer = fused_adamw(layer)
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        got = layer(x)
        assert clear_factor_caches(layer) > 0
        assert torch.equal(got, layer(x))
    assert (got - before).abs().max() > 1e-3
