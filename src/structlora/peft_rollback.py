"""Undoing an adapter injection on the PEFT path, so that a failed operation leaves the model as it was.

PEFT injects an adapter's layers before it reads the adapter's weights: `peft.PeftModel.from_pretrained(base, folder)`
wraps `base` in `PeftModel.__init__` and only then calls `load_adapter`, and `load_adapter(folder, new_name)` injects
the new adapter first too. When structlora's tuner then refuses the weights (missing, non-finite, misshapen) — or
an injection itself fails half-way (an SVD start that cannot decompose a later layer) — the layers would stay in the
user's model. `InjectionRollback` records, before an injection, what it changes (the module tree, requires_grad, the
root's hooks and attributes) and puts it back. PEFT itself is not patched: the tuner calls this around its own hooks.
(A folder without a weights file, or with one whose header does not read, fails in PEFT before any structlora hook
runs: it is refused earlier, when PEFT reads the folder's config, by `peft_support.refuse_unloadable_weights`.)

Only an injection made by the very load call that fails is undone: an adapter the user already had (from
`get_peft_model`, or loaded before) stays when a later `load_adapter` into it is refused (that refusal changes
nothing, since it comes before the first tensor is copied).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapter_state import ModuleSnapshot
from .peft_support import peft_load_call, running_frames

# Attributes the tuner and BaseTuner set on the model they wrap.
_ROOT_ATTRIBUTES = ("peft_config", "_structlora_bank_hook")


class InjectionRollback:
    """What one adapter's injection into `model` changes, recorded before it, and `restore()` to undo it."""

    def __init__(self, model: nn.Module, tuner: Any, adapter_name: str) -> None:
        self.model, self.tuner, self.adapter_name = model, tuner, adapter_name
        self.snapshot = ModuleSnapshot(model)
        self.attributes = {name: model.__dict__[name] for name in _ROOT_ATTRIBUTES if name in model.__dict__}
        self.targeted = list(getattr(tuner, "targeted_module_names", []))
        # Kept only while the load call that made the injection runs (see `belongs_to_failing_load`).
        self.load_call = peft_load_call()

    def belongs_to_failing_load(self) -> bool:
        """Whether the injection was made by a PEFT load call that is still running (the one now failing)."""
        return self.load_call is not None and self.load_call in running_frames()

    def restore(self) -> None:
        """The module tree, requires_grad, root hooks and attributes as before the injection; the adapter's config
        out of the tuner (PEFT puts it there before injecting)."""
        self.snapshot.restore()
        for name in _ROOT_ATTRIBUTES:
            if name in self.attributes:
                self.model.__dict__[name] = self.attributes[name]
            else:
                self.model.__dict__.pop(name, None)
        getattr(self.tuner, "peft_config", {}).pop(self.adapter_name, None)
        if hasattr(self.tuner, "targeted_module_names"):
            self.tuner.targeted_module_names[:] = self.targeted
        self.load_call = None
