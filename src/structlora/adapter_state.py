"""Which adapters a `PeftModel` has and what state they are in, with the legal transitions between states.

`AdapterState` is the single source of truth for: the adapters that exist (in the order they were added),
the active one, the merged ones, how deep `disable_adapter()` blocks are nested, and whether the model was
unloaded (`merge_and_unload()`). Every `check_*` method raises `AdapterStateError` for an illegal transition
*before* anything is touched; the matching mutator (`add`, `activate`, `mark_merged`, …) is called only after
the operation succeeded. Every transition bumps `version`, so a cache of anything derived from the adapter
state (factors, fused weights) can tell that it is stale by comparing one integer.

States of the model as a whole:

    unmerged ──merge──▶ merged ──unmerge──▶ unmerged
       │  ▲                                     (merged: no add/load/replace of weights, no switch to another
    disable/exit                                 adapter, no disable)
       ▼  │
    disabled (nested: a depth counter; no merge inside; disable_adapters()/enable_adapters(): a flag beside it)

    any ──merge_and_unload──▶ unloaded (terminal: everything but the plain forward is refused)
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from torch import nn

# A name becomes a key of nn.ModuleDict (no '.'), a path segment of parameter names and, for adapters other
# than "default", a sub-folder of save_pretrained's directory ('/', '..' would write outside it).
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# Path segments the wrappers use themselves: an adapter with one of these names would be taken for them.
RESERVED_NAMES = frozenset({"base_layer", "original", "adapters", "parameterization"})
# In `adapter_names` (one adapter per row of a batch) this name means "no adapter: the base model", as in PEFT.
BASE_ADAPTER = "__base__"


class AdapterStateError(ValueError, RuntimeError):
    """An operation that is illegal in the adapter's current state (nothing was changed).

    A ValueError as every refusal of the library; also a RuntimeError, which `disable_adapter()` raised before.
    """


def refuse_base_adapter_name(name: object) -> None:
    """ValueError for BASE_ADAPTER, which `adapter_names=[...]` reads as "no adapter" (an adapter of that name
    would silently never run)."""
    if name == BASE_ADAPTER:
        raise ValueError(f"invalid adapter_name {name!r}: reserved, as in PEFT — in adapter_names=[...] it means the "
                         f"base model (no adapter) for that row; choose another name")


def validate_adapter_name(name: object) -> str:
    """The name itself, or a TypeError/ValueError saying what a valid adapter name is."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a string, got {type(name).__name__} {name!r}")
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid adapter_name {name!r}: use a letter or '_' followed by up to 63 letters, digits, '_' or '-' "
            f"(it becomes a module key and a folder name, so '.', '/' and spaces are not allowed)")
    refuse_base_adapter_name(name)
    if name in RESERVED_NAMES:
        raise ValueError(f"invalid adapter_name {name!r}: reserved for structlora's own modules "
                         f"({', '.join(sorted(RESERVED_NAMES))}); choose another name")
    return name


class AdapterState:
    """The adapter registry and merge/disable state of one `PeftModel` (see the module docstring)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled_depth = 0
        self.switched_off = False  # disable_adapters() until enable_adapters() (PEFT's / transformers' names)
        self.unloaded = False
        self.version = 0

    # -- queries -----------------------------------------------------------------------------------------
    @property
    def disabled(self) -> bool:
        return self.disabled_depth > 0 or self.switched_off

    def _where_disabled(self) -> str:
        return "inside a disable_adapter() block" if self.disabled_depth else "while disable_adapters() is in effect"

    def _how_to_enable(self) -> str:
        return "leave the block first" if self.disabled_depth else "call enable_adapters() first"

    @property
    def is_merged(self) -> bool:
        return bool(self.merged)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def describe(self) -> str:
        """A one-line summary for error messages."""
        parts = [f"adapters: {', '.join(self.names) or '(none)'}", f"active: {self.active}"]
        if self.merged:
            parts.append(f"merged: {', '.join(self.merged)}")
        if self.disabled_depth:
            parts.append(f"disabled (depth {self.disabled_depth})")
        if self.switched_off:
            parts.append("disabled by disable_adapters()")
        if self.unloaded:
            parts.append("unloaded")
        return "; ".join(parts)

    # -- checks: raise before anything is touched -------------------------------------------------------
    def check_usable(self, operation: str) -> None:
        if self.unloaded:
            raise AdapterStateError(
                f"{operation}: this PeftModel was unloaded by merge_and_unload(); its adapters are folded into the "
                f"returned base model and no longer exist here. Save the adapter before merge_and_unload(), or "
                f"wrap a fresh base model")

    def check_exists(self, name: str, operation: str) -> None:
        self.check_usable(operation)
        if name not in self.names:
            raise ValueError(f"{operation}: no adapter named {name!r}; adapters: {', '.join(self.names) or '(none)'}")

    def check_add(self, name: str) -> None:
        self.check_usable("add_adapter")
        validate_adapter_name(name)
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} already exists; choose another name")
        self._refuse_while_merged("add_adapter", "adding an adapter")
        if self.disabled:
            raise AdapterStateError(f"add_adapter {self._where_disabled()} is not allowed: {self._how_to_enable()}")

    def check_write_weights(self, name: str, operation: str) -> None:
        """Loading or replacing an adapter's weights."""
        self.check_exists(name, operation)
        self._refuse_while_merged(operation, f"writing the weights of adapter {name!r}")

    def check_activate(self, name: str) -> None:
        self.check_exists(name, "set_adapter")
        other = [m for m in self.merged if m != name]
        if other:
            raise AdapterStateError(
                f"set_adapter({name!r}): adapter {other[0]!r} is merged into the base weights, so switching would "
                f"apply both. Call unmerge_adapter() first")

    def check_merge(self) -> None:
        self.check_usable("merge_adapter")
        if self.active is None:
            raise AdapterStateError("merge_adapter: there is no active adapter")
        if self.disabled:
            raise AdapterStateError(
                f"merge_adapter {self._where_disabled()} is not allowed: the model must compute the base model "
                f"there; {self._how_to_enable()}")

    def check_disable(self) -> None:
        self.check_usable("disable_adapter")
        if self.merged:
            raise AdapterStateError(
                f"disable_adapter: adapter {self.merged[0]!r} is merged into the base weights, which cannot be "
                f"disabled. Call unmerge_adapter() first")

    def check_delete(self, name: str) -> None:
        self.check_exists(name, "delete_adapter")
        if name in self.merged:
            raise AdapterStateError(f"delete_adapter({name!r}): it is merged into the base weights, which would keep "
                                    f"its ΔW for good. Call unmerge_adapter() first")
        if self.names == [name]:
            raise AdapterStateError(
                f"delete_adapter({name!r}): it is the only adapter; a PeftModel keeps at least one. For the base model "
                f"use disable_adapters() / `with disable_adapter():`, or merge_and_unload() to fold it in")

    def check_save(self, names: Iterable[str]) -> None:
        self.check_usable("save_pretrained")
        for name in names:
            self.check_exists(name, "save_pretrained")

    def _refuse_while_merged(self, operation: str, what: str) -> None:
        if self.merged:
            raise AdapterStateError(
                f"{operation}: adapter {self.merged[0]!r} is merged into the base weights; {what} now would leave "
                f"the base weights inconsistent. Call unmerge_adapter() first")

    # -- transitions: called once the operation succeeded ------------------------------------------------
    def _changed(self) -> None:
        self.version += 1

    def add(self, name: str) -> None:
        self.check_add(name)
        self.names.append(name)
        self._changed()

    def activate(self, name: str) -> None:
        self.check_activate(name)
        self.active = name
        self._changed()

    def mark_merged(self, name: str) -> None:
        if name not in self.merged:
            self.merged.append(name)
        self._changed()

    def mark_unmerged(self) -> None:
        self.merged.clear()
        self._changed()

    def enter_disabled(self) -> None:
        self.check_disable()
        self.disabled_depth += 1
        self._changed()

    def switch_off(self) -> None:
        """disable_adapters(): disabled until switch_on (a flag, not a depth: calling it twice is harmless)."""
        self.check_disable()
        self.switched_off = True
        self._changed()

    def switch_on(self) -> None:
        if self.disabled_depth:
            raise AdapterStateError("enable_adapters() inside a disable_adapter() block: the block computes the base "
                                    "model until it ends; leave the block instead")
        self.check_usable("enable_adapters")
        self.switched_off = False
        self._changed()

    def remove(self, name: str) -> None:
        self.check_delete(name)
        self.names.remove(name)
        if self.active == name:
            self.active = None
        self._changed()

    def exit_disabled(self) -> None:
        if self.disabled_depth == 0:
            raise AdapterStateError("exit_disabled without a matching enter_disabled")
        self.disabled_depth -= 1
        self._changed()

    def weights_written(self) -> None:
        """An adapter's weights were loaded or replaced in place."""
        self._changed()

    def snapshot(self) -> "AdapterState":
        return copy.deepcopy(self)

    def restore(self, saved: "AdapterState") -> None:
        """Back to `saved` after a failed operation; the version still moves on (caches rebuild, never reuse)."""
        version = self.version
        self.__dict__.update(copy.deepcopy(saved).__dict__)
        self.version = version + 1

    def mark_unloaded(self) -> None:
        self.unloaded = True
        self.merged.clear()
        self._changed()


class ModuleSnapshot:
    """Enough of a module tree to undo a failed injection: every module's children, the bottleneck placements,
    every parameter's requires_grad and the root's forward pre-hooks. Weights are not copied (an injection
    replaces modules; it never writes base weights)."""

    def __init__(self, root: "nn.Module") -> None:
        self.root = root
        modules = list(root.modules())
        self.children = [(module, dict(module._modules)) for module in modules]
        self.placements = [(module, dict(module.placements)) for module in modules
                           if isinstance(getattr(module, "placements", None), dict)]
        self.requires_grad = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
        self.pre_hooks = set(root._forward_pre_hooks)

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, placements in self.placements:
            module.placements.clear()
            module.placements.update(placements)
        for parameter, flag in self.requires_grad:
            parameter.requires_grad_(flag)
        for key in [key for key in self.root._forward_pre_hooks if key not in self.pre_hooks]:
            self.root._forward_pre_hooks.pop(key)
