"""The adapter methods of the recipes: their flags, which method reads which flag, and the config each builds.

``add_method_arguments(parser)``: ``--method --structure --r --lora-alpha --lora-dropout --tensor-rank
--bottleneck-size --adapter-placement --num-virtual-tokens --encoder-hidden-size --target-modules --modules-to-save
--init``. ``check_method_flags(args)`` refuses a flag the method does not read; ``build_peft_config(args, task_type)``
is the structlora config (None for ``--method full``); ``wrap_model`` applies it (``adapter_model.wrap_model``: a
``peft.PeftModel``; and ``--init-from``, through ``runs.init_from_run``). Method names are defined here once; MTLoRA's structures are the library's
(``structlora.names``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

from structlora.names import DENSE_ADAPTER_PLACEMENTS, MTLORA_STRUCTURES

from . import adapter_model
from .flags import BOOLEAN, comma_list, explicit_flags, number
from .peft_methods import ENCODER_METHODS, PEFT_METHODS, PROMPT_LEARNING_METHODS
from .runs import HEAD_MODULE_NAMES, init_from_run

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_PLACEMENTS", "BASELINE_METHODS", "HEAD_MODULE_NAMES", "INIT_CHOICES", "METHODS",
           "METHOD_FLAG_DEFAULTS", "METHOD_FLAG_READERS", "MTLORA_STRUCTURES", "PEFT_LIBRARY_METHODS",
           "STRUCTLORA_METHODS", "add_method_arguments", "build_peft_config", "check_method_flags",
           "count_trainable_parameters", "default_label", "method_label", "method_labels", "wrap_model"]


INIT_CHOICES: tuple[str, ...] = ("default", "reference", "identity", "pissa", "lora-xs")
# The --method names, defined here once (report, sweep and the demo import them).
STRUCTLORA_METHODS: tuple[str, ...] = ("lora", "mtlora", "loretta-rep", "loretta-adp")
PEFT_LIBRARY_METHODS: tuple[str, ...] = tuple(PEFT_METHODS)  # IA3, prefix, prompt, P-tuning: see peft_methods.py
# Full fine-tuning and the papers' other baselines: dense adapters, BitFit, and PEFT's own methods.
BASELINE_METHODS: tuple[str, ...] = ("full", "adapter", "bitfit", *PEFT_LIBRARY_METHODS)
METHODS: tuple[str, ...] = (*STRUCTLORA_METHODS, *BASELINE_METHODS)


ADAPTER_PLACEMENTS: tuple[str, ...] = DENSE_ADAPTER_PLACEMENTS


# The adapter flags and the methods that read them. Given with any other method a flag would change nothing, so
# the user would train another model than the one asked for (e.g. `--structure icfm` without `--method mtlora`
# trains LoRA): check_method_flags refuses it. --modules-to-save is not here: full fine-tuning trains those
# modules anyway. BitFit and IA3 read --target-modules only to refuse it with a message of their own.
METHOD_FLAG_READERS: dict[str, tuple[str, ...]] = {
    "structure": ("mtlora",),
    "r": ("lora", "mtlora", "loretta-rep"),
    "lora_alpha": ("lora", "mtlora", "loretta-rep"),
    "lora_dropout": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter"),
    "tensor_rank": ("loretta-rep", "loretta-adp"),
    "bottleneck_size": ("loretta-adp", "adapter"),
    "adapter_placement": ("adapter",),
    "num_virtual_tokens": PROMPT_LEARNING_METHODS,
    "encoder_hidden_size": ENCODER_METHODS,
    "target_modules": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter", "bitfit", "ia3"),
    "init": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter"),
    "use_rslora": ("lora", "mtlora", "loretta-rep"),
    "loraplus_lr_ratio": ("lora", "mtlora", "loretta-rep"),
}


# The adapter flags' defaults other than None (the flags' own defaults): a flag holding another value was set.
METHOD_FLAG_DEFAULTS = {"structure": "shim", "adapter_placement": "houlsby", "use_rslora": False}


def add_method_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adapter flags. Unset hyper-parameters (None) fall back to the structlora config defaults."""
    group = parser.add_argument_group("adapter")
    group.add_argument("--method", choices=METHODS, default="lora",
                       help="lora, mtlora, loretta-rep, loretta-adp, full fine-tuning, or a baseline: adapter "
                            "(dense bottleneck), bitfit, ia3, prefix, prompt, ptuning (the last four need peft) "
                            "(default: lora)")
    group.add_argument("--structure", choices=MTLORA_STRUCTURES, default=METHOD_FLAG_DEFAULTS["structure"],
                       help="MTLoRA's T: shim T=C, icfm T=C·Cᵀ, ctcm T=C·D, dtsm T=C+D (only with --method mtlora)")
    group.add_argument("--r", type=int, default=None, help="LoRA rank (default: the method's config, 8)")
    group.add_argument("--lora-alpha", type=number, default=None,
                       help="scaling numerator alpha, update scaled by alpha/r (default: the method's config)")
    group.add_argument("--lora-dropout", type=number, default=None,
                       help="dropout on the adapter input, adapter dropout for loretta-adp (default: the "
                            "method's config)")
    group.add_argument("--tensor-rank", type=int, default=None,
                       help="tensor-train rank of LoRETTA's cores (default: the method's config, 5)")
    group.add_argument("--bottleneck-size", type=int, default=None,
                       help="bottleneck width of LoRETTA_adp adapters (default: the method's config, 64)")
    group.add_argument("--adapter-placement", choices=ADAPTER_PLACEMENTS,
                       default=METHOD_FLAG_DEFAULTS["adapter_placement"],
                       help="dense adapters (--method adapter): houlsby = after attention and FFN, "
                            "pfeiffer = after FFN")
    group.add_argument("--num-virtual-tokens", type=int, default=None,
                       help="virtual tokens of --method prefix/prompt/ptuning (default 20)")
    group.add_argument("--encoder-hidden-size", type=int, default=None,
                       help="width of the MLP that produces the virtual tokens: P-tuning's encoder (default 128), "
                            "or prefix tuning's reparametrisation (Li & Liang's mid_dim; default: none, the prefix "
                            "is trained directly)")
    group.add_argument("--target-modules", type=comma_list, default=None,
                       help="comma-separated module names to adapt, or one regular expression (default: the "
                            "architecture's, e.g. query,value for BERT/RoBERTa, q_proj,v_proj for Llama)")
    group.add_argument("--modules-to-save", type=comma_list, default=None,
                       help="extra modules trained in full and saved with the adapter, e.g. pooler "
                            "(default: the task head only)")
    group.add_argument("--init", choices=INIT_CHOICES, default=None,
                       help="adapter initialisation: default leaves the outputs unchanged at the start; "
                            "reference is the authors' start; identity (MTLoRA) starts with T=I; pissa (LoRA, MTLoRA) "
                            "takes A, B from the SVD of W; lora-xs (MTLoRA) freezes A, B at the SVD of W and trains T "
                            "only (default: the method's config)")
    group.add_argument("--use-rslora", action=BOOLEAN, default=METHOD_FLAG_DEFAULTS["use_rslora"],
                       help="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r")
    group.add_argument("--loraplus-lr-ratio", type=number, default=None,
                       help="LoRA+: train the B factors at this multiple of --lr (default: off)")
    return parser


def _method_flags_set(args: argparse.Namespace) -> dict[str, str]:
    """The adapter flags of METHOD_FLAG_READERS that ``args`` sets -> the config file that set it ("" when given on
    the command line, or set in a caller's Namespace): given explicitly, or holding another value than the flag's
    default."""
    explicit = explicit_flags(args)
    given: dict[str, str] = {}
    for dest in METHOD_FLAG_READERS:
        if not hasattr(args, dest):
            continue
        if dest in explicit:
            given[dest] = ""
        elif getattr(args, dest) != METHOD_FLAG_DEFAULTS.get(dest):
            given[dest] = str(getattr(args, "config", None) or "")
    return given


def check_method_flags(args: argparse.Namespace) -> None:
    """Refuse an adapter flag that ``args.method`` does not read (it would be ignored without a word), with one
    ``error:`` line naming the flag, the methods that read it and where it was set. One exception: a config file's
    flag when ``--method`` on the command line replaces the file's method (``--config mtlora_cola.yaml --method
    adapter`` keeps the recipe's budget); it is ignored with a warning, since the file cannot be unset flag by
    flag from the command line."""
    method = getattr(args, "method", None)
    explicit = explicit_flags(args)
    warned = getattr(args, "_method_flags_warned", set())
    for dest, config in _method_flags_set(args).items():
        readers = METHOD_FLAG_READERS[dest]
        if method in readers:
            continue
        flag = "--" + dest.replace("_", "-")
        if config and "method" in explicit:
            if dest not in warned:
                print(f"warning: {flag} (set by {config}) is not read by --method {method} (given on the command "
                      f"line): it is ignored", file=sys.stderr)
                warned.add(dest)
            continue
        source = f" (set by {config})" if config else ""
        raise SystemExit(f"error: {flag}{source} is read only by --method {', '.join(readers)}; --method {method} "
                         f"would ignore it, training another model than the one asked for (leave {flag} unset, or "
                         f"choose one of those methods)")
    args._method_flags_warned = warned  # build_peft_config checks again: warn once
    if method == "lora" and getattr(args, "init", None) in ("identity", "lora-xs"):
        what = "starts MTLoRA's T at I" if args.init == "identity" else "trains MTLoRA's T between frozen SVD factors"
        raise SystemExit(f"error: --init {args.init} {what}; --method lora starts with A Kaiming-uniform and B zero "
                         f"(--init default or reference) or from the SVD of W (--init pissa); or --method mtlora")
    if getattr(args, "init", None) == "lora-xs" and getattr(args, "loraplus_lr_ratio", None) is not None:
        raise SystemExit("error: --loraplus-lr-ratio speeds up the B factors, which --init lora-xs freezes: it would "
                         "change nothing (leave it unset)")


def build_peft_config(args: argparse.Namespace, task_type: str) -> Any | None:
    """The structlora config for ``args.method`` (None for full fine-tuning). Only hyper-parameters the
    user set are passed, so each config keeps its own defaults (e.g. LoRETTA_rep's alpha of 16)."""
    method = args.method
    check_method_flags(args)
    if method == "full":
        return None
    if method in PEFT_LIBRARY_METHODS:
        from . import peft_methods

        return peft_methods.build_config(args, task_type)
    import structlora

    def given(**kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in kwargs.items() if value is not None}

    common = given(target_modules=getattr(args, "target_modules", None), task_type=task_type,
                   modules_to_save=getattr(args, "modules_to_save", None))
    init = getattr(args, "init", None)
    common_low_rank = {**common, **given(use_rslora=getattr(args, "use_rslora", None) or None)}
    if method == "lora":
        return structlora.LoraConfig(**common_low_rank, **given(r=args.r, lora_alpha=args.lora_alpha,
                                                                lora_dropout=args.lora_dropout,
                                                                init="pissa" if init == "pissa" else None))
    if method == "mtlora":
        if init == "default":
            init = None  # MTLoRA names its default "reference"
        return structlora.MTLoraConfig(**common_low_rank, structure=args.structure,
                                       **given(r=args.r, lora_alpha=args.lora_alpha,
                                               lora_dropout=args.lora_dropout, init=init))
    if method == "loretta-rep":
        return structlora.LorettaRepConfig(**common_low_rank, **given(r=args.r, lora_alpha=args.lora_alpha,
                                                                      lora_dropout=args.lora_dropout,
                                                                      tensor_rank=args.tensor_rank, init=init))
    if method == "loretta-adp":
        return structlora.LorettaAdpConfig(**common, **given(bottleneck_size=args.bottleneck_size,
                                                             adapter_dropout=args.lora_dropout,
                                                             tensor_rank=args.tensor_rank, init=init))
    if method == "adapter":
        return structlora.DenseAdapterConfig(**common, placement=getattr(args, "adapter_placement", "houlsby"),
                                             **given(bottleneck_size=args.bottleneck_size,
                                                     adapter_dropout=args.lora_dropout, init=init))
    if method == "bitfit":
        return structlora.BitFitConfig(**common)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def method_labels(method: str) -> tuple[str, ...]:
    """The names results.json records for ``method``: one per MTLoRA structure and per adapter placement."""
    if method == "mtlora":
        return tuple(f"mtlora-{structure}" for structure in MTLORA_STRUCTURES)
    if method == "adapter":
        return tuple(f"adapter-{placement}" for placement in ADAPTER_PLACEMENTS)
    return (method,)


def default_label(method: str) -> str:
    """The label of ``method`` with its default structure or placement (``mtlora`` -> ``mtlora-shim``)."""
    return method_label(argparse.Namespace(method=method, structure=METHOD_FLAG_DEFAULTS["structure"],
                                           adapter_placement=METHOD_FLAG_DEFAULTS["adapter_placement"]))


def method_label(args: argparse.Namespace) -> str:
    """The method name results.json records: ``mtlora-<structure>`` and ``adapter-<placement>`` name the variant,
    so that a sweep's table keeps MTLoRA's structures and the adapter placements in rows of their own; the LoRA-family
    options follow as ``+rslora``, ``+pissa`` / ``+lora-xs``, ``+loraplus<ratio>`` (e.g. ``mtlora-shim+pissa``)."""
    label = {"mtlora": f"mtlora-{getattr(args, 'structure', 'shim')}",
             "adapter": f"adapter-{getattr(args, 'adapter_placement', 'houlsby')}"}.get(args.method, args.method)
    ratio = getattr(args, "loraplus_lr_ratio", None)
    options = [*(["rslora"] if getattr(args, "use_rslora", False) else []),
               *([args.init] if getattr(args, "init", None) in ("pissa", "lora-xs") else []),
               *([f"loraplus{ratio:g}"] if ratio is not None else [])]
    return "+".join([label, *options])


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, task_type: str) -> torch.nn.Module:
    """Apply the adapter chosen by ``args.method`` (or unfreeze everything for ``full``) and load
    ``args.init_from`` if given."""
    if args.method in PEFT_LIBRARY_METHODS:
        from . import peft_methods

        check_method_flags(args)
        return peft_methods.wrap(model, args, task_type)
    config = build_peft_config(args, task_type)
    init_from = getattr(args, "init_from", None)
    if config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if init_from:
            init_from_run(model, init_from)
        return model
    peft_model = adapter_model.wrap_model(model, config)
    if init_from:
        init_from_run(peft_model, init_from)
    return peft_model


def count_trainable_parameters(model: torch.nn.Module, exclude: Sequence[str] = ()) -> int:
    """Trainable parameters; those inside a module named in ``exclude`` (e.g. the classification head,
    ``HEAD_MODULE_NAMES``) are left out, so adapters can be compared without the task head."""
    def excluded(name: str) -> bool:
        parts = name.split(".")
        return any(part in exclude for part in parts)

    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not excluded(name))
