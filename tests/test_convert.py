"""Old structlora adapter folders → PEFT (structlora.convert_folder, `structlora convert`): a folder written by
structlora's earlier model class (structlora.model.PeftModel, its layouts of this and earlier releases) becomes one
that peft.PeftModel.from_pretrained loads with outputs equal (atol 0) to that class's from_pretrained's (and
structlora.PeftModel.from_pretrained converts it on load, to the same outputs); what
cannot be converted exactly is refused with nothing written; PEFT's loaders on an unconverted folder name the
command."""

from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from structlora.convert import CONFIG_METADATA_KEY, WEIGHTS_NAME  # noqa: E402
# The folders to convert are in the layout of structlora's earlier model class, so this file builds and reloads
# them with that class on purpose (structlora.PeftModel is now a peft.PeftModel and saves in PEFT's layout).
from structlora.model import PeftModel as EarlierPeftModel  # noqa: E402
from structlora.model import get_peft_model as earlier_get_peft_model  # noqa: E402
from structlora.recipes import commands as cli  # noqa: E402
from test_peft_tuner import METHODS, MODELS, config_for, outputs, perturbed  # noqa: E402


def save_structlora(model_name: str, config, folder, seed: int = 0):
    """A model of structlora's earlier class with a non-zero (perturbed) adapter, saved to `folder` in that class's
    layout; returns its outputs as that class's from_pretrained gives them back."""
    perturbed(earlier_get_peft_model(MODELS[model_name](), config), seed).save_pretrained(str(folder))
    return outputs(EarlierPeftModel.from_pretrained(MODELS[model_name](), str(folder)))


def assert_converts_exactly(model_name: str, src, dst, expected, config=None) -> None:
    """Converted, loaded through PEFT: outputs equal; with `config`, it also trains what a fresh
    peft.get_peft_model(base, config) would (heads, norm copies, biases included)."""
    assert structlora.convert_folder(str(src), str(dst)) == [""]
    loaded = peft.PeftModel.from_pretrained(MODELS[model_name](), str(dst))
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)
    assert not torch.equal(outputs(MODELS[model_name]()), expected)  # the adapter changes the outputs
    if config is not None:
        trainable = peft.PeftModel.from_pretrained(MODELS[model_name](), str(dst), is_trainable=True)
        fresh = peft.get_peft_model(MODELS[model_name](), config)
        assert ({n: p.shape for n, p in trainable.named_parameters() if p.requires_grad}
                == {n: p.shape for n, p in fresh.named_parameters() if p.requires_grad})


def weights(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.path.join(str(folder), WEIGHTS_NAME)
    with safe_open(path, framework="pt") as handle:
        return load_file(path), handle.metadata() or {}


def edit_config(folder, **changes) -> None:
    path = os.path.join(str(folder), "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


_DELETE = object()


# -- exact conversion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_converted_folder_loads_through_peft_with_identical_outputs(method, model_name, tmp_path):
    expected = save_structlora(model_name, config_for(method, model_name), tmp_path / "old")
    with pytest.warns(UserWarning, match="converted on load"):  # structlora.PeftModel reads the folder as it is
        on_load = structlora.PeftModel.from_pretrained(MODELS[model_name](), str(tmp_path / "old"))
    torch.testing.assert_close(outputs(on_load), expected, rtol=0, atol=0)
    assert_converts_exactly(model_name, tmp_path / "old", tmp_path / "new", expected, config_for(method, model_name))
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["peft_type"] == METHODS[method]().peft_type.value and config["inference_mode"] is True
    assert sorted(os.listdir(tmp_path / "new")) == ["adapter_config.json", WEIGHTS_NAME]
    # the tensors themselves are unchanged: only their keys (and the config's peft_type) differ
    old, new = weights(tmp_path / "old")[0], weights(tmp_path / "new")[0]
    assert len(old) == len(new) and all(k.startswith("base_model.model.") for k in new)
    assert sorted(v.sum().item() for v in old.values()) == sorted(v.sum().item() for v in new.values())


OPTIONS = {
    "seq_cls_head_mtlora": ("bert", lambda: structlora.MTLoraConfig(r=2, structure="icfm", task_type="SEQ_CLS")),
    "seq_cls_head_loretta_adp": ("bert", lambda: structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2,
                                                                             task_type="SEQ_CLS")),
    "modules_to_save_and_embedding": ("llama", lambda: structlora.LoraConfig(
        r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
    "bias_all_pissa": ("gpt2", lambda: structlora.LoraConfig(r=2, bias="all", init="pissa")),
    "lora_xs": ("llama", lambda: structlora.MTLoraConfig(r=2, structure="shim", init="lora-xs",
                                                         target_modules=["q_proj", "v_proj"])),
    "norms_and_biases_learned_scaling": ("gpt2", lambda: structlora.LorettaAdpConfig(
        bottleneck_size=4, tensor_rank=2, bias="all", scaling="learned")),
    "lora_only_biases_fused_slices": ("gpt2", lambda: structlora.LoraConfig(r=2, bias="lora_only",
                                                                            enable_lora=[True, False, True])),
    "dense_adapter": ("llama", lambda: structlora.DenseAdapterConfig(bottleneck_size=4)),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_heads_norms_biases_and_svd_starts_convert_exactly(option, tmp_path):
    model_name, make_config = OPTIONS[option]
    expected = save_structlora(model_name, make_config(), tmp_path / "old")
    assert_converts_exactly(model_name, tmp_path / "old", tmp_path / "new", expected, make_config())


def test_tensorized_classifier_head_converts_exactly(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    def roberta():
        torch.manual_seed(0)
        return RobertaForSequenceClassification(RobertaConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=40, num_labels=2))

    for method, config in (("loretta_adp", structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2,
                                                                       task_type="SEQ_CLS")),
                           ("loretta_rep", structlora.LorettaRepConfig(r=2, tensor_rank=2, task_type="SEQ_CLS"))):
        perturbed(earlier_get_peft_model(roberta(), config)).save_pretrained(str(tmp_path / method))
        assert any(".dense.weight_tt." in key for key in weights(tmp_path / method)[0])
        expected = outputs(EarlierPeftModel.from_pretrained(roberta(), str(tmp_path / method)))
        structlora.convert_folder(str(tmp_path / method), str(tmp_path / f"{method}-peft"))
        loaded = peft.PeftModel.from_pretrained(roberta(), str(tmp_path / f"{method}-peft"))
        torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)


def test_multi_adapter_folder_converts_every_adapter(tmp_path):
    """Adapters of one method load into one peft.PeftModel; PEFT holds one peft_type per model, so an adapter of
    another method (here LoRETTA_adp beside MTLoRA) loads from its sub-folder on its own."""
    model = earlier_get_peft_model(MODELS["gpt2"](), METHODS["mtlora-dtsm"]())
    model.add_adapter("shim", METHODS["mtlora-shim"]())
    model.add_adapter("adp", METHODS["loretta_adp"]())
    perturbed(model)
    for seed, name in enumerate(("shim", "adp"), start=1):  # the active adapter's parameters are the trainable ones
        model.set_adapter(name)
        perturbed(model, seed=seed)
    model.save_pretrained(str(tmp_path / "old"))
    expected = {}
    reloaded = EarlierPeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "old"))
    for name in ("shim", "adp"):
        reloaded.load_adapter(str(tmp_path / "old" / name), adapter_name=name, is_trainable=False)
    for name in ("default", "shim", "adp"):
        reloaded.set_adapter(name)
        expected[name] = outputs(reloaded)
    assert structlora.convert_folder(str(tmp_path / "old"), str(tmp_path / "new")) == ["", "adp", "shim"]
    loaded = peft.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "new"))
    loaded.load_adapter(str(tmp_path / "new" / "shim"), adapter_name="shim")
    for name in ("default", "shim"):
        loaded.set_adapter(name)
        torch.testing.assert_close(outputs(loaded), expected[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        loaded.load_adapter(str(tmp_path / "new" / "adp"), adapter_name="adp")
    alone = peft.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "new" / "adp"), adapter_name="adp")
    torch.testing.assert_close(outputs(alone), expected["adp"], rtol=0, atol=0)
    assert len({tuple(v.flatten().tolist()) for v in expected.values()}) == 3


def test_folders_of_earlier_releases_convert_exactly(tmp_path):
    """Earlier layouts: no peft_type, default targets null, an absolute base path (config and weights' structure),
    and, before that, no structure in the weights' metadata at all."""
    config = lambda: structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2)  # noqa: E731 - regex targets
    expected = save_structlora("gpt2", config(), tmp_path / "targets-null")
    edit_config(tmp_path / "targets-null", peft_type=_DELETE, target_modules=None,
                base_model_name_or_path="/abs/local/gpt2")
    tensors, metadata = weights(tmp_path / "targets-null")
    structure = json.loads(metadata[CONFIG_METADATA_KEY])
    structure["target_modules"] = None
    del structure["svd_start"]
    save_file(tensors, str(tmp_path / "targets-null" / WEIGHTS_NAME),
              metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(structure)})
    torch.testing.assert_close(
        outputs(structlora.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "targets-null"))), expected,
        rtol=0, atol=0)
    assert_converts_exactly("gpt2", tmp_path / "targets-null", tmp_path / "new-1", expected)
    assert json.loads((tmp_path / "new-1" / "adapter_config.json").read_text())["base_model_name_or_path"] == "gpt2"

    expected = save_structlora("llama", METHODS["mtlora-ctcm"](), tmp_path / "no-metadata")
    edit_config(tmp_path / "no-metadata", peft_type=_DELETE)
    save_file(weights(tmp_path / "no-metadata")[0], str(tmp_path / "no-metadata" / WEIGHTS_NAME),
              metadata={"format": "pt"})
    assert_converts_exactly("llama", tmp_path / "no-metadata", tmp_path / "new-2", expected)


# -- refusals: nothing is written ------------------------------------------------------------------------------------
def _refused(src, dst, match: str, error=ValueError) -> None:
    before = sorted(os.listdir(os.path.dirname(str(dst))))
    with pytest.raises(error, match=match):
        structlora.convert_folder(str(src), str(dst))
    assert sorted(os.listdir(os.path.dirname(str(dst)))) == before  # no dst, no staging folder left


def test_what_cannot_be_converted_exactly_is_refused(tmp_path):
    save_structlora("gpt2", structlora.BitFitConfig(), tmp_path / "bitfit")
    _refused(tmp_path / "bitfit", tmp_path / "out", r"adapter_config.json'? is a BitFit adapter, which has no PEFT "
                                                    r"tuner")

    save_structlora("gpt2", METHODS["mtlora-dtsm"](), tmp_path / "edited")
    edit_config(tmp_path / "edited", structure="ctcm")  # same tensors, another function
    _refused(tmp_path / "edited", tmp_path / "out", r"adapter_model.safetensors' was saved from a different adapter "
                                                    r"than its config describes \(structure: weights saved with 'dtsm'")

    save_structlora("gpt2", METHODS["lora"](), tmp_path / "diverged")
    tensors, metadata = weights(tmp_path / "diverged")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "diverged" / WEIGHTS_NAME), metadata=metadata)
    _refused(tmp_path / "diverged", tmp_path / "out", rf"tensor '{key}' has non-finite values")

    save_structlora("gpt2", METHODS["lora"](), tmp_path / "extra")
    tensors, metadata = weights(tmp_path / "extra")
    tensors["transformer.wte.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "extra" / WEIGHTS_NAME), metadata=metadata)
    _refused(tmp_path / "extra", tmp_path / "out", r"cannot convert tensor 'transformer.wte.weight': no adapter layer")

    peft.get_peft_model(MODELS["gpt2"](), METHODS["lora"]()).save_pretrained(str(tmp_path / "peft"))
    _refused(tmp_path / "peft", tmp_path / "out", r"already in PEFT's layout")
    _refused(tmp_path / "missing", tmp_path / "out", r"no adapter folder", FileNotFoundError)
    (tmp_path / "run").mkdir()  # a training run: results.json beside adapter/
    (tmp_path / "run" / "results.json").write_text("{}")
    save_structlora("gpt2", METHODS["lora"](), tmp_path / "run" / "adapter")
    _refused(tmp_path / "run", tmp_path / "out", r"is a training run's folder: convert its adapter, '.*run/adapter'")


def test_one_bad_adapter_of_a_folder_writes_nothing(tmp_path):
    model = earlier_get_peft_model(MODELS["llama"](), METHODS["lora"]())
    model.add_adapter("other", METHODS["mtlora-shim"]())
    model.save_pretrained(str(tmp_path / "old"))
    edit_config(tmp_path / "old" / "other", structure="icfm")
    _refused(tmp_path / "old", tmp_path / "out", r"other.*saved from a different adapter")


def test_destination_is_never_overwritten_without_the_flag(tmp_path):
    expected = save_structlora("llama", METHODS["mtlora-icfm"](), tmp_path / "old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists: choose another folder, or pass overwrite=True"):
        structlora.convert_folder(str(tmp_path / "old"), str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == ["keep.txt"]
    with pytest.raises(ValueError, match="is, or is inside or around, the source"):
        structlora.convert_folder(str(tmp_path / "old"), str(tmp_path / "old" / "peft"), overwrite=True)
    structlora.convert_folder(str(tmp_path / "old"), str(tmp_path / "new"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "new")) == ["adapter_config.json", WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["new", "old"]  # nothing left aside
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "new"))
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)


# -- PEFT's loaders on an unconverted folder -------------------------------------------------------------------------
def test_peft_on_a_structlora_folder_names_structlora_convert_and_leaves_the_base(tmp_path):
    """(Every PEFT loader: tests/test_interop_messages.py.)"""
    save_structlora("llama", METHODS["mtlora-icfm"](), tmp_path / "old")
    base = MODELS["llama"]()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match=r"'.*old' was written by the save_pretrained of structlora's earlier model "
                                         r"class \(structlora's own layout, not PEFT's\): convert it once with "
                                         r"`structlora convert SRC DST`"):
        peft.PeftModel.from_pretrained(base, str(tmp_path / "old"))
    assert [n for n, _ in base.named_modules()] == names


def test_peft_refuses_a_checkpoint_with_tensors_no_module_takes(tmp_path):
    model = perturbed(peft.get_peft_model(MODELS["gpt2"](), METHODS["lora"]()))
    model.save_pretrained(str(tmp_path))
    tensors, metadata = weights(tmp_path)
    tensors["base_model.model.transformer.h.0.attn.c_proj.adapters.parameterization.lora_A"] = torch.zeros(2, 16)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata=metadata)
    with pytest.raises(ValueError, match=r"holds 1 tensor\(s\) that no module of this model takes, e\.g\. "
                                         r"transformer\.h\.0\.attn\.c_proj\.adapters"):
        peft.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path))


# -- the command -----------------------------------------------------------------------------------------------------
def test_convert_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    expected = save_structlora("gpt2", METHODS["loretta_rep"](), tmp_path / "old")
    src, dst = str(tmp_path / "old"), str(tmp_path / "new")
    assert cli.main(["convert", src, dst]) == 0
    assert f"converted default -> {dst}" in capsys.readouterr().err
    torch.testing.assert_close(outputs(peft.PeftModel.from_pretrained(MODELS["gpt2"](), dst)), expected,
                               rtol=0, atol=0)
    assert cli.main(["convert", src, dst]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the destination {dst!r} exists"), err
    assert cli.main(["convert", src, dst, "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["convert", dst, str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[-1].startswith("error: ") and "already in PEFT's layout" in err[-1], err


def test_an_adapter_nested_inside_another_kind_converts_to_its_own_place(tmp_path):
    """structlora nests a second adapter of another kind on the same module inside the first one's wrapper
    (`<module>.base_layer.adapter_down...`); on its own, under PEFT, it sits at the module itself."""
    model = earlier_get_peft_model(MODELS["gpt2"](), structlora.LoraConfig(r=2, target_modules=["c_fc"]))
    model.add_adapter("adp", structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, target_modules=["c_fc"],
                                                         train_norms=False))
    perturbed(model)
    model.set_adapter("adp")
    perturbed(model, seed=1)
    model.save_pretrained(str(tmp_path / "old"))
    assert any(".c_fc.base_layer.adapter_down." in key for key in weights(tmp_path / "old" / "adp")[0])
    reloaded = EarlierPeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "old"))
    reloaded.load_adapter(str(tmp_path / "old" / "adp"), adapter_name="adp", is_trainable=False)
    reloaded.set_adapter("adp")
    structlora.convert_folder(str(tmp_path / "old"), str(tmp_path / "new"))
    loaded = peft.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path / "new" / "adp"), adapter_name="adp")
    torch.testing.assert_close(outputs(loaded), outputs(reloaded), rtol=0, atol=0)
