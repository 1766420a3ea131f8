"""Optional device for the device-agnostic tests (engine, bank, norms): STRUCTLORA_TEST_DEVICE=cuda runs them
with every tensor and module created on that device. CI leaves it unset (CPU)."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("STRUCTLORA_TEST_DEVICE")
if TEST_DEVICE:
    torch.set_default_device(TEST_DEVICE)
