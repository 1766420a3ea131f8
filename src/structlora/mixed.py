"""Several adapters in one batch, and replacing an adapter's weights in place.

`model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` run row i of the batch with
adapter `adapter_names[i]`, or with none for "__base__", as PEFT does. Inside the call the adapters are
disabled (every wrapper computes its base output) and temporary hooks add, per group of rows sharing an
adapter, that adapter's contribution to those rows: the low-rank update, a bottleneck adapter before, after or
beside its projection, a trained norm or head copy (PEFT's modules to save included). A row therefore gets what it
gets when run alone with its adapter active. Rows expanded by generate (beams, several return sequences) follow their source row.

`hotswap_adapter` writes another saved adapter's weights into an existing adapter in place (of structlora's model, or
of a peft.PeftModel of a structlora method): no module is
rebuilt, the parameters stay the same objects, so an optimizer or a `torch.compile`d model keeps working
without recompiling (tested with `error_on_recompile`).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterator, Protocol

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .adapter_state import BASE_ADAPTER
from .config import AdapterConfig, LoraConfig
from .engine import add_lowrank_embedding_update, add_lowrank_update
from .bottleneck_layers import BottleneckLayer
from .layers import LowRankLayer, TrainableCopy



class RoutableModel(Protocol):
    """What routing rows and hot-swapping read of a model: structlora's PeftModel, or the PEFT tuner's view of
    itself (`peft_tuner`). A protocol, so that this module does not import the models built on it."""

    peft_config: dict[str, AdapterConfig]

    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]: ...

    def disable_adapter(self) -> contextlib.AbstractContextManager: ...

    def load_adapter_weights(self, directory: str, adapter_name: str | None = None) -> None: ...

__all__ = ["BASE_ADAPTER", "hotswap_adapter", "routed_adapters", "input_rows"]


class _Routing:
    """Which rows use which adapter; index tensors made once per (batch size, device).

    One name per row. Inside `generate` (`expanded`), a multiple of that is legitimate: generate repeats each row
    for beams and returned sequences, and the copies follow their source row."""

    def __init__(self, names: list[str], expanded: bool = False) -> None:
        self.names = names
        self.expanded = expanded
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        key = (rows, device)
        if key not in self._groups:
            if rows != len(self.names) and (not self.expanded or rows % len(self.names)):
                raise _count_mismatch(self.names, rows)
            repeat = rows // len(self.names)  # generate repeats each row for beams / return sequences
            per_row = [name for name in self.names for _ in range(repeat)]
            groups = {}
            for row, name in enumerate(per_row):
                if name != BASE_ADAPTER:
                    groups.setdefault(name, []).append(row)
            self._groups[key] = [(name, torch.tensor(rows_, device=device)) for name, rows_ in groups.items()]
        return self._groups[key]


def _low_rank_hook(routing: _Routing):
    def hook(layer: LowRankLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for name, rows in routing.groups(x.shape[0], x.device):
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
            a_eff, b_eff = adapter.effective_factors(output.dtype)
            base_rows, x_rows = output.index_select(0, rows), x.index_select(0, rows)
            if layer.kind == "embedding":
                base = layer.base_layer
                updated = add_lowrank_embedding_update(
                    base_rows, x_rows, a_eff, b_eff, padding_idx=base.padding_idx, max_norm=base.max_norm,
                    norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            else:
                updated = add_lowrank_update(base_rows, adapter.dropout(x_rows).to(output.dtype), a_eff, b_eff)
            output = output.index_copy(0, rows, updated)
        return output
    return hook


def _bottleneck_pre_hook(routing: _Routing):
    def hook(layer: BottleneckLayer, args: tuple) -> tuple | None:
        x = args[0]
        for name, rows in routing.groups(x.shape[0], x.device):
            if name in layer.adapters and layer.placements[name] == "input":
                x_rows = x.index_select(0, rows)
                x = x.index_copy(0, rows, x_rows + layer.adapters[name](x_rows))
        return (x, *args[1:])
    return hook


def _bottleneck_hook(routing: _Routing):
    def hook(layer: BottleneckLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (as modified by the pre-hook only in rows whose placement is "input")
        for name, rows in routing.groups(output.shape[0], output.device):
            placement = layer.placements.get(name)
            if placement not in ("output", "parallel"):
                continue
            out_rows = output.index_select(0, rows)
            source = out_rows if placement == "output" else x.index_select(0, rows)
            output = output.index_copy(0, rows, out_rows + layer.adapters[name](source))
        return output
    return hook


def _copy_of(wrapper: nn.Module, name: str) -> Callable[..., Any] | None:
    """Adapter `name`'s copy of the module that `wrapper` holds (a trained norm, a head, a module to save), as the
    model computes it; None when the adapter has no copy there (its rows keep the original's output)."""
    if isinstance(wrapper, ModulesToSaveWrapper):  # PEFT's: modules_to_save and classification heads
        copies = wrapper.modules_to_save
        return copies[name] if name in copies else None
    return partial(wrapper.run_copy, name) if name in wrapper.adapters else None


def _copy_hook(routing: _Routing):
    """Rows of an adapter that has a copy of this module get that copy's output; the others keep the original's (the
    wrapper runs disabled)."""
    def hook(wrapper: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not args:
            original = wrapper.original_module if isinstance(wrapper, ModulesToSaveWrapper) else wrapper.original
            raise TypeError(f"adapter_names: a trained copy of {type(original).__name__} returning "
                            f"{type(output).__name__} cannot be routed per row")
        x = args[0]
        for name, rows in routing.groups(x.shape[0], x.device):
            run = _copy_of(wrapper, name)
            if run is not None:
                row_args = (x.index_select(0, rows), *args[1:])
                output = output.index_copy(0, rows, run(*row_args, **kwargs).to(output.dtype))
        return output
    return hook


def _check_names(model: RoutableModel, adapter_names: Any) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"adapter_names must be a non-empty list with one adapter name per row, got {adapter_names!r}")
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in model.peft_config})
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {', '.join(map(repr, unknown))}; adapters: "
                         f"{', '.join(model.peft_config)}, or {BASE_ADAPTER!r} for the base model")
    return list(adapter_names)


def _count_mismatch(names: list[str], rows: int) -> ValueError:
    return ValueError(f"adapter_names has {len(names)} entries, but the batch has {rows} rows: give exactly one "
                      f"adapter name per row ({BASE_ADAPTER!r} for the base model)")


def input_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward's or generate's inputs (input_ids, inputs_embeds or the first argument), or
    None when there is no such tensor."""
    for candidate in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(candidate, torch.Tensor) and candidate.dim() > 0:
            return candidate.shape[0]
    return None


@contextlib.contextmanager
def routed_adapters(model: RoutableModel, adapter_names: list[str], rows: int | None = None,
                    expanded: bool = False) -> Iterator[None]:
    """Inside the block, row i of every batch runs with adapter `adapter_names[i]` ("__base__": none).

    `rows`: the batch size of the inputs, checked against the names before anything runs. `expanded`: inside
    `generate`, whose batches hold each input row several times (beams, returned sequences)."""
    names = _check_names(model, adapter_names)
    if rows is not None and rows != len(names):
        raise _count_mismatch(names, rows)
    routing = _Routing(names, expanded)
    handles = []
    with model.disable_adapter():  # refused while merged: a merged ΔW would apply to every row
        try:
            for _, wrapper in model._wrappers():
                if isinstance(wrapper, LowRankLayer):
                    handles.append(wrapper.register_forward_hook(_low_rank_hook(routing)))
                elif isinstance(wrapper, BottleneckLayer):
                    handles.append(wrapper.register_forward_pre_hook(_bottleneck_pre_hook(routing)))
                    handles.append(wrapper.register_forward_hook(_bottleneck_hook(routing)))
                elif isinstance(wrapper, (TrainableCopy, ModulesToSaveWrapper)):
                    handles.append(wrapper.register_forward_hook(_copy_hook(routing), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


# Config fields that change only values, not the module tree: a hot swap may differ in these (and in what PEFT records
# of where and with which release a folder was saved).
_SWAPPABLE_FIELDS = {"lora_alpha", "lora_dropout", "base_model_name_or_path", "inference_mode", "init",
                     "init_lora_weights", "init_weights", "base_model_type", "peft_version", "revision",
                     "auto_mapping"}


def hotswap_adapter(model: Any, model_id: str, adapter_name: str = "default") -> None:
    """Replace the weights of `adapter_name` with those saved in `model_id`, in place.

    `model`: a structlora.PeftModel (folder saved by its save_pretrained), or a peft.PeftModel of a structlora method
    (folder saved by peft's save_pretrained; the same as `peft_model.hotswap_adapter(model_id, adapter_name)`).
    The saved adapter must have the same structure (method, targets, ranks, …); a different `lora_alpha` sets
    the new scaling (a Python float: under torch.compile that one change recompiles). Checked before anything
    is written; refused while an adapter is merged."""
    if isinstance(model, PeftModel):
        swap = getattr(model.base_model, "hotswap_adapter", None)
        if swap is None:
            raise TypeError(f"hotswap_adapter: this peft.PeftModel holds {type(model.base_model).__name__} adapters, "
                            f"not a structlora method's; for PEFT's own methods use peft.utils.hotswap.hotswap_adapter")
        swap(model_id, adapter_name)
        return
    swap_adapter_weights(model, model_id, adapter_name, AdapterConfig.from_pretrained)


def swap_adapter_weights(model: RoutableModel, model_id: str, adapter_name: str,
                         read_config: Callable[[str], AdapterConfig]) -> None:
    """hotswap_adapter's work on either model: the saved config (`read_config(model_id)`) compared with the
    adapter's, the weights loaded (`model.load_adapter_weights`, which checks them all before the first write), the
    scaling updated."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"hotswap_adapter: no adapter named {adapter_name!r}; adapters: "
                         f"{', '.join(model.peft_config)}")
    current, new = model.peft_config[adapter_name], read_config(model_id)
    old_fields, new_fields = current.to_dict(), new.to_dict()
    different = sorted(k for k in old_fields.keys() | new_fields.keys()
                       if k not in _SWAPPABLE_FIELDS and old_fields.get(k) != new_fields.get(k)
                       # an older folder saved default targets as None; the weights' strict key check compares them
                       and not (k == "target_modules" and new_fields.get(k) is None))
    if different:
        raise ValueError(f"hotswap_adapter: {model_id!r} is not the same adapter structure as {adapter_name!r} "
                         f"(differs in {', '.join(different)}); load it with model.load_adapter(path, new_name)")
    alpha_changes = isinstance(current, LoraConfig) and new.lora_alpha != current.lora_alpha
    previous_alpha = getattr(current, "lora_alpha", None)
    if alpha_changes:
        current.lora_alpha = new.lora_alpha  # the weights file records the alpha it was saved with
    try:
        model.load_adapter_weights(model_id, adapter_name)
    except BaseException:
        if alpha_changes:
            current.lora_alpha = previous_alpha
        raise
    if alpha_changes:
        for _, wrapper in model._wrappers():
            if isinstance(wrapper, LowRankLayer) and adapter_name in wrapper.adapters:
                wrapper.adapters[adapter_name].scaling = current.scaling
