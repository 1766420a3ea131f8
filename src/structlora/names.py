"""The names of MTLoRA's structures, of the dense adapters' placements and of the SVD starts, defined once.

A module of its own, without imports: the command line's `--help` lists them as choices and must not import
`structlora.config`, which imports peft (and so torch).
"""

from __future__ import annotations

MTLORA_STRUCTURES: tuple[str, ...] = ("shim", "icfm", "ctcm", "dtsm")
DENSE_ADAPTER_PLACEMENTS: tuple[str, ...] = ("houlsby", "pfeiffer")
SVD_INITS: tuple[str, ...] = ("pissa", "lora-xs")  # the inits whose A and B come from the base weight (svd_init)
