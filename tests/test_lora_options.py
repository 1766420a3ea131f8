"""The LoRA-family options of the low-rank methods: rsLoRA scaling, LoRA+ learning rates, and the SVD starts PiSSA
and LoRA-XS; each through save/load, merge/unmerge, mixed batches and the PEFT export."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import TrainingArguments

from structlora import (AdapterTrainer, LoraConfig, LorettaRepConfig, MTLoraConfig, PeftModel,
                        create_loraplus_optimizer, export_to_peft, get_peft_model)
from structlora.layers import LowRankLayer
from structlora.loraplus import loraplus_parameter_groups
from structlora.model import adapted_layers
from structlora.serving import sglang_problems, vllm_problems
from structlora.svd_init import pissa_residual, weight_out_by_in
from test_core import inputs, outputs, randomize_adapters, tiny_gpt2, tiny_llama
from test_glue_train import data_dir, tiny_bert, train  # noqa: F401 (fixtures)

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _low_rank_layers(model) -> list[tuple[str, LowRankLayer]]:
    return [(name, layer) for name, layer in adapted_layers(model) if isinstance(layer, LowRankLayer)]


def _factors(layer: LowRankLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Effective A (R x in), T (R x R), B (out x R) and the scaling of the default adapter."""
    adapter = layer.adapters["default"]
    a, t, b = adapter.parameterization.factors()
    return a, (torch.eye(a.shape[0]) if t is None else t), b, adapter.scaling


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return outputs(model, "logits")


def _export_matches(model, base, tmp_path) -> dict:
    export_to_peft(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)
    with open(tmp_path / "adapter_config.json") as handle:
        return json.load(handle)


# -- rsLoRA ------------------------------------------------------------------------------------------------------

RSLORA_CASES = [
    ("lora", tiny_llama, lambda: LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=LLAMA_TARGETS)),
    ("mtlora-gpt2-fused", tiny_gpt2,
     lambda: MTLoraConfig(r=4, lora_alpha=8, use_rslora=True, structure="ctcm", target_modules=["c_attn", "c_fc"],
                          enable_lora={"c_attn": [True, False, True]})),
    ("loretta-rep", tiny_llama, lambda: LorettaRepConfig(r=4, tensor_rank=3, use_rslora=True, train_norms=False,
                                                         target_modules=["q_proj", "v_proj"])),
]


def test_rslora_scaling_is_alpha_over_root_r():
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=8).scaling == 0.5
    assert MTLoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert LorettaRepConfig(r=9, use_rslora=True).scaling == 16 / 3
    with pytest.raises(TypeError, match="use_rslora must be true or false"):
        LoraConfig(use_rslora="yes")


@pytest.mark.parametrize("case_id,build,make_config", RSLORA_CASES, ids=[c[0] for c in RSLORA_CASES])
def test_rslora_delta_save_load_merge_and_export(case_id, build, make_config, tmp_path):
    base = build()
    config = make_config()
    model = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_adapters(model)
    expected_scaling = config.lora_alpha / math.sqrt(config.r)
    for _, layer in _low_rank_layers(model):
        a, t, b, scaling = _factors(layer)
        assert scaling == pytest.approx(expected_scaling, rel=1e-12)
        delta = expected_scaling * b @ t @ a
        assert torch.allclose(layer.get_delta_weight(), delta, atol=1e-6)
    expected = _logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert loaded.peft_config["default"].use_rslora is True
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)
    loaded.merge_adapter()
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    loaded.unmerge_adapter()
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    exported = _export_matches(model, base, tmp_path / "peft")
    assert exported["use_rslora"] is True
    if case_id != "mtlora-gpt2-fused":  # vLLM serves it; SGLang ignores use_rslora, and its check says so
        assert vllm_problems(str(tmp_path / "peft"), max_lora_rank=64) == []
        assert sglang_problems(str(tmp_path / "peft"), max_lora_rank=64) == [
            "use_rslora: SGLang scales by lora_alpha / r, not lora_alpha / sqrt(r)"]
    # The scaling is folded into lora_B: PEFT's alpha/√r must be exactly 1 for every module.
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    scalings = {s for m in peft_model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)
                for s in m.scaling.values()}
    assert scalings == {1.0}


# -- LoRA+ -------------------------------------------------------------------------------------------------------

def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_loraplus_groups_lora_mtlora_and_embeddings():
    model = get_peft_model(tiny_llama(), MTLoraConfig(r=4, structure="ctcm",
                                                      target_modules=["q_proj", "v_proj", "embed_tokens"]))
    groups = {g["name"]: g for g in loraplus_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=16,
                                                               weight_decay=0.1, loraplus_lr_embedding=1e-6)}
    assert set(groups) == {"A", "B", "embedding"}
    assert (groups["A"]["lr"], groups["B"]["lr"], groups["embedding"]["lr"]) == (1e-3, 1e-3 * 16, 1e-6)
    assert {g["weight_decay"] for g in groups.values()} == {0.1}
    a_names, b_names, embedding_names = (_names(model, groups[k]) for k in ("A", "B", "embedding"))
    projections = [n for n, _ in _low_rank_layers(model) if "embed" not in n]
    assert len(projections) == 4
    assert b_names == {f"base_model.model.{n}.adapters.default.parameterization.lora_B" for n in projections}
    assert a_names == {f"base_model.model.{n}.adapters.default.parameterization.lora_{x}" for n in projections
                       for x in "ACD"}  # T's C and D stay with A
    assert embedding_names == {f"base_model.model.model.embed_tokens.adapters.default.parameterization.lora_{x}"
                               for x in "ABCD"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert a_names | b_names | embedding_names == trainable


def test_loraplus_groups_tensor_train_cores_by_the_factor_they_build():
    model = get_peft_model(tiny_llama(), LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj"]))
    randomize_adapters(model)
    before, state_before = outputs(model, "logits"), {k: v.clone() for k, v in model.adapter_state_dict().items()}
    groups = {g["name"]: g for g in loraplus_parameter_groups(model, lr=2e-4, loraplus_lr_ratio=4,
                                                               decay_parameter_names=set())}
    # Splitting the storage changes no value and no saved name.
    assert torch.equal(outputs(model, "logits"), before)
    state_after = model.adapter_state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert (groups["A"]["lr"], groups["B_no_decay"]["lr"]) == (2e-4, 8e-4)
    assert "B" not in groups  # no name is decayed
    a_names, b_names = _names(model, groups["A"]), _names(model, groups["B_no_decay"])
    # The adapter's one flat core parameter is split by factor: A's cores at lr, B's at lr * ratio.
    assert a_names == {n for n, _ in model.named_parameters() if n.endswith(".lora_A.flat_cores")} != set()
    b_cores = {n for n in b_names if ".lora_B." in n}
    assert b_cores == {n for n, _ in model.named_parameters() if n.endswith(".lora_B.flat_cores")} != set()
    assert len(b_cores) == len(a_names)  # one per adapted module each: LoRA's count
    # The trained norms (1-D) go with B, as in the LoRA+ authors' code and PEFT's.
    assert b_names - b_cores == {n for n, p in model.named_parameters()
                                 if p.requires_grad and p.ndim == 1 and not n.endswith(".flat_cores")}


def test_loraplus_refuses_an_adapter_without_a_trained_b():
    model = get_peft_model(tiny_llama(), MTLoraConfig(r=4, init="lora-xs", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="trains none .*LoRA-XS freezes A and B"):
        loraplus_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        loraplus_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=0)


def test_trainer_creates_the_loraplus_optimizer(tmp_path):
    model = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.01, use_cpu=True,
                             report_to=[], optim="adamw_torch")
    trainer = AdapterTrainer(model=model, args=args, loraplus_lr_ratio=8)
    optimizer = trainer.create_optimizer()
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {"A", "B"}
    assert (by_name["A"]["lr"], by_name["B"]["lr"]) == (3e-4, 3e-4 * 8)
    assert by_name["A"]["weight_decay"] == by_name["B"]["weight_decay"] == 0.01
    assert all(n.endswith("lora_B") for n in _names(model, by_name["B"])) and len(by_name["B"]["params"]) == 4
    plain = AdapterTrainer(model=model, args=args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {3e-4}
    direct = create_loraplus_optimizer(model, torch.optim.SGD, {"lr": 0.1}, loraplus_lr_ratio=2)
    assert sorted(g["lr"] for g in direct.param_groups) == [0.1, 0.2]
    with pytest.raises(ValueError, match="an optimizer was given"):
        AdapterTrainer(model=model, args=args, loraplus_lr_ratio=8, optimizers=(direct, None))
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        AdapterTrainer(model=model, args=args, loraplus_lr_ratio=-1)
    chosen = AdapterTrainer(model=model, args=args, loraplus_lr_ratio=8,
                            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5})).create_optimizer()
    assert type(chosen) is torch.optim.SGD and sorted(g["lr"] for g in chosen.param_groups) == [0.5, 4.0]


# -- PiSSA ----------------------------------------------------------------------------------------------------------

PISSA_CASES = [
    ("lora", tiny_llama, lambda: LoraConfig(r=4, lora_alpha=8, init="pissa", target_modules=LLAMA_TARGETS)),
    ("lora-rslora-embedding", tiny_llama,
     lambda: LoraConfig(r=4, lora_alpha=8, init="pissa", use_rslora=True, target_modules=["embed_tokens", "v_proj"])),
    ("mtlora-icfm", tiny_llama, lambda: MTLoraConfig(r=4, init="pissa", structure="icfm", target_modules=LLAMA_TARGETS)),
    ("mtlora-dtsm-gpt2-fused", tiny_gpt2,
     lambda: MTLoraConfig(r=2, lora_alpha=4, init="pissa", structure="dtsm", target_modules=["c_attn", "c_fc"],
                          enable_lora={"c_attn": [True, False, True]})),
]


@pytest.mark.parametrize("case_id,build,make_config", PISSA_CASES, ids=[c[0] for c in PISSA_CASES])
def test_pissa_starts_at_the_principal_part_of_w(case_id, build, make_config):
    base = build()
    expected = _logits(base)
    config = make_config()
    model = get_peft_model(copy.deepcopy(base), config).eval()
    assert torch.allclose(_logits(model), expected, atol=1e-5)
    for name, layer in _low_rank_layers(model):
        weight = weight_out_by_in(layer.base_layer)
        a, t, b, scaling = _factors(layer)
        delta = scaling * b @ t @ a
        residual = pissa_residual(layer)
        assert torch.allclose(residual + delta, weight, atol=1e-5), name
        assert torch.equal(t, torch.eye(t.shape[0])), name  # T starts at I
        enabled = layer.adapters["default"].parameterization.enabled_slices
        size = weight.shape[0] // len(enabled)
        for index, on in enumerate(enabled):
            rows = slice(index * size, (index + 1) * size)
            singular = torch.linalg.svdvals(weight[rows])
            if not on:
                assert torch.equal(delta[rows], torch.zeros_like(delta[rows]))
                continue
            # s·B₀·A₀ is the best rank-r approximation: the residual keeps the singular values from r on.
            assert torch.allclose(torch.linalg.svdvals(residual[rows])[: len(singular) - config.r],
                                  singular[config.r:], atol=1e-4), name


@pytest.mark.parametrize("case_id,build,make_config", PISSA_CASES, ids=[c[0] for c in PISSA_CASES])
def test_pissa_round_trips_on_the_original_base(case_id, build, make_config, tmp_path):
    base = build()
    base_logits = _logits(base)
    model = get_peft_model(copy.deepcopy(base), make_config()).eval()
    randomize_adapters(model)
    expected = _logits(model)
    assert not torch.allclose(expected, base_logits, atol=1e-3)
    with model.disable_adapter():  # the base weights are the base model's
        assert torch.equal(_logits(model), base_logits)
    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.merge_adapter()
    assert torch.allclose(_logits(model), expected, atol=1e-5)
    model.unmerge_adapter()
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.named_parameters() if n in weights)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)
    # PEFT's conversion back to a LoRA on the ORIGINAL base: rank 2r, ΔW = s·B·T·A − s·B₀·A₀.
    exported = _export_matches(model, base, tmp_path / "peft")
    layers = _low_rank_layers(model)
    ranks = {exported["rank_pattern"].get(name, exported["r"]) for name, _ in layers}
    assert ranks == {2 * layer.adapters["default"].parameterization.rank_dim for _, layer in layers}


def test_svd_starts_in_a_mixed_batch_with_plain_lora_and_the_base():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init="pissa", target_modules=LLAMA_TARGETS)).eval()
    model.add_adapter("plain", LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.add_adapter("xs", MTLoraConfig(r=4, init="lora-xs", structure="dtsm", target_modules=["q_proj", "v_proj"]))
    for seed, name in enumerate(["default", "plain", "xs"]):
        model.set_adapter(name)
        randomize_adapters(model, seed=seed)  # the active adapter's trainable tensors
    names = ["default", "plain", "xs", "__base__"]
    batch = {"input_ids": torch.randint(0, 90, (4, 9), generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        alone = []
        for row, name in enumerate(names):
            row_batch = {k: v[row:row + 1] for k, v in batch.items()}
            if name == "__base__":
                alone.append(base(**row_batch).logits[0])
                continue
            model.set_adapter(name)
            alone.append(model(**row_batch).logits[0])
    assert torch.allclose(mixed, torch.stack(alone), atol=1e-5)
    assert not torch.allclose(alone[0], alone[3], atol=1e-3)


def test_pissa_refuses_dropout_and_a_rank_above_the_weight():
    with pytest.raises(ValueError, match="init 'pissa' needs lora_dropout=0"):
        LoraConfig(init="pissa", lora_dropout=0.1)
    with pytest.raises(ValueError, match="unknown init 'pissa'; valid values: default, reference"):
        LorettaRepConfig(init="pissa")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.v_proj': .*r=40 needs r <= min\(out, in\) = 16"):
        get_peft_model(tiny_llama(), LoraConfig(r=40, init="pissa", target_modules=["v_proj"]))


# -- LoRA-XS --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure,per_layer", [("shim", 1), ("ctcm", 2), ("dtsm", 2)])
def test_lora_xs_trains_only_t(structure, per_layer):
    base = tiny_llama()
    expected = _logits(base)
    r = 4
    model = get_peft_model(copy.deepcopy(base), MTLoraConfig(r=r, init="lora-xs", structure=structure,
                                                             target_modules=LLAMA_TARGETS))
    layers = _low_rank_layers(model)
    assert len(layers) == 6
    assert model.get_nb_trainable_parameters()[0] == len(layers) * per_layer * r * r
    assert torch.equal(_logits(model.eval()), expected)  # T = 0
    for _, layer in layers:
        weight = weight_out_by_in(layer.base_layer)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        a, t, b, _ = _factors(layer)
        assert torch.allclose(b @ a, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-5)
        assert torch.equal(t, torch.zeros(r, r))
    frozen = {n: t.clone() for n, t in model.state_dict().items() if ".lora_A" in n or ".lora_B" in n}
    t_before = {n: _factors(layer)[1].detach().clone() for n, layer in layers}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = model(**inputs(), labels=inputs()["input_ids"]).loss
        loss.backward()
        if step == 0:  # at T = 0 every C has a gradient (A and B are non-zero); ctcm's D only once C has moved
            c_grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_C")]
            assert len(c_grads) == len(layers) and all(float(g.abs().sum()) > 0 for g in c_grads)
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in frozen.items())
    assert all(not torch.equal(_factors(layer)[1], t_before[n]) for n, layer in layers)


def test_lora_xs_round_trips(tmp_path):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), MTLoraConfig(r=4, init="lora-xs", structure="shim",
                                                             target_modules=LLAMA_TARGETS)).eval()
    randomize_adapters(model)
    expected = _logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)
    loaded.merge_adapter()
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    # Into an MTLoRA config without the SVD start (same tensor names and shapes): refused, since its A and B would
    # be trained; the adapter keeps its values.
    plain = get_peft_model(copy.deepcopy(base), MTLoraConfig(r=4, structure="shim", target_modules=LLAMA_TARGETS))
    before = {k: v.clone() for k, v in plain.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="svd_start: weights saved with 'lora-xs', config has None"):
        plain.load_adapter(str(tmp_path / "adapter"), adapter_name="default")  # new weights for the existing one
    assert all(torch.equal(plain.adapter_state_dict()[k], v) for k, v in before.items())
    loaded.unmerge_adapter()
    exported = _export_matches(model, base, tmp_path / "peft")
    assert exported["r"] == 4


def test_lora_xs_refuses_icfm_and_lora():
    with pytest.raises(ValueError, match="icfm's T = C·Cᵀ is 0 only at C = 0"):
        MTLoraConfig(init="lora-xs", structure="icfm")
    with pytest.raises(ValueError, match="unknown init 'lora-xs'; valid values: default, pissa"):
        LoraConfig(init="lora-xs")


# -- quantized bases ------------------------------------------------------------------------------------------------

def test_svd_starts_refuse_a_quantized_base_until_it_is_dequantized(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from structlora.quantized import dequantize_model
    from tiny_models import tiny_llama_for, tiny_word_tokenizer

    tiny_llama_for(tiny_word_tokenizer(), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    ids = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    for options, kind in ((dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                           "Linear4bit"), (dict(load_in_8bit=True), "Linear8bitLt")):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**options),
                                                     device_map="cpu", dtype=torch.float32).train()
        for config in (LoraConfig(r=4, init="pissa", target_modules=["q_proj"]),
                       MTLoraConfig(r=4, init="lora-xs", target_modules=["q_proj"])):
            with pytest.raises(ValueError, match=rf"'model.layers.0.self_attn.q_proj': an SVD start .* bitsandbytes "
                                                 rf"{kind}.* Dequantize the base first"):
                get_peft_model(model, config)
            assert not any(isinstance(m, LowRankLayer) for m in model.modules())  # left as it was
        dequantize_model(model)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        adapted = get_peft_model(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))
        with torch.no_grad():
            assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-5)


def test_loading_an_svd_start_computes_no_svd(tmp_path, monkeypatch):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), MTLoraConfig(r=4, init="pissa", structure="ctcm",
                                                             target_modules=LLAMA_TARGETS)).eval()
    randomize_adapters(model)
    model.add_adapter("xs", MTLoraConfig(r=2, init="lora-xs", target_modules=["q_proj"]))
    expected = _logits(model)
    model.save_pretrained(str(tmp_path))

    def no_svd(*_args, **_kwargs):
        raise AssertionError("an SVD was computed while loading saved factors")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    loaded.load_adapter(str(tmp_path / "xs"), adapter_name="xs")
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)
    with pytest.raises(AssertionError, match="an SVD was computed"):  # a fresh start does compute one
        loaded.add_adapter("fresh", LoraConfig(r=2, init="pissa", target_modules=["q_proj"]))


# -- the recipes' flags ---------------------------------------------------------------------------------------------

def test_recipe_flags_build_the_options():
    from structlora.recipes import methods
    from test_method_flags import recipe_args

    config = methods.build_peft_config(recipe_args("--method", "mtlora", "--use-rslora", "--init", "lora-xs"), "SEQ_CLS")
    assert (type(config), config.use_rslora, config.init) == (MTLoraConfig, True, "lora-xs")
    config = methods.build_peft_config(recipe_args("--method", "lora", "--init", "pissa"), "SEQ_CLS")
    assert (type(config), config.use_rslora, config.init) == (LoraConfig, False, "pissa")
    assert methods.build_peft_config(recipe_args("--method", "lora", "--init", "reference"), "SEQ_CLS").init == "default"
    with pytest.raises(SystemExit, match="--init lora-xs trains MTLoRA's T between frozen SVD factors"):
        methods.check_method_flags(recipe_args("--method", "lora", "--init", "lora-xs"))
    with pytest.raises(SystemExit, match="--loraplus-lr-ratio speeds up the B factors, which --init lora-xs freezes"):
        methods.check_method_flags(recipe_args("--method", "mtlora", "--init", "lora-xs", "--loraplus-lr-ratio", "4"))
    for flag in (["--use-rslora"], ["--loraplus-lr-ratio", "4"]):
        with pytest.raises(SystemExit, match=f"{flag[0]} is read only by --method lora, mtlora, loretta-rep"):
            methods.check_method_flags(recipe_args("--method", "adapter", *flag))


def test_glue_recipe_trains_lora_xs_with_rslora_and_lora_with_loraplus(tiny_bert, data_dir, tmp_path, monkeypatch):
    import structlora.trainer_guards

    results = train(tiny_bert, data_dir, tmp_path / "xs", "--task", "sst2", "--method", "mtlora", "--r", "4",
                    "--init", "lora-xs", "--use-rslora", "--max-steps", "2", "--lr", "1e-3")
    assert results["adapter_params"] == 4 * 4 * 4  # 2 layers x (query, value) x r²
    saved = json.loads((tmp_path / "xs" / "adapter" / "adapter_config.json").read_text())
    assert (saved["init"], saved["use_rslora"]) == ("lora-xs", True)
    calls = []

    def recording(model, optimizer_cls, optimizer_kwargs, loraplus_lr_ratio, *args, **kwargs):
        optimizer = create_loraplus_optimizer(model, optimizer_cls, optimizer_kwargs, loraplus_lr_ratio, *args,
                                              **kwargs)
        calls.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        return optimizer

    monkeypatch.setattr(structlora.trainer_guards, "create_loraplus_optimizer", recording)
    train(tiny_bert, data_dir, tmp_path / "plus", "--task", "sst2", "--method", "lora", "--r", "4",
          "--loraplus-lr-ratio", "4", "--max-steps", "1", "--lr", "1e-3")
    assert calls == [{"A": 1e-3, "B": 4e-3, "B_no_decay": 4e-3}]  # B_no_decay: the head's bias


@pytest.mark.parametrize("make_config", [
    lambda: LoraConfig(r=4, init="pissa", target_modules=LLAMA_TARGETS),
    lambda: MTLoraConfig(r=4, init="pissa", structure="ctcm", target_modules=LLAMA_TARGETS)], ids=["lora", "mtlora"])
def test_pissa_trains_a_b_and_t_while_the_start_stays(make_config):
    model = get_peft_model(tiny_llama(), make_config())
    randomize_adapters(model)
    with torch.no_grad():
        without_grad = model(**inputs()).logits
    loss_input = inputs()
    logits = model(**loss_input).logits  # the training path (fused engine, banked T·A)
    assert torch.allclose(logits, without_grad, atol=1e-5)
    start = {n: t.clone() for n, t in model.state_dict().items() if n.endswith("_initial")}
    assert len(start) == 2 * 6
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**loss_input, labels=loss_input["input_ids"]).loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in trained)
    optimizer.step()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in start.items())


def test_svd_starts_refuse_a_sharded_weight():
    model = tiny_llama()
    model.model.layers[1].self_attn.q_proj.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks a partitioned weight with
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj': an SVD start .* sharded \(DeepSpeed "
                                         r"ZeRO-3 or FSDP2\): add the adapter before the model is sharded"):
        get_peft_model(model, MTLoraConfig(r=2, init="lora-xs", target_modules=["q_proj"]))
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())


def test_results_and_sweeps_name_the_options():
    from structlora.recipes import methods, sweep
    from test_method_flags import recipe_args

    args = recipe_args("--method", "mtlora", "--structure", "ctcm", "--loraplus-lr-ratio", "16", "--init", "pissa",
                       "--use-rslora")
    assert methods.method_label(args) == "mtlora-ctcm+rslora+pissa+loraplus16"
    assert methods.method_label(recipe_args("--method", "lora")) == "lora"
    assert sweep.method_flags("mtlora+loraplus2.5+lora-xs") == ["--method", "mtlora", "--loraplus-lr-ratio", "2.5",
                                                                "--init", "lora-xs"]
    assert sweep.canonical_label("mtlora+loraplus2.5+lora-xs") == "mtlora-shim+lora-xs+loraplus2.5"
    # What a sweep runs is what the run records.
    for label in ("lora+rslora", "mtlora-shim+pissa", "mtlora-dtsm+lora-xs+loraplus4", "loretta-rep+rslora"):
        assert methods.method_label(recipe_args(*sweep.method_flags(label))) == sweep.canonical_label(label)
    with pytest.raises(SystemExit, match=r"unknown method option '\+dora'"):
        sweep.method_flags("lora+dora")
