"""Adapter configurations: PEFT configs (`peft.PeftConfig` subclasses), saved as `adapter_config.json`.

Each method has its own `peft_type` (`StructloraPeftType`), which PEFT's loaders use to find the config class and
the tuner (`structlora.peft_method` writes both into PEFT's tables). Importing this module imports peft and checks
that its version is one structlora is tested with (`SUPPORTED_PEFT`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Union

from . import _plugin
from .config_checks import (portable_model_name, require_bool, require_choice, require_names, require_number,
                            require_positive, require_slices)
from .names import DENSE_ADAPTER_PLACEMENTS, MTLORA_STRUCTURES, SVD_INITS
from .peft_support import StructloraPeftType, peft_load_call, refuse_unloadable_weights, require_supported_peft

require_supported_peft()

from peft import PeftConfig  # noqa: E402 - only once the version is known to be one we support

CONFIG_NAME = "adapter_config.json"
# Written as `peft_type` in our adapter_config.json. PEFT's loaders (PeftModel / PeftConfig / AutoPeftModel
# .from_pretrained) look this key up in their table of methods and fail with a KeyError quoting the value, so
# the value is the instruction a user meeting that error needs. Our loader ignores the key.
PEFT_TYPE_MARKER = ("structlora adapter folder, not a PEFT one: load it with structlora.PeftModel.from_pretrained("
                    "model, path), or write a PEFT LoRA folder from it with structlora.export_to_peft(peft_model, "
                    "out_dir)")


class TaskType(str, enum.Enum):
    """The model head an adapter is made for (PEFT's names). SEQ_CLS also trains and saves the classifier head."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"


_BIAS_CHOICES = ("none", "all", "lora_only", "adapter_only")



@dataclass
class AdapterConfig(PeftConfig):
    """Fields shared by every method (a base class: build one of the method configs below). A `peft.PeftConfig`:
    `peft.get_peft_model(model, config)` builds a `peft.PeftModel` with structlora's layers (`structlora.peft_method`).

    Args:
        target_modules: the modules to adapt: a list of names (a module matches when its name equals an entry
            or ends in `.entry`) or one regex matched against the whole name. None: the method's default for
            the architecture (e.g. query/value for BERT); the saved config records what it resolved to.
        bias: "none"; "all" trains every bias of the base model; "lora_only" / "adapter_only" the biases of
            the adapted modules.
        task_type: a TaskType or its name. SEQ_CLS trains and saves the classifier head with the adapter.
        modules_to_save: further modules trained as a whole and saved with the adapter.
        train_norms: train per-adapter copies of the layer norms.
        base_model_name_or_path: the base model's Hub id or folder name; filled in from the model when None.
        base_model_type: the base model's `model_type`, recorded when the adapter is added; loading the
            adapter onto another type is refused.
        inference_mode: freeze the adapter's weights (from_pretrained sets it unless `is_trainable`).
        trainable_token_indices: not supported (PEFT's trainable tokens); None. Named because TRL reads it.

    PEFT's own fields (`peft_type`, `peft_version`, `revision`, `auto_mapping`) are set as PEFT sets them;
    `peft_type` is the method's (`StructloraPeftType`) and cannot be changed.

    Raises:
        ValueError, TypeError: a field has a wrong value or type; the message names the field.
    """

    target_modules: Union[list[str], str, None] = None
    bias: str = "none"
    task_type: Union[TaskType, str, None] = None
    modules_to_save: Union[list[str], None] = None
    train_norms: bool = False
    base_model_name_or_path: Union[str, None] = None
    base_model_type: Union[str, None] = None  # recorded at save time; loading onto another type is an error
    inference_mode: bool = False
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None  # read by TRL; must stay None

    method: str = ""  # set by each config class; a saved config's value is checked against the class

    _peft_type = None  # the method's StructloraPeftType (each config class sets its own; not a field)

    def __post_init__(self) -> None:
        _plugin.register_when_possible()  # if the import of this module could not (see structlora._plugin)
        self._check_task_type()
        super().__post_init__()  # PEFT's: its own task type check, peft_version
        self._set_peft_type()
        if self.method and CONFIG_CLASSES.get(self.method) is not type(self) and type(self) in CONFIG_CLASSES.values():
            raise ValueError(f"method {self.method!r} does not fit {type(self).__name__}: a corrupt or hand-edited "
                             f"adapter_config.json, or a config built from another method's fields")
        if self.trainable_token_indices is not None:
            raise ValueError("trainable_token_indices (PEFT's trainable tokens) is not supported by structlora's "
                             "methods; leave it None (train the embeddings with modules_to_save instead)")
        require_choice("bias", self.bias, _BIAS_CHOICES)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(
                self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        require_names("target_modules", self.target_modules, allow_regex=True)
        require_names("modules_to_save", self.modules_to_save, allow_regex=False)
        require_bool("train_norms", self.train_norms)
        require_bool("inference_mode", self.inference_mode)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict: task_type as its name, plus `method` (which config class it is)."""
        data = dataclasses.asdict(self)
        data["task_type"] = self.task_type.value if isinstance(self.task_type, enum.Enum) else self.task_type
        data["peft_type"] = self.peft_type.value if isinstance(self.peft_type, enum.Enum) else self.peft_type
        data["method"] = self.method
        return data

    def _check_task_type(self) -> None:
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            require_choice("task_type", self.task_type, tuple(t.value for t in TaskType))
            self.task_type = TaskType(self.task_type)
        elif self.task_type is not None and not isinstance(self.task_type, TaskType):
            raise TypeError(f"task_type must be one of {', '.join(t.value for t in TaskType)} or None, "
                            f"got {self.task_type!r}")

    def _set_peft_type(self) -> None:
        """peft_type is the class's own: None, its value, or PEFT_TYPE_MARKER (folders of earlier releases)."""
        own = type(self)._peft_type
        given = self.peft_type
        if given is not None and given != PEFT_TYPE_MARKER and (own is None or given != own):
            raise ValueError(f"peft_type {given!r} does not fit {type(self).__name__} (its peft_type is "
                             f"{own.value if own is not None else None!r}); leave peft_type unset")
        self.peft_type = own

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (created if needed). The base model is recorded by a
        portable name (`portable_model_name`).

        `peft_type` is the method's StructloraPeftType when the config belongs to a `peft.PeftModel` (PEFT's and
        transformers' save paths: those folders load with peft.PeftModel.from_pretrained once structlora is
        imported), else PEFT_TYPE_MARKER (structlora.PeftModel's own folder format), so that PEFT's loaders fail
        with a message naming structlora's loader and `export_to_peft`. `auto_mapping_dict` (from PEFT) is stored
        as `auto_mapping`; other keyword arguments are ignored."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory!r} is a file")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data["base_model_name_or_path"] = portable_model_name(self.base_model_name_or_path)
        if kwargs.get("auto_mapping_dict") is not None:
            data["auto_mapping"] = kwargs["auto_mapping_dict"]
        if not getattr(self, "_in_peft_model", False):
            data["peft_type"] = PEFT_TYPE_MARKER
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)


    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        """The config of the method that `data["method"]` names, built from `data` (other keys are ignored).

        Raises:
            ValueError: `method` is missing or unknown (a PEFT or `loretta` config is named as such), or a field
                is invalid.
        """
        method = data.get("method")
        peft_type = data.get("peft_type")
        if method is None and isinstance(peft_type, str) and peft_type != PEFT_TYPE_MARKER:
            raise ValueError(
                f"this adapter config is PEFT's (peft_type {peft_type!r}), not structlora's: load it with "
                "peft.PeftModel.from_pretrained (a `loretta` package folder loads with structlora.from_loretta)")
        if method not in CONFIG_CLASSES:
            raise ValueError(
                f"adapter config names method {method!r}, which structlora does not know; valid: "
                f"{', '.join(CONFIG_CLASSES)} (a `loretta` package folder loads with structlora.from_loretta)"
            )
        cls = CONFIG_CLASSES[method]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Union[str, None] = None,
                        **kwargs: Any) -> "AdapterConfig":
        """Read `adapter_config.json` from a folder written by save_pretrained (structlora's or PEFT's save path).

        Args:
            pretrained_model_name_or_path: the adapter folder; a name that is not a local folder goes to PEFT's
                loader (the Hub), with `kwargs` (revision, token, ...).
            subfolder: a folder inside it holding the config.

        Raises:
            FileNotFoundError: the folder has no adapter_config.json.
            ValueError: the file is not valid JSON, not a structlora config, or (on a method's class, e.g.
                MTLoraConfig.from_pretrained) another method's config.
        """
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path) and kwargs and not os.path.exists(directory):
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a saved structlora adapter folder")
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"corrupt adapter config {path!r}: {error}") from error
            if not isinstance(data, dict):
                raise ValueError(f"corrupt adapter config {path!r}: expected a JSON object")
            config = AdapterConfig.from_dict(data)
            if peft_load_call() is not None:  # PEFT's loaders, before they inject (see structlora.peft_rollback)
                refuse_unloadable_weights(directory)
        if not isinstance(config, cls):
            raise ValueError(f"{path!r} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: ΔW = (lora_alpha / r) · B · A. A Kaiming-uniform, B zero (output unchanged at init).

    Args:
        r: the rank.
        lora_alpha: the scale numerator (ΔW is scaled by lora_alpha / r); None means r.
        use_rslora: rank-stabilised scaling lora_alpha / √r instead of lora_alpha / r (Kalajdzievski 2023).
        init: "default" (A Kaiming-uniform, B zero) or "pissa" (Meng et al. 2024: A and B from the top-r singular
            vectors of the base weight W; the model is the residual W − s·B₀·A₀ plus s·B·A; `structlora.svd_init`).
        lora_dropout: dropout on the adapter's input, in [0, 1).
        enable_lora: for fused projections (GPT-2's c_attn = q, k, v): which slices get an adapter, as a list
            for every target or a dict from a module-name suffix to its list. None: no fused projections.
        fan_in_fan_out: None detects the weight layout (transformers' Conv1D stores in x out); a value that
            does not fit the layer is refused.
        init_lora_weights: PEFT's field of that name, true or false. True: the start `init` gives. False: B (a
            tensor train B's last core) is drawn as A is instead of zero, so the adapter changes the output from the
            start (PEFT's meaning; for tests). Not with an SVD start (init "pissa", "lora-xs"), which fixes B.
            Folders saved without the key load as True.
    """

    _peft_type = StructloraPeftType.LORA

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # Fused projections (GPT-2 c_attn = q,k,v): a list applies to every target, a dict maps a
    # module-name suffix to its list. None: every target is an ordinary (unfused) projection.
    enable_lora: Union[list[bool], dict[str, list[bool]], None] = None
    fan_in_fan_out: Union[bool, None] = None  # None: detected (transformers Conv1D stores in x out)
    use_rslora: bool = False
    init: str = "default"
    init_lora_weights: bool = True  # PEFT's name: False draws B as A (the adapter changes the output at the start)

    _INIT_CHOICES = ("default", "pissa")  # the valid `init` values (a class attribute, not a field)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "lora"
        require_positive("r", self.r)
        require_bool("use_rslora", self.use_rslora)
        require_choice("init", self.init, self._INIT_CHOICES)
        require_bool("init_lora_weights", self.init_lora_weights)
        if not self.init_lora_weights and self.init in SVD_INITS:
            raise ValueError(f"init_lora_weights=False (a random, non-zero start) does not fit init {self.init!r}, "
                             f"whose A and B come from the SVD of the base weight; use init_lora_weights=True with "
                             f"init {self.init!r}, or another init")
        require_number("lora_dropout", self.lora_dropout, 0.0, 1.0, low_inclusive=True)
        if self.init == "pissa" and self.lora_dropout > 0:
            raise ValueError("init 'pissa' needs lora_dropout=0: PiSSA's start W_r = s·B₀·A₀ is part of the weight, "
                             "so dropout on the adapter's input would drop part of the base model's function too")
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        require_number("lora_alpha", self.lora_alpha, 0.0)
        if isinstance(self.enable_lora, tuple):
            self.enable_lora = list(self.enable_lora)
        if isinstance(self.enable_lora, dict):
            if not self.enable_lora:
                raise TypeError("enable_lora must not be an empty dict (use None for unfused projections)")
            for key, slices in self.enable_lora.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"enable_lora keys must be module names, got {key!r}")
                require_slices(f"enable_lora[{key!r}]", list(slices) if isinstance(slices, tuple) else slices)
        elif self.enable_lora is not None:
            require_slices("enable_lora", self.enable_lora)
        require_bool("fan_in_fan_out", self.fan_in_fan_out, allow_none=True)

    @property
    def scaling(self) -> float:
        """lora_alpha / r (lora_alpha / √r with use_rslora), the factor ΔW is scaled by."""
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class MTLoraConfig(LoraConfig):
    """MTLoRA: ΔW = (lora_alpha / r) · B · T · A with a learnable r×r transformation T.

    Args:
        structure: "shim" T=C, "icfm" T=C·Cᵀ, "ctcm" T=C·D, "dtsm" T=C+D.
        init: "reference" (the authors' code: A, C, D Kaiming-uniform a=√5, B=0), "identity" (T starts at I),
            "pissa" (A, B from the SVD of W as LoraConfig's, T = I) or "lora-xs" (Bałazy et al. 2024: A = Σ_r·V_rᵀ
            and B = U_r from the SVD of W, frozen; only T's C (and D) trained, T = 0 at the start; not with
            icfm, whose T = C·Cᵀ has a zero gradient at C = 0).

    The LoRA fields (r, lora_alpha, target_modules, …) are LoraConfig's.
    """

    _peft_type = StructloraPeftType.MTLORA

    structure: str = "shim"
    init: str = "reference"

    _INIT_CHOICES = ("reference", "identity", "pissa", "lora-xs")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "mtlora"
        require_choice("structure", self.structure, MTLORA_STRUCTURES)
        if self.init == "lora-xs" and self.structure == "icfm":
            raise ValueError("init 'lora-xs' starts T at 0, and icfm's T = C·Cᵀ is 0 only at C = 0, where its gradient "
                             "is 0 too: T would never move. Use structure shim, ctcm or dtsm with lora-xs")


@dataclass
class LorettaRepConfig(LoraConfig):
    """LoRETTA_rep: LoRA whose A (in→r) and B (r→out) are tensor trains of TT rank `tensor_rank`.

    Args:
        lora_alpha: as LoraConfig's, default 16 (the authors').
        tensor_rank: the tensor-train rank of the A and B cores.
        train_norms: train the layer norms too (default True, as the authors).
        tensorize_classifier: SEQ_CLS only: the head's hidden dense layer becomes a tensor train.
        init: "default" (B's last core zero: output unchanged at init) or "reference" (the authors' Gaussian
            cores for both: ΔW starts as noise).
        merge_weights: accepted for `loretta` compatibility and ignored: merging is explicit (merge_adapter).
    """

    _peft_type = StructloraPeftType.LORETTA_REP

    lora_alpha: float = 16
    tensor_rank: int = 5
    train_norms: bool = True
    tensorize_classifier: bool = True  # SEQ_CLS: the head's hidden dense layer becomes a tensor train
    init: str = "default"
    merge_weights: bool = False  # accepted for `loretta` compatibility; merging is explicit here

    _INIT_CHOICES = ("default", "reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "loretta_rep"
        require_positive("tensor_rank", self.tensor_rank)
        require_bool("tensorize_classifier", self.tensorize_classifier)


_LORETTA_INIT_WEIGHTS = ("bert", "mam_adapter")  # loretta's init_weights values, accepted for compatibility
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "tanh", "silu", "swish", "sigmoid", "leaky_relu", "linear",
                   "identity", "mish", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu6", "elu")


@dataclass
class LorettaAdpConfig(AdapterConfig):
    """LoRETTA_adp: bottleneck adapters (down → act → up, + residual) with tensor-train projections.

    Args:
        bottleneck_size: the adapter's hidden width.
        non_linearity: the activation between the projections (a transformers activation name).
        adapter_dropout: dropout in the adapter, in [0, 1).
        scaling: the factor on the adapter's output, or "learned" (a trained scalar per adapter).
        use_parallel_adapter: put the adapter beside the projection instead of after it.
        tensor_rank: the tensor-train rank of the projections.
        tensorized: projections as tensor trains (False only in DenseAdapterConfig).
        tensorize_classifier: SEQ_CLS only: the head's hidden dense layer becomes a tensor train.
        train_norms: train the layer norms too (default True, as the authors).
        init: "default" (up projection's last core and bias zero: output unchanged at init) or "reference"
            (the authors' Gaussian cores and uniform biases).
        init_weights: PEFT's field of that name for its non-LoRA methods, true or false: True the start `init`
            gives, False the up projection (its last core) drawn instead of zero, so the adapter changes the output
            from the start (for tests). `loretta`'s values "bert" and "mam_adapter" are accepted and change nothing
            (they only affect dense adapters there).
        use_adapterp: accepted for `loretta` compatibility; not a separate variant here.

    Bottleneck adapters apply a non-linearity, so they cannot be merged into the weights or exported to PEFT.
    """

    _peft_type = StructloraPeftType.LORETTA_ADP

    bottleneck_size: int = 64
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    scaling: Union[float, str] = 1.0
    use_parallel_adapter: bool = False
    tensor_rank: int = 5
    tensorized: bool = True
    tensorize_classifier: bool = True
    train_norms: bool = True
    init: str = "default"
    # PEFT's bool (False: non-zero start), or loretta's "bert" / "mam_adapter", accepted and ignored as there
    init_weights: Union[bool, str] = "bert"
    use_adapterp: bool = False  # accepted for `loretta` compatibility; not a separate variant here

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "loretta_adp"
        require_positive("bottleneck_size", self.bottleneck_size)
        require_positive("tensor_rank", self.tensor_rank)
        require_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        require_choice("init", self.init, ("default", "reference"))
        if not isinstance(self.init_weights, bool) and self.init_weights not in _LORETTA_INIT_WEIGHTS:
            raise ValueError(f"init_weights must be true or false (PEFT's: false gives a non-zero start), or one of "
                             f"loretta's {', '.join(_LORETTA_INIT_WEIGHTS)}; got {self.init_weights!r}")
        if self.scaling != "learned":
            if isinstance(self.scaling, str):
                raise ValueError(f"scaling must be a number or 'learned', got {self.scaling!r}")
            require_number("scaling", self.scaling, 0.0)
        require_number("adapter_dropout", self.adapter_dropout, 0.0, 1.0, low_inclusive=True)
        for flag in ("use_parallel_adapter", "tensorized", "tensorize_classifier", "use_adapterp"):
            require_bool(flag, getattr(self, flag))




@dataclass
class DenseAdapterConfig(LorettaAdpConfig):
    """Dense bottleneck adapters (the papers' "Adapter" baselines): LoRETTA_adp's layer with plain
    nn.Linear down/up projections instead of tensor trains.

    placement: "houlsby" (Houlsby et al. 2019: after the attention output projection and after the FFN)
    or "pfeiffer" (Pfeiffer et al. 2021: after the FFN only). Each adapter is y + up(act(down(y))) on the
    projection's output, before the block's residual and layer norm. init "default": up projection zero
    (the model computes the base function at init); "reference": both projections N(0, 0.02).
    The tensor-train fields of LorettaAdpConfig are not used: tensorized and tensorize_classifier must stay
    False, and train_norms defaults to False.
    """

    _peft_type = StructloraPeftType.ADAPTER

    placement: str = "houlsby"
    tensorized: bool = False
    tensorize_classifier: bool = False
    train_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "adapter"
        require_choice("placement", self.placement, DENSE_ADAPTER_PLACEMENTS)
        if self.tensorized or self.tensorize_classifier:
            raise ValueError("DenseAdapterConfig is the dense adapter: tensorized and tensorize_classifier must be "
                             "False (LorettaAdpConfig gives tensor-train adapters)")


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit (Ben Zaken et al. 2022): train every bias of the base model (plus, for SEQ_CLS, the head);
    nothing is injected. The trained biases are saved and loaded like any adapter's weights.

    bias must stay "all" and target_modules unset (a ValueError otherwise)."""

    _peft_type = StructloraPeftType.BITFIT

    bias: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "bitfit"
        if self.bias != "all":
            raise ValueError(f"BitFit trains every bias: bias must be 'all', got {self.bias!r}")
        if self.target_modules:
            raise ValueError("BitFit injects no module: leave target_modules unset")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "mtlora": MTLoraConfig,
    "loretta_rep": LorettaRepConfig,
    "loretta_adp": LorettaAdpConfig,
    "adapter": DenseAdapterConfig,
    "bitfit": BitFitConfig,
}
CONFIG_CLASSES_BY_PEFT_TYPE: dict[StructloraPeftType, type[AdapterConfig]] = {
    cls._peft_type: cls for cls in CONFIG_CLASSES.values()}

# Last, once every class exists: structlora's methods into PEFT's tables (structlora.peft_method imports this
# module back; by now it finds everything it needs). See structlora._plugin for the other ways in.
_plugin.register_when_possible()
