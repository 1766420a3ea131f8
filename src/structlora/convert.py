"""structlora's own adapter-folder layout, and its conversion into PEFT's (`convert_folder`, `structlora convert`).

The save_pretrained of structlora's earlier model class (`structlora.model.PeftModel`, the public
`structlora.PeftModel` of earlier releases; BitFit still uses it) writes, per adapter ("default" at the top, the
others in a sub-folder named after them, as PEFT does):
- `adapter_config.json` with `peft_type` PEFT_TYPE_MARKER (releases before it: no `peft_type`; before resolved
  targets were recorded: `target_modules` null);
- `adapter_model.safetensors` keyed by module path without the adapter's name: `<module>.parameterization.lora_A`
  (LoRA, MTLoRA, LoRETTA_rep; PiSSA's `lora_A_initial`...), `<module>.adapter_down.bias` (bottleneck adapters),
  `<norm>.weight` (LoRETTA's trained norm copies), `classifier.dense.weight_tt.cores.0` (heads, modules_to_save)
  and `<module>.bias` (trained biases); its metadata records the adapter's structure (`structlora_config`, since
  then; `svd_start` since SVD starts were checked), which the loader compares with the config.

PEFT's layout (`peft.PeftModel.save_pretrained` of a structlora method) differs in the config's `peft_type` (the
method's StructloraPeftType), `inference_mode` true, and the keys: `base_model.model.` before each, and `.adapters.`
after the module of an adapter layer or a norm copy (`base_model.model.<module>.adapters.parameterization.lora_A`);
heads, modules_to_save and biases keep their path. The tensors themselves are the same.

A look-alike folder handed to PEFT's loaders fails at its `peft_type`: with structlora imported, with one error
naming `structlora convert` (`LookAlikeFolder`, in PEFT's config table); PEFT reads the weights file itself and
remaps the keys of heads before any hook of a tuner runs, so converting on load would need a patch of PEFT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import flush_tree
from .config import CONFIG_NAME, PEFT_TYPE_MARKER, AdapterConfig, BitFitConfig, LorettaAdpConfig, TaskType
from .names import ADAPTERS
from .svd_init import SVD_INITS
from .targets import CLASSIFIER_HEAD_NAMES, module_matches

WEIGHTS_NAME = "adapter_model.safetensors"
# The adapter's structure, stored in the safetensors metadata so that an adapter_config.json edited (or
# swapped) after saving is caught: e.g. `dtsm` and `ctcm` have the same tensors but compute different things.
CONFIG_METADATA_KEY = "structlora_config"
_UNCHECKED_CONFIG_FIELDS = ("inference_mode", "base_model_name_or_path", "init", "init_weights", "init_lora_weights",
                            "merge_weights", "peft_version", "auto_mapping", "revision")  # PEFT's provenance fields
PEFT_PREFIX = "base_model.model."
_LOW_RANK_ROOTS = ("parameterization",)
_BOTTLENECK_ROOTS = ("adapter_down", "adapter_up", "adapter_scaling")
CONVERT_HINT = "convert it once with `structlora convert SRC DST` (or structlora.convert_folder(src, dst))"


def structure_fields(config: AdapterConfig) -> dict[str, Any]:
    """What the weights file records of its adapter's structure (and the loader compares with the config)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _UNCHECKED_CONFIG_FIELDS}
    # `init` is free (a start does not change what trained weights compute), except an SVD start, whose frozen
    # factors make another trainable set: LoRA-XS weights loaded into a plain MTLoRA config would train A and B.
    # Files saved before this key are compared without it.
    fields["svd_start"] = getattr(config, "init", None) if getattr(config, "init", None) in SVD_INITS else None
    return fields


def check_saved_structure(metadata: dict[str, str], config: AdapterConfig, path: str) -> None:
    """ValueError when the structure recorded in the weights file at `path` differs from `config`'s. (Files
    written before the structure was recorded have no such metadata and are checked by shape only.)"""
    if CONFIG_METADATA_KEY not in metadata:
        return
    try:
        saved = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"corrupt {CONFIG_METADATA_KEY} metadata in {path!r}: {error}") from error
    current = structure_fields(config)
    if saved.get("target_modules", ()) is None:
        # Saved before resolved defaults were recorded: the loaded config's targets are the same defaults
        # resolved again, and a different module set is refused by the strict key check of the weights.
        del saved["target_modules"]
    differing = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    if differing:
        details = "; ".join(f"{k}: weights saved with {saved[k]!r}, config has {current[k]!r}" for k in differing)
        raise ValueError(f"{path!r} was saved from a different adapter than its config describes ({details}); "
                         f"refusing to load weights that would compute something else")


# -- PEFT's loaders meeting a look-alike folder -------------------------------------------------------------------
def _look_alike_message(where: str) -> str:
    return (f"{where} was written by the save_pretrained of structlora's earlier model class (structlora's own "
            f"layout, not PEFT's): {CONVERT_HINT}, then load DST with peft.PeftModel.from_pretrained "
            f"(structlora.PeftModel.from_pretrained loads it as it is)")


class LookAlikeFolder:
    """PEFT's config-table entry for PEFT_TYPE_MARKER (the `peft_type` of structlora's own folders): every way
    PEFT builds a config from such a folder (`PeftModel.from_pretrained`, `PeftConfig.from_pretrained`,
    AutoPeftModel, transformers' `load_adapter`) ends here, with one ValueError naming `structlora convert`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **_: Any) -> "LookAlikeFolder":
        where = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        raise ValueError(_look_alike_message(repr(os.path.normpath(where))))

    def __init__(self, **_: Any) -> None:
        raise ValueError(_look_alike_message("this adapter folder"))


# -- conversion ---------------------------------------------------------------------------------------------------
class _KeyMap:
    """structlora's key of one adapter's tensor → PEFT's, from the config and the file's keys alone (no model)."""

    def __init__(self, config: AdapterConfig, keys: list[str], path: str) -> None:
        self.config, self.keys, self.path = config, set(keys), path
        self.roots = _BOTTLENECK_ROOTS if isinstance(config, LorettaAdpConfig) else _LOW_RANK_ROOTS
        self.trained_in_full: set[str] = set()  # heads and modules_to_save found among the keys

    def peft_key(self, key: str) -> str:
        parts = key.split(".")
        if ADAPTERS in parts[:-1] or "original" in parts[:-1]:
            raise self._refusal(key, "a trained copy inside another one (nested wrappers), which PEFT's layout has "
                                     "no place for")
        root = next((i for i, part in enumerate(parts) if part in self.roots), None)
        if root:  # an adapter layer: `.adapters.` after its module (a base_layer nesting: the module itself)
            module = parts[:root]
            while module and module[-1] == "base_layer":
                module.pop()
            return PEFT_PREFIX + ".".join(module + [ADAPTERS] + parts[root:])
        owner = self._trained_in_full_owner(parts)
        if owner is not None:
            self.trained_in_full.add(owner)
            return PEFT_PREFIX + key
        module = ".".join(parts[:-1])
        if self.config.train_norms and parts[-1] in ("weight", "bias") and f"{module}.weight" in self.keys:
            return f"{PEFT_PREFIX}{module}.{ADAPTERS}.{parts[-1]}"  # a norm copy (its weight is always saved)
        if self.config.bias != "none" and parts[-1] == "bias":
            return PEFT_PREFIX + key  # a base bias the adapter trained
        raise self._refusal(key, "no adapter layer, head, modules_to_save entry, norm copy or trained bias of this "
                                 "config holds it")

    def _trained_in_full_owner(self, parts: list[str]) -> Optional[str]:
        """The head or modules_to_save module the key belongs to (the shortest matching prefix), if any."""
        heads = self.config.task_type == TaskType.SEQ_CLS
        deberta_pooler = (heads and getattr(self.config, "tensorize_classifier", False)
                          and (self.config.base_model_type or "").startswith("deberta"))
        for end in range(1, len(parts)):
            name = ".".join(parts[:end])
            if ((heads and parts[end - 1] in CLASSIFIER_HEAD_NAMES) or (deberta_pooler and name == "pooler")
                    or (self.config.modules_to_save and module_matches(name, self.config.modules_to_save))):
                return name
        return None

    def _refusal(self, key: str, why: str) -> ValueError:
        return ValueError(f"{self.path!r}: cannot convert tensor {key!r}: {why}; nothing was written")


def read_weights(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors and metadata of the weights file of adapter folder `folder`, and its path.

    Raises:
        FileNotFoundError: no weights file. ValueError: a corrupt one.
    """
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}: not a saved structlora adapter folder")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"corrupt adapter weights file {path!r}: {error}") from error
    return tensors, metadata, path


def _read_adapter(folder: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """One adapter folder of structlora's layout, in PEFT's: its config (ready to save) and its tensors."""
    tensors, metadata, path = read_weights(folder)
    if any(key.startswith(PEFT_PREFIX) for key in tensors):
        raise ValueError(f"{folder!r} is already in PEFT's layout (its keys start with {PEFT_PREFIX!r}): load it with "
                         f"peft.PeftModel.from_pretrained; there is nothing to convert")
    config = AdapterConfig.from_pretrained(folder)
    config_path = os.path.join(folder, CONFIG_NAME)
    if isinstance(config, BitFitConfig):
        raise ValueError(f"{config_path!r} is a BitFit adapter, which has no PEFT tuner (BitFit injects no layer): it "
                         f"cannot be converted; load it with structlora.PeftModel.from_pretrained")
    check_saved_structure(metadata, config, path)
    if not tensors:
        raise ValueError(f"{path!r} holds no tensors: nothing to convert")
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"{path!r}: tensor {bad[0]!r} has non-finite values (NaN/inf): refusing to convert a diverged "
                         f"or corrupt adapter")
    keys = _KeyMap(config, list(tensors), path)
    converted = {keys.peft_key(key): value for key, value in tensors.items()}
    owners = sorted(keys.trained_in_full - set(config.modules_to_save or ()))
    if owners:  # PEFT trains (and loads) a module in full only when modules_to_save names it
        config.modules_to_save = list(config.modules_to_save or ()) + owners
    config.inference_mode = True  # as PEFT saves it; from_pretrained(is_trainable=True) unfreezes
    config._in_peft_model = True  # saved with its StructloraPeftType, not PEFT_TYPE_MARKER
    return config, converted


def _adapter_folders(src: str) -> dict[str, str]:
    """{relative folder: path} of every adapter in `src`: its top ("default") and its named sub-folders."""
    found = {}
    if os.path.isfile(os.path.join(src, CONFIG_NAME)):
        found[""] = src
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.startswith(".") and os.path.isfile(os.path.join(path, CONFIG_NAME)):
            found[name] = path
    return found


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep) or real_src.startswith(real_dst + os.sep):
        raise ValueError(f"the destination {dst!r} is, or is inside or around, the source {src!r}: write the "
                         f"converted folder elsewhere (the source stays as it is)")
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise ValueError(f"the destination {dst!r} exists and is not a folder: choose another destination")
        if not overwrite:
            raise FileExistsError(f"the destination {dst!r} exists: choose another folder, or pass overwrite=True "
                                  f"(--overwrite) to replace it")


def convert_folder(src: str, dst: str, *, overwrite: bool = False) -> list[str]:
    """Write a copy of an adapter folder saved by `structlora.PeftModel.save_pretrained` (this or an earlier
    release) in PEFT's layout, which `peft.PeftModel.from_pretrained(base, dst)` loads (with structlora imported)
    into a model whose outputs equal those of `structlora.PeftModel.from_pretrained(base, src)`. Every adapter of
    the folder is converted: "default" at the top, the others in their sub-folders (`load_adapter(dst/NAME, NAME)`).

    Args:
        src: the structlora adapter folder (left as it is).
        dst: the new folder. Written aside and renamed into place: an error leaves no `dst` (or the old one).
        overwrite: replace an existing `dst`.
    Returns:
        The sub-folders converted ("" for the top).
    Raises:
        FileNotFoundError: `src` holds no adapter. FileExistsError: `dst` exists and not `overwrite`.
        ValueError: what cannot be converted exactly (a BitFit adapter, a folder already in PEFT's layout, weights
            whose recorded structure differs from the config, non-finite weights, a tensor no part of the config
            explains), naming the file; nothing is written then.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no adapter folder {src!r}")
    _check_destination(src, dst, overwrite)
    folders = _adapter_folders(src)
    if "" not in folders and "adapter" in folders and os.path.isfile(os.path.join(src, "results.json")):
        raise ValueError(f"{src!r} is a training run's folder: convert its adapter, "
                         f"{os.path.join(src, 'adapter')!r} (structlora convert {os.path.join(src, 'adapter')} DST)")
    if not folders:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {src!r} or its sub-folders: not a saved structlora adapter "
                                f"folder")
    adapters = {name: _read_adapter(path) for name, path in folders.items()}  # all checked before anything is written
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        for name, (config, tensors) in adapters.items():
            folder = os.path.join(staging, name)
            config.save_pretrained(folder)
            save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        flush_tree(staging)
        _replace_folder(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return list(adapters)


def _replace_folder(staging: str, dst: str) -> None:
    """Rename `staging` to `dst`; an existing `dst` is moved aside first and removed only once the new one is in
    place (put back if the rename fails)."""
    if not os.path.lexists(dst):
        os.replace(staging, dst)
        return
    aside = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(os.path.abspath(dst)))
    os.rmdir(aside)
    os.replace(dst, aside)
    try:
        os.replace(staging, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# -- converting on load -----------------------------------------------------------------------------------------
def earlier_method(folder: str) -> Optional[str]:
    """The method of a folder written by structlora's earlier model class (its config's peft_type is the marker, or
    absent, as before that), or None for any other folder."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "method" in data and data.get("peft_type") in (None, PEFT_TYPE_MARKER):
        return str(data["method"])
    return None


def is_look_alike(folder: str) -> bool:
    return earlier_method(folder) is not None


@contextlib.contextmanager
def peft_layout(folder: str) -> Iterator[str]:
    """`folder` itself, or (for a folder of structlora's earlier model class) a converted copy in PEFT's layout that
    lives for the block."""
    if not is_look_alike(folder):
        yield folder
        return
    parent = tempfile.mkdtemp(prefix="structlora-converted-")
    try:
        converted = os.path.join(parent, "adapter")
        convert_folder(folder, converted)
        warnings.warn(f"{folder!r} is in the adapter layout of structlora's earlier model class: converted on load "
                      f"(`structlora convert {folder} NEW` writes it in PEFT's layout once)", UserWarning, stacklevel=4)
        yield converted
    finally:
        shutil.rmtree(parent, ignore_errors=True)
