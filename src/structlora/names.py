"""The names of MTLoRA's structures and of the dense adapters' placements, defined once.

A module of its own, without imports: the command line's `--help` lists them as choices and must not import
`structlora.config`, which imports peft (and so torch).
"""

from __future__ import annotations

MTLORA_STRUCTURES: tuple[str, ...] = ("shim", "icfm", "ctcm", "dtsm")
DENSE_ADAPTER_PLACEMENTS: tuple[str, ...] = ("houlsby", "pfeiffer")
