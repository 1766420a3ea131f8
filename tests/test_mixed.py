"""Mixed-adapter batches (`adapter_names=`) for every method, in forward and generate, equal to running each
row alone; `hotswap_adapter` replaces weights in place (same parameters, no recompilation)."""

from __future__ import annotations

import pytest
import torch

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, PeftModel, get_peft_model
from structlora.mixed import BASE_ADAPTER, hotswap_adapter
from tiny_models import perturb_adapters, tiny_llama_for, tiny_word_tokenizer

ADAPTERS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "embedding": lambda: LoraConfig(r=2, target_modules=["embed_tokens", "k_proj"]),
    "mtlora": lambda: MTLoraConfig(r=4, structure="ctcm", target_modules=["q_proj", "o_proj", "up_proj"]),
    "rep": lambda: LorettaRepConfig(r=4, tensor_rank=2, target_modules=["q_proj", "v_proj"]),  # trains norms
    "adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2),  # output placement, trains norms
    "adp_parallel": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2, use_parallel_adapter=True),
}


def _randomize(model: PeftModel, seed: int = 0) -> None:
    perturb_adapters(model, scale=0.1, seed=seed)


@pytest.fixture(scope="module")
def multi():
    tokenizer = tiny_word_tokenizer()
    names = list(ADAPTERS)
    model = get_peft_model(tiny_llama_for(tokenizer), ADAPTERS[names[0]](), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, ADAPTERS[name]())
    _randomize(model)
    return model.eval(), tokenizer


def _alone(model: PeftModel, name: str, fn):
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            return fn()
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter(previous)


def test_mixed_forward_equals_each_row_alone(multi):
    model, _ = multi
    names = [*ADAPTERS, BASE_ADAPTER, "rep", "lora"]
    ids = torch.randint(4, 60, (len(names), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = _alone(model, name, lambda: model(input_ids=ids[row:row + 1]).logits)
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=0, atol=2e-5, msg=f"row {row} ({name})")
        # Each adapter really differs from the base (the test would pass trivially otherwise).
        base = _alone(model, BASE_ADAPTER, lambda: model(input_ids=ids).logits)
        for row, name in enumerate(names):
            if name != BASE_ADAPTER:
                assert (mixed[row] - base[row]).abs().max() > 1e-3, name


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_generate_equals_each_row_alone(multi, num_beams):
    model, tokenizer = multi
    names = ["adp", BASE_ADAPTER, "mtlora", "rep"]
    ids = torch.randint(4, 60, (len(names), 5), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=tokenizer.pad_token_id,
                   attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **options)
        for row, name in enumerate(names):
            row_options = {**options, "attention_mask": options["attention_mask"][row:row + 1]}
            alone = _alone(model, name, lambda: model.generate(input_ids=ids[row:row + 1], **row_options))
            assert torch.equal(mixed[row:row + 1], alone), f"row {row} ({name})"


def test_mixed_batch_gradients_reach_each_adapter(multi):
    model, _ = multi
    names = ["lora", "adp"]
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(4))
    previous = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".adapters." in name)
    try:
        model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for name in names:
            assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if f".adapters.{name}." in n)
        assert all(g is None for n, g in grads.items() if ".adapters.mtlora." in n)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous[name])
            parameter.grad = None


def test_adapter_names_are_checked(multi):
    model, _ = multi
    ids = torch.randint(4, 60, (2, 4))
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model(input_ids=ids, adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="3 entries, but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["lora", "rep", "adp"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names="lora")


def _saved(tmp_path, name: str, seed: int, **overrides) -> str:
    tokenizer = tiny_word_tokenizer()
    config = LorettaRepConfig(**{"r": 4, "tensor_rank": 2, "target_modules": ["q_proj", "v_proj"], **overrides})
    model = get_peft_model(tiny_llama_for(tokenizer), config)
    _randomize(model, seed)
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def test_hotswap_replaces_weights_in_place(tmp_path):
    first, second = _saved(tmp_path, "first", 1), _saved(tmp_path, "second", 2, lora_alpha=4)
    tokenizer = tiny_word_tokenizer()
    model = PeftModel.from_pretrained(tiny_llama_for(tokenizer), first).eval()
    expected = PeftModel.from_pretrained(tiny_llama_for(tokenizer), second).eval()
    parameters = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(input_ids=ids).logits
        hotswap_adapter(model, second)  # a new lora_alpha: the scaling (a Python float) changes
        after = compiled(input_ids=ids).logits
        torch.testing.assert_close(after, expected(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-3
    assert all(parameters[n] is p for n, p in model.named_parameters())  # nothing rebuilt
    assert model.peft_config["default"].lora_alpha == 4


def test_hotswap_without_recompiling_when_only_weights_change(tmp_path):
    first, second = _saved(tmp_path, "first", 1), _saved(tmp_path, "second", 2)
    model = PeftModel.from_pretrained(tiny_llama_for(tiny_word_tokenizer()), first).eval()
    expected = PeftModel.from_pretrained(tiny_llama_for(tiny_word_tokenizer()), second).eval()
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids)
        hotswap_adapter(model, second)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(input_ids=ids).logits, expected(input_ids=ids).logits,
                                       rtol=0, atol=1e-5)


def test_hotswap_refuses_another_structure(tmp_path):
    first, other = _saved(tmp_path, "first", 1), _saved(tmp_path, "other", 2, tensor_rank=3)
    model = PeftModel.from_pretrained(tiny_llama_for(tiny_word_tokenizer()), first)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="differs in tensor_rank"):
        hotswap_adapter(model, other)
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in state.items())
