"""The names of MTLoRA's structures, of the dense adapters' placements, of the SVD starts and of the PEFT-path
layers' adapter dict, defined once.

A module of its own, without imports: the command line's `--help` lists them as choices and must not import
`structlora.config`, which imports peft (and so torch).
"""

from __future__ import annotations

MTLORA_STRUCTURES: tuple[str, ...] = ("shim", "icfm", "ctcm", "dtsm")
DENSE_ADAPTER_PLACEMENTS: tuple[str, ...] = ("houlsby", "pfeiffer")
SVD_INITS: tuple[str, ...] = ("pissa", "lora-xs")  # the inits whose A and B come from the base weight (svd_init)
# The ModuleDict of every PEFT-path layer that holds one adapter per name (PEFT's "adapter layer name"); in the
# checkpoints of that path a weight is `<module>.adapters.<path>` (structlora.peft_layers, structlora.convert).
ADAPTERS = "adapters"
