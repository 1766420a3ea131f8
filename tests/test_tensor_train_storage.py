"""Tensor-train cores stored in one flat parameter per adapter (issue 30): as many trainable tensors as LoRA, the
same state dicts (one tensor per core, the authors' names), the same values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, adapted_layers, get_peft_model
from structlora.tensor_train import TTLinear, TTMatrix, contract_train

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def rep_model(seed: int = 1):
    base = tiny_llama()
    torch.manual_seed(seed)  # the adapter's initialisation
    return get_peft_model(base, LorettaRepConfig(r=4, tensor_rank=3, target_modules=ALL_LINEAR, init="reference"))


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def test_one_trainable_tensor_per_adapted_module_no_more_than_lora() -> None:
    model = rep_model()
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=ALL_LINEAR))
    modules = len(list(adapted_layers(model)))
    norms = sum(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    assert modules == 14 and norms == 5  # 2 layers x 7 projections; 2 x 2 layer norms + the final norm
    assert len(trainable(model)) == modules + norms == 19
    assert len(trainable(lora)) == 2 * modules == 28
    # ... holding exactly the cores: as many numbers as before, one state-dict entry per core.
    trains = [m for m in model.modules() if isinstance(m, TTMatrix)]
    cores = [core for train in trains for core in train.cores]
    assert sum(p.numel() for p in trainable(model)) == sum(c.numel() for c in cores) + 5 * 32
    assert sum(".cores." in key for key in model.adapter_state_dict()) == len(cores) > len(trainable(model))


def test_a_fused_projection_keeps_a_and_every_b_block_in_one_parameter() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    model = get_peft_model(base, LorettaRepConfig(r=4, tensor_rank=3, target_modules=["c_attn"],
                                                  enable_lora=[True, False, True], train_norms=False))
    (name, parameter), = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert name.endswith("parameterization.flat_cores")
    keys = [k for k in model.adapter_state_dict() if ".cores." in k]
    assert {k.split("parameterization.")[1].split(".cores.")[0] for k in keys} == {"lora_A", "lora_B.0", "lora_B.1"}
    assert parameter.numel() == sum(model.adapter_state_dict()[k].numel() for k in keys)


def test_state_dict_has_one_view_per_core_and_loads_into_another_model() -> None:
    source, target = rep_model(seed=1), rep_model(seed=2)
    state = source.base_model.state_dict()
    assert not any("flat_cores" in key for key in state)
    train = next(m for n, m in source.base_model.named_modules() if n.endswith("q_proj.adapters.default"
                                                                            ".parameterization.lora_A"))
    for k, core in enumerate(train.cores):
        key = next(key for key in state if key.endswith(f"q_proj.adapters.default.parameterization.lora_A.cores.{k}"))
        assert state[key].shape == train.core_shapes[k] and torch.equal(state[key], core)
    with torch.no_grad():
        assert not torch.equal(source(input_ids=IDS).logits, target(input_ids=IDS).logits)
    target.base_model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(source(input_ids=IDS).logits, target(input_ids=IDS).logits)
    assert all(torch.equal(v, target.adapter_state_dict()[k]) for k, v in source.adapter_state_dict().items())


def test_load_state_dict_refuses_a_misshapen_or_missing_core() -> None:
    model = rep_model()
    state = model.base_model.state_dict()
    key = next(k for k in state if k.endswith("parameterization.lora_A.cores.1"))
    bad = dict(state) | {key: torch.zeros(2, 2, 2)}
    with pytest.raises(RuntimeError, match=rf"size mismatch for {key}"):
        model.base_model.load_state_dict(bad)
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError, match="flat_cores"):  # strict: the whole train is missing, cores unexpected
        model.base_model.load_state_dict(partial)


def test_set_peft_model_state_dict_writes_the_flat_parameters() -> None:
    from peft.utils import set_peft_model_state_dict

    source, target = rep_model(seed=1), rep_model(seed=2)
    flats = [p for n, p in target.named_parameters() if n.endswith("flat_cores")]
    before = [p.clone() for p in flats]
    set_peft_model_state_dict(target, source.adapter_state_dict())  # PEFT's loader of a checkpoint's tensors
    assert len(flats) == 14 and all(not torch.equal(b, p) for b, p in zip(before, flats))
    assert all(torch.equal(a, b) for a, b in zip(trainable(source), trainable(target)))


def test_deepcopy_and_dtype_moves_slice_the_copys_own_parameter() -> None:
    model = rep_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in trainable(twin):
            p.mul_(2)
    trains = [m for m in model.modules() if isinstance(m, TTMatrix)]
    twin_trains = [m for m in twin.modules() if isinstance(m, TTMatrix)]
    for train, twin_train in zip(trains, twin_trains):
        assert twin_train.core_storage is not train.core_storage
        assert all(torch.equal(2 * a, b) for a, b in zip(train.cores, twin_train.cores))
    model.to(torch.float64)
    assert all(core.dtype == torch.float64 for train in trains for core in train.cores)
    assert all(train.core_storage is p for train in trains
               for p in [train._home.owner._parameters["flat_cores"]])


@pytest.mark.parametrize("factory", ["rep", "adp"])
def test_gradients_equal_those_of_separate_core_tensors(factory: str) -> None:
    """The flat parameter's gradient, core by core, is the gradient each core had as its own leaf tensor."""
    torch.manual_seed(0)
    if factory == "rep":
        model = get_peft_model(tiny_llama(), LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj"],
                                                              init="reference", train_norms=False))
    else:
        model = get_peft_model(tiny_llama(), LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, init="reference"))
    trains = [m for m in model.modules() if isinstance(m, TTMatrix)]
    weights = [torch.randn(train.rows, train.cols, generator=torch.Generator().manual_seed(i))
               for i, train in enumerate(trains)]
    loss = sum((train.matrix() * w).sum() for train, w in zip(trains, weights))
    loss.backward()
    for train, w in zip(trains, weights):
        leaves = [core.detach().clone().requires_grad_(True) for core in train.cores]
        (contract_train(leaves, train.rows, train.cols) * w).sum().backward()
        for leaf, grad in zip(leaves, train.core_views(train.core_storage.grad)):
            torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=0)
    if factory == "adp":
        assert all(m.weight_tt.core_storage is m.weight_tt.flat_cores for m in model.modules()
                   if isinstance(m, TTLinear))


def test_a_partitioned_flat_parameter_keeps_its_name_in_the_state_dict() -> None:
    """ZeRO-3 leaves an empty partition in a parameter outside its gather (DeepSpeed saves the module state then):
    no core can be sliced out of it, so the state dict names the parameter itself."""
    model = rep_model()
    parameterization = next(m for n, m in model.base_model.named_modules() if n.endswith("q_proj.adapters.default"
                                                                                         ".parameterization"))
    whole = parameterization.flat_cores.data
    parameterization.flat_cores.data = torch.empty(0)
    keys = [k for k in parameterization.state_dict()]
    assert keys == ["flat_cores"]
    parameterization.flat_cores.data = whole
    assert [k for k in parameterization.state_dict()][0] == "lora_A.cores.0"


def test_a_loretta_rep_layer_compiles_without_graph_breaks() -> None:
    from torch import nn

    from structlora.layers import LowRankLayer

    torch.manual_seed(0)
    layer = LowRankLayer(nn.Linear(16, 12))
    layer.add_adapter("default", LorettaRepConfig(r=4, tensor_rank=2, init="reference"), None)
    x = torch.randn(3, 16)
    storage = [p for p in layer.adapters.parameters()]
    assert len(storage) == 1  # A and B in one flat parameter
    eager_out = layer(x)
    eager_grad, = torch.autograd.grad(eager_out.sum(), storage)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    out = compiled(x)
    grad, = torch.autograd.grad(out.sum(), storage)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-6)
    assert grad.abs().sum() > 0
