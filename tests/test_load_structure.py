"""structlora.PeftModel.load_adapter into an existing adapter: the folder must hold an adapter of the same structure.
PEFT would load the weights under the existing config (rsLoRA weights scaled as plain LoRA, DTSM's tensors computed
as CTCM's); structlora refuses, naming the fields, and the adapter keeps its values. (LoRA-XS into a plain MTLoRA
config: tests/test_lora_options.py test_lora_xs_round_trips.)"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from structlora import LoraConfig, MTLoraConfig, get_peft_model  # noqa: E402
from test_core import randomize_adapters, tiny_llama  # noqa: E402

CASES = {
    "rslora-into-plain": (lambda: LoraConfig(r=4, use_rslora=True, target_modules=["q_proj"]),
                          lambda: LoraConfig(r=4, target_modules=["q_proj"]),
                          "use_rslora: weights saved with True, config has False"),
    "dtsm-into-ctcm": (lambda: MTLoraConfig(r=4, structure="dtsm", target_modules=["q_proj"]),
                       lambda: MTLoraConfig(r=4, structure="ctcm", target_modules=["q_proj"]),
                       "structure: weights saved with 'dtsm', config has 'ctcm'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weights_of_another_structure_do_not_load_into_an_existing_adapter(case, tmp_path):
    saved_config, other_config, message = CASES[case]
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), saved_config())
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path))
    other = get_peft_model(copy.deepcopy(base), other_config())
    before = {k: v.clone() for k, v in other.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=message):
        other.load_adapter(str(tmp_path), adapter_name="default")  # new weights for the existing adapter
    assert all(torch.equal(other.adapter_state_dict()[k], v) for k, v in before.items())
    same = get_peft_model(copy.deepcopy(base), saved_config())
    same.load_adapter(str(tmp_path), adapter_name="default")  # the same structure loads
    assert all(torch.equal(same.adapter_state_dict()[k], v) for k, v in model.adapter_state_dict().items())
