"""Mixed batches and hot swaps on the PEFT path (structlora.peft_tuner.StructloraTuner inside a peft.PeftModel).

`adapter_names=[...]` routes each row through its adapter's layers, trained norm copies and its own copy of every
module to save / classification head (LoRETTA's tensorized head included), "__base__" rows through the original;
`peft_model.hotswap_adapter(folder)` (and structlora.mixed.hotswap_adapter) writes a saved adapter's weights in place.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from structlora.mixed import hotswap_adapter  # noqa: E402
from structlora.peft_layers import StructloraTrainedCopy  # noqa: E402
from structlora.tensor_train import TTLinear  # noqa: E402
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

ROWS = torch.tensor([[1, 5, 7, 9, 11, 13, 2], [3, 4, 6, 8, 10, 12, 14], [2, 9, 9, 4, 17, 3, 5], [8, 1, 16, 6, 7, 2, 9]])


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))


def tiny_roberta():
    """RoBERTa's head has a square hidden `dense`: LoRETTA's tensorize_classifier makes it a tensor train."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          max_position_embeddings=40, num_labels=3))


# Two adapters of one method (PEFT holds one peft_type per model), each with its own copy of the head.
CASES = {
    "mtlora-bert-modules_to_save": (tiny_bert, lambda: structlora.MTLoraConfig(
        r=2, structure="icfm", target_modules=["query", "value"], modules_to_save=["classifier"])),
    "loretta_rep-roberta-tensorized-head": (tiny_roberta, lambda: structlora.LorettaRepConfig(
        r=2, tensor_rank=2, task_type="SEQ_CLS", tensorize_classifier=True, train_norms=True)),
}


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters()
            if f".adapters.{name}." in n or f".modules_to_save.{name}." in n}


def randomize(model, name: str, seed: int, scale: float = 0.3) -> None:
    """Seeded noise on adapter `name`'s tensors (a fresh adapter has B = 0 and a head equal to the original)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_tensors(model, name).values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def two_adapters(case: str):
    build, config = CASES[case]
    model = peft.get_peft_model(build(), config(), adapter_name="one")
    model.add_adapter("two", config())
    randomize(model, "one", 1)
    randomize(model, "two", 2)
    return model.eval()


def alone(model, name: str, row: torch.Tensor) -> torch.Tensor:
    """The logits of one row run by itself with adapter `name` active (or none, "__base__")."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=row[None]).logits[0]
        model.set_adapter(name)
        return model(input_ids=row[None]).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_through_heads_equals_each_row_run_alone(case):
    model = two_adapters(case)
    heads = [m for m in model.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    assert len(heads) == 1 and sorted(heads[0].modules_to_save) == ["one", "two"]
    if case.startswith("loretta"):
        assert all(isinstance(heads[0].modules_to_save[n].dense, TTLinear) for n in ("one", "two"))
        assert sum(isinstance(m, StructloraTrainedCopy) for m in model.modules()) == 5  # embeddings + 2 per layer
    names = ["one", "two", "__base__", "one"]
    expected = torch.stack([alone(model, name, row) for name, row in zip(names, ROWS)])
    # routing is visible: each row's three candidates differ
    for row in range(4):
        candidates = [alone(model, n, ROWS[row]) for n in ("one", "two", "__base__")]
        assert min((x - y).abs().max() for i, x in enumerate(candidates) for y in candidates[i + 1:]) > 1e-2
    model.set_adapter("two")
    state = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(input_ids=ROWS).logits
        mixed = model(input_ids=ROWS, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-6)
    # nothing left behind: same active adapter, same outputs, same weights and requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ROWS).logits, before, rtol=0, atol=0)
    assert all(torch.equal(p, state[n][0]) and p.requires_grad == state[n][1] for n, p in model.named_parameters())


def test_mixed_batch_gradients_reach_each_adapters_head_copy():
    model = two_adapters("mtlora-bert-modules_to_save").train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in ("one", "two"):
        for parameter in adapter_tensors(model, name).values():
            parameter.requires_grad_(True)
    original = model.base_model.model.classifier.original_module.weight
    original.requires_grad_(True)
    model(input_ids=ROWS, adapter_names=["one", "two", "__base__", "one"]).logits.square().sum().backward()
    for name in ("one", "two"):
        assert model.base_model.model.classifier.modules_to_save[name].weight.grad.abs().sum() > 0
    assert original.grad.abs().sum() > 0  # the "__base__" row ran through the original head


def test_generate_routes_rows_through_each_adapters_lm_head_copy():
    config = lambda: structlora.MTLoraConfig(r=2, target_modules=["q_proj", "v_proj"],  # noqa: E731
                                             modules_to_save=["lm_head"])
    model = peft.get_peft_model(tiny_llama_for(tiny_word_tokenizer()), config(), adapter_name="one")
    model.add_adapter("two", config())
    randomize(model, "one", 1, scale=0.5)
    randomize(model, "two", 2, scale=0.5)
    model.eval()
    prompt = ROWS[:3, :4]
    options = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    expected = []
    for name, row in zip(["two", "__base__", "one"], prompt):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model.generate(input_ids=row[None], **options)[0])
        else:
            model.set_adapter(name)
            expected.append(model.generate(input_ids=row[None], **options)[0])
    mixed = model.generate(input_ids=prompt, adapter_names=["two", "__base__", "one"], **options)
    for row in range(3):
        assert torch.equal(mixed[row], expected[row])
    with torch.no_grad():  # the heads are what differs: the same rows through the three lm_head copies differ
        logits = [model(input_ids=prompt, adapter_names=[n] * 3).logits for n in ("one", "two", "__base__")]
    assert (logits[0] - logits[1]).abs().max() > 1e-2 and (logits[1] - logits[2]).abs().max() > 1e-2


def test_adapter_names_that_do_not_fit_are_refused():
    model = two_adapters("mtlora-bert-modules_to_save")
    model.set_adapter("one")
    with torch.no_grad():
        before = model(input_ids=ROWS).logits
        with pytest.raises(ValueError, match="adapter_names has 2 entries, but the batch has 4 rows"):
            model(input_ids=ROWS, adapter_names=["one", "two"])  # not run as one, one, two, two
        with pytest.raises(ValueError, match="no adapter named 'three'"):
            model(input_ids=ROWS, adapter_names=["one", "three", "two", "one"])
        model.merge_adapter()
        with pytest.raises(ValueError, match=r"\['one'\] are merged into the base weights"):
            model(input_ids=ROWS, adapter_names=["one", "two", "__base__", "one"])
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ROWS).logits, before, rtol=0, atol=1e-5)


# -- hotswap -----------------------------------------------------------------------------------------------------
def _config(case: str, **overrides):
    config = CASES[case][1]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def saved_adapter(tmp_path, case: str, name: str, seed: int, **overrides) -> str:
    model = peft.get_peft_model(CASES[case][0](), _config(case, **overrides))
    randomize(model, "default", seed)
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def loaded(case: str, folder: str):
    return peft.PeftModel.from_pretrained(CASES[case][0](), folder, is_trainable=True).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_hotswap_writes_in_place_and_keeps_optimizer_and_compiled_model(case, tmp_path):
    first = saved_adapter(tmp_path, case, "first", 1)
    second = saved_adapter(tmp_path, case, "second", 2, lora_alpha=3)  # a new lora_alpha: a new scaling
    model, expected = loaded(case, first), loaded(case, second)
    parameters = dict(model.named_parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(input_ids=ROWS).logits
        model.hotswap_adapter(second)  # PeftModel forwards it to StructloraTuner.hotswap_adapter
        after = compiled(input_ids=ROWS).logits
        torch.testing.assert_close(after, expected(input_ids=ROWS).logits, rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-2
    assert model.peft_config["default"].lora_alpha == 3
    assert all(parameters[n] is p for n, p in model.named_parameters())  # nothing rebuilt
    assert any(".modules_to_save.default." in n for n, p in parameters.items() if p.requires_grad)
    # the optimizer still holds the model's parameters: a step moves them
    compiled(input_ids=ROWS).logits.square().sum().backward()
    snapshot = [p.clone() for p in trained]
    optimizer.step()
    assert all(p.grad is not None for p in trained) and any(not torch.equal(p, s) for p, s in zip(trained, snapshot))


def test_peft_hotswap_does_not_recompile_when_only_weights_change(tmp_path):
    case = "loretta_rep-roberta-tensorized-head"
    first, second = saved_adapter(tmp_path, case, "first", 1), saved_adapter(tmp_path, case, "second", 2)
    model, expected = loaded(case, first), loaded(case, second)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ROWS)
        hotswap_adapter(model, second, "default")  # the function form takes a peft.PeftModel too
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(input_ids=ROWS).logits, expected(input_ids=ROWS).logits,
                                       rtol=0, atol=1e-5)


def _damage(folder: str, how: str) -> None:
    from safetensors.torch import load_file, save_file

    path = f"{folder}/adapter_model.safetensors"
    tensors = load_file(path)
    adapter_keys = sorted(k for k in tensors if ".adapters." in k)
    if how == "nan":
        tensors[adapter_keys[-1]] = torch.full_like(tensors[adapter_keys[-1]], float("nan"))
    elif how == "missing":
        del tensors[adapter_keys[-1]]
    elif how == "shape":
        tensors[adapter_keys[-1]] = torch.zeros(3, 3)
    save_file(tensors, path)


@pytest.mark.parametrize("how, message", [("nan", "non-finite"), ("missing", "lacks 1 of adapter 'default'"),
                                          ("shape", "has shape")])
def test_peft_hotswap_of_a_damaged_file_changes_nothing(how, message, tmp_path):
    case = "mtlora-bert-modules_to_save"
    first, second = saved_adapter(tmp_path, case, "first", 1), saved_adapter(tmp_path, case, "second", 2,
                                                                             lora_alpha=3)
    _damage(second, how)
    model = loaded(case, first)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.hotswap_adapter(second)
    assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())
    assert model.peft_config["default"].lora_alpha == CASES[case][1]().lora_alpha  # the scaling's alpha kept


def test_peft_hotswap_interrupted_while_writing_puts_the_weights_back(tmp_path, monkeypatch):
    case = "mtlora-bert-modules_to_save"
    first, second = saved_adapter(tmp_path, case, "first", 1), saved_adapter(tmp_path, case, "second", 2)
    model = loaded(case, first)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    original, calls = torch.nn.Module._load_from_state_dict, []

    def interrupted(module, state_dict, prefix, *args, **kwargs):
        original(module, state_dict, prefix, *args, **kwargs)
        if ".adapters.default." in prefix and any(k.startswith(prefix) for k in state_dict):
            calls.append(prefix)
            if len(calls) == 2:  # after the second adapter module got the new weights
                raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.Module, "_load_from_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.hotswap_adapter(second)
    monkeypatch.undo()
    assert len(calls) >= 2
    assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())


def test_peft_hotswap_refusals(tmp_path):
    case = "mtlora-bert-modules_to_save"
    first = saved_adapter(tmp_path, case, "first", 1)
    other_rank = saved_adapter(tmp_path, case, "other", 2, r=3)
    model = loaded(case, first)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="differs in r"):
        model.hotswap_adapter(other_rank)
    with pytest.raises(ValueError, match="differs in modules_to_save"):  # one more module trained in full
        model.hotswap_adapter(saved_adapter(tmp_path, case, "pooler", 2, modules_to_save=["classifier", "pooler"]))
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.hotswap_adapter(first, "nope")
    other_method = saved_adapter(tmp_path, "loretta_rep-roberta-tensorized-head", "loretta", 3)
    with pytest.raises(ValueError, match="not a MTLoraConfig"):
        model.hotswap_adapter(other_method)
    model.merge_adapter()
    with pytest.raises(ValueError, match="is merged into the base weights"):
        model.hotswap_adapter(first)
    model.unmerge_adapter()
    for n, v in model.state_dict().items():
        torch.testing.assert_close(v, state[n], rtol=0, atol=1e-6)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="peft.utils.hotswap.hotswap_adapter"):
        hotswap_adapter(lora, first)
