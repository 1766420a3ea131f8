"""A trained run folder -> a model: the one reader of `train glue|nlg|llm` outputs.

``generate``, ``eval``, ``merge`` and ``export`` load a run with ``load_run_model``; ``--init-from`` starts a new run
from one with ``init_from_run``. The adapter is a ``peft.PeftModel`` (``adapter_model``); a run saved in
structlora's earlier folder layout is converted on load. ``--init-from`` refuses an adapter of another structure than
the new run's (its ``adapter_config.json``, and the structure recorded in its weights file where there is one), so
an MTLoRA ``dtsm`` adapter never starts a ``ctcm`` run (the tensors have the same shapes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .adapter_model import adapter_state, load_adapter, read_adapter_weights, set_adapter_state
from .quiet import head_in_adapter

RECIPES = ("glue", "nlg", "llm")
NLG_META = "structlora_nlg.json"  # structlora.tasks.nlg.modeling.META_FILE, kept here so --help imports nothing heavy
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Modules trained in full with every method (the task head): a new task's head of another shape is re-initialised
# by --init-from, and adapter sizes are compared without them.
HEAD_MODULE_NAMES: tuple[str, ...] = ("classifier", "score", "pooler")
# Adapter config fields that may differ between the run an adapter comes from and the run --init-from starts: how
# it was initialised or regularised, and where its base model was found. Any other field (method, structure, rank,
# alpha, targets, ...) changes what the adapter computes.
# Free to differ: what changes no computed function, and where a folder was saved from (peft_type: the marker of
# a structlora.PeftModel folder or the method's PEFT name; PEFT's provenance fields; modules_to_save, which PEFT
# extends with the task head and a converted folder with what it holds: the tensors themselves are compared).
_INIT_FROM_FREE_FIELDS = frozenset({"inference_mode", "base_model_name_or_path", "init", "init_weights",
                                    "init_lora_weights", "merge_weights", "lora_dropout", "adapter_dropout",
                                    "peft_type", "peft_version", "auto_mapping", "revision", "modules_to_save"})


class TrainedRun:
    """A training output folder: where its adapter is, what it recorded, which recipe made it. ``flag`` names the
    command-line flag that gave the folder, for error messages."""

    def __init__(self, path: str | Path, flag: str = "--run") -> None:
        folder = Path(path)
        if (folder / "adapter").is_dir():
            self.run_dir, self.adapter_dir = folder, folder / "adapter"
        elif (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            self.run_dir, self.adapter_dir = folder.parent, folder
        else:
            raise SystemExit(f"error: {flag} {path}: not a training output (no adapter/ folder, adapter_config.json "
                             "or config.json in it)")
        self.results: dict[str, Any] = _read_json(self.run_dir / "results.json")
        self.adapter_config: dict[str, Any] = _read_json(self.adapter_dir / "adapter_config.json")
        self.is_full = not self.adapter_config  # --method full saves the whole model
        self.flags: dict[str, Any] = self.results.get("flags", {})
        self._named = f"{flag} {path}"

    @property
    def recipe(self) -> str:
        """``glue``, ``nlg`` or ``llm``: the `train` command that wrote the run (recorded in results.json; runs from
        before that record are recognised by what they wrote)."""
        if self.results.get("recipe") in RECIPES:
            return str(self.results["recipe"])
        if (self.adapter_dir / NLG_META).is_file():
            return "nlg"
        if "family" in self.results:
            return "llm"
        if self.results.get("task") or self.adapter_config.get("task_type") == "SEQ_CLS":
            return "glue"
        raise SystemExit(f"error: {self._named}: cannot tell which recipe trained it (no results.json)")

    def base_model(self, override: str | None) -> str:
        model = override or self.results.get("model") or self.adapter_config.get("base_model_name_or_path")
        if not model:
            raise SystemExit("error: the run does not record its base model: pass --model")
        return str(model)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {path} is not readable JSON ({error})") from None
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------- loading a run
def with_adapter(base: Any, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """``base`` with the trained adapter of ``adapter_dir``: a ``peft.PeftModel`` (``adapter_model.load_adapter``;
    a folder of structlora's earlier layout is converted on load), for structlora's methods and for those PEFT
    implements (IA3, prefix, prompt, P-tuning) alike."""
    from .peft_methods import require_peft

    require_peft()
    return load_adapter(base, adapter_dir, is_trainable=is_trainable)


def adapter_head_modules(adapter_dir: Path) -> tuple[str, ...]:
    """The task-head modules (``HEAD_MODULE_NAMES``) whose weights the adapter folder holds."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        return ()
    with safe_open(str(path), framework="pt") as handle:
        names = {part for key in handle.keys() for part in key.split(".")}
    return tuple(module for module in HEAD_MODULE_NAMES if module in names)


def glue_label_settings(task: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of a GLUE task's head: label count and names."""
    labels: dict[str, Any] = {"num_labels": task.num_labels}
    if task.label_names:
        labels["id2label"] = dict(enumerate(task.label_names))
        labels["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    return labels


def load_glue_run(run: TrainedRun, model_name: str) -> tuple[Any, Any, Any]:
    """The classifier of a `train glue` run, its tokenizer and its GLUE task."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..tasks.glue.data import get_task

    task = get_task(run.results.get("task") or run.flags.get("task") or "")
    labels = glue_label_settings(task)
    tokenizer_source = run.adapter_dir if (run.adapter_dir / "tokenizer_config.json").is_file() else model_name
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    if run.is_full:
        return AutoModelForSequenceClassification.from_pretrained(str(run.adapter_dir), **labels), tokenizer, task
    with head_in_adapter(adapter_head_modules(run.adapter_dir)):  # its "MISSING" head is the adapter's
        base = AutoModelForSequenceClassification.from_pretrained(model_name, **labels)
    if base.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return with_adapter(base, run.adapter_dir), tokenizer, task


def _load_causal_run(run: TrainedRun, model_override: str | None) -> tuple[Any, Any]:
    if run.recipe == "nlg":  # the NLG run records how to rebuild its base model and prompts beside the adapter
        from ..tasks.nlg.modeling import ModelSpec, load_causal_lm, load_tokenizer

        spec, _ = ModelSpec.load(run.adapter_dir)
        spec.model = model_override or spec.model
        tokenizer = load_tokenizer(spec)
        if run.is_full:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(run.adapter_dir)), tokenizer
        return with_adapter(load_causal_lm(spec), run.adapter_dir), tokenizer
    from ..tasks.llm.modeling import load_causal_lm as load_llm

    if run.is_full:
        return load_llm(str(run.adapter_dir))
    model, tokenizer = load_llm(run.base_model(model_override), run.flags.get("gguf_file"),
                                run.flags.get("model_dtype") or "float32")
    return with_adapter(model, run.adapter_dir), tokenizer


def load_run_model(run: TrainedRun, model_override: str | None = None) -> tuple[Any, Any]:
    """The base model with the run's adapter (or the fully fine-tuned model), for inference, and its tokenizer."""
    from .hub import check_model_available

    if not run.is_full:
        check_model_available(run.base_model(model_override) if run.recipe != "nlg" else
                              model_override or _nlg_base_model(run))
    if run.recipe == "glue":
        model, tokenizer, _ = load_glue_run(run, run.base_model(model_override))
        return model, tokenizer
    return _load_causal_run(run, model_override)


def _nlg_base_model(run: TrainedRun) -> str | None:
    return _read_json(run.adapter_dir / NLG_META).get("model")


# ------------------------------------------------------------------------------------------- --init-from
def init_from_run(model: Any, folder: str | Path) -> None:
    """Load the trained weights of run (or adapter) ``folder`` into ``model`` to start a new run from them.

    ``model`` is the ``peft.PeftModel`` built from the new run's flags, or a plain model (``--method full``). The
    adapter saved in ``folder`` must have the structure the new run asks for (method, structure, rank, alpha,
    target modules, ...; the recorded structure of its weights file too): another one is refused, naming the
    fields, since its tensors would compute something else. Task-head tensors of another shape (a head for another
    label count, e.g. 3-way MNLI -> 2-way RTE) keep the model's fresh values, and are named on stderr."""
    adapter_dir = TrainedRun(folder, flag="--init-from").adapter_dir
    if not hasattr(model, "peft_config"):  # --method full: matching tensors of the whole model
        _load_matching_weights(model, adapter_dir / "model.safetensors")
        return
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"--init-from: {weights} not found (expected an adapter folder)")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(_structure_metadata_key())
    wanted = model.peft_config[model.active_adapter].to_dict()
    _refuse_other_structure(folder, "adapter_config.json", _read_json(adapter_dir / "adapter_config.json"), wanted)
    if recorded:
        _refuse_other_structure(folder, f"{ADAPTER_WEIGHTS} (its recorded structure)", json.loads(recorded), wanted)
    tensors = read_adapter_weights(adapter_dir, model)  # keyed as the model's (an earlier layout converted)
    own_state = adapter_state(model)
    mismatched = sorted(name for name, tensor in tensors.items()
                        if name in own_state and own_state[name].shape != tensor.shape)
    not_head = [name for name in mismatched if not set(name.split(".")) & set(HEAD_MODULE_NAMES)]
    if not_head:
        name = not_head[0]
        raise ValueError(
            f"--init-from {folder}: {len(not_head)} adapter tensor(s) have another shape than this model's, e.g. "
            f"{_short(name)}: {tuple(tensors[name].shape)} in the folder, {tuple(own_state[name].shape)} here "
            f"(another base model size?). Only a task head may differ; it is then re-initialised")
    for name in mismatched:
        tensors[name] = own_state[name].detach().clone()
    if mismatched:
        print(f"--init-from: re-initialised {len(mismatched)} head tensor(s) of another shape (a head for another "
              f"label count): {', '.join(_short(name) for name in mismatched)}", file=sys.stderr)
    set_adapter_state(model, tensors, source=str(weights))


def _short(key: str) -> str:
    """A tensor's key without PEFT's ``base_model.model.`` (the module path as the user knows it)."""
    return key.removeprefix("base_model.model.")


def _structure_metadata_key() -> str:
    from structlora.convert import CONFIG_METADATA_KEY

    return CONFIG_METADATA_KEY


def _refuse_other_structure(folder: str | Path, source: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    differing = sorted(key for key in set(saved) & set(wanted)
                       if key not in _INIT_FROM_FREE_FIELDS and saved[key] != wanted[key])
    if differing:
        details = "; ".join(f"{key} {saved[key]!r} there, {wanted[key]!r} here" for key in differing)
        raise ValueError(f"--init-from {folder}: its adapter has another structure than this run's ({details}, "
                         f"from {source}); its weights would compute something else. Train with the same adapter "
                         f"flags, or start from a fresh adapter")


def _load_matching_weights(model: Any, path: Path) -> list[str]:
    """Load tensors whose name and shape match; return the names skipped (e.g. a 3-way MNLI head when fine-tuning
    2-way RTE)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"--init-from: {path} not found")
    tensors = load_file(str(path))
    own = model.state_dict()
    usable = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(tensors) - set(usable))
