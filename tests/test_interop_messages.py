"""A PEFT config handed to structlora's get_peft_model names the classes to use instead."""

from __future__ import annotations

import pytest
import torch

import structlora


def test_a_peft_config_is_refused_with_what_to_use():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"PEFT config \(peft\..*LoraConfig\); use structlora's own classes"):
        structlora.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))
    assert not any("lora" in name for name, _ in model.named_modules())  # the model is left as it was
