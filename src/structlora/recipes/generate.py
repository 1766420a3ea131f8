"""``structlora generate``: beam-search decoding of an NLG split with a trained adapter.

    structlora generate --adapter runs/e2e-lora --dataset e2e --split dev-heldout --output out/hyps.txt

Writes one hypothesis per unique input to ``--output`` and, beside it, ``*.sources.txt`` and the
references for the scorer (E2E: ``*.references.txt``; WebNLG/DART: ``*.reference0``, ``*.reference1``,
…; WebNLG also ``*.seen.txt``). An interrupted run is resumed by running the same command again: it
appends after the hypotheses already written. ``--score`` runs the matching scorer at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from structlora.nlg.data import DATASETS, SPLITS, load_split
from structlora.nlg.generation import (DECODING_MODES, DecodingSettings, generate_hypotheses, sidecar_paths,
                                      write_reference_files)
from structlora.nlg.modeling import META_FILE, ModelSpec, load_causal_lm, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True,
                        help="a `train nlg` output folder (or its adapter/ sub-folder)")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default: the training dataset")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="default: dev-heldout for E2E (dev split by MR), dev otherwise")
    parser.add_argument("--output", required=True, help="hypotheses file (one line per unique input)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $STRUCTLORA_DATA or ../shared/data)")
    parser.add_argument("--data-source", choices=("auto", "hub"), default="auto",
                        help="read local official files (auto) or the Hugging Face Hub")
    parser.add_argument("--heldout-fraction", type=float, default=None,
                        help="dev-train/dev-heldout split fraction (default: the training run's)")
    parser.add_argument("--heldout-seed", type=int, default=None, help="dev split seed (default: the training run's)")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N inputs")
    parser.add_argument("--decoding", choices=DECODING_MODES, default="authors",
                        help="authors: the LoRA/MTLoRA gpt2_beam.py + gpt2_decode.py (default; n-grams blocked "
                             "among generated tokens only, stop at end-of-text or a blank line, score/len^lp); "
                             "hf: transformers' generate()")
    parser.add_argument("--tokenize-lower", action=argparse.BooleanOptionalAction, default=None,
                        help="gpt2_decode.py --tokenize --lower on outputs and references "
                             "(default: on for WebNLG/DART with --decoding authors, as the authors score them)")
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--length-penalty", type=float, default=0.8)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=4)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="inputs decoded together")
    parser.add_argument("--restart", action="store_true", help="discard earlier hypotheses instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--score", action="store_true", help="score the hypotheses when done (prints JSON)")


def adapter_folder(path: str) -> Path:
    folder = Path(path)
    if (folder / "adapter" / META_FILE).exists():
        return folder / "adapter"
    if (folder / META_FILE).exists():
        return folder
    raise SystemExit(f"error: {path} is not a `structlora train nlg` output ({META_FILE} not found)")


def load_trained_model(folder: Path):
    """Base model + trained adapter (or the fully fine-tuned model), its tokenizer, spec and metadata."""
    spec, meta = ModelSpec.load(folder)
    tokenizer = load_tokenizer(spec)
    if meta.get("method") == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder))
    else:
        from structlora import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(spec), str(folder), is_trainable=False)
    return model, tokenizer, spec, meta


def _check_resumable(sources_path: str, inputs: list, output: str, restart: bool) -> None:
    """Refuse to append to hypotheses written for other inputs."""
    if restart or not os.path.exists(output) or not os.path.exists(sources_path):
        return
    with open(sources_path, encoding="utf-8") as handle:
        previous = [line.rstrip("\n") for line in handle]
    current = [" ".join(x.source.split()) for x in inputs]
    if previous != current:
        raise SystemExit(f"error: {output} was generated for other inputs; use --restart or another --output")


def adapter_fingerprint(folder: Path) -> str:
    """sha256 over the folder's weight and config files: changes whenever the trained model does."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*config.json")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_output_owner(output: str, record_path: str, record: dict[str, Any], restart: bool) -> None:
    """Only append to (or keep) hypotheses this command wrote with the same adapter, data and decoding."""
    if restart or not os.path.exists(output):
        return
    if not os.path.exists(record_path):
        raise SystemExit(f"error: {output} exists but was not written by structlora generate (no {record_path}); "
                         f"choose another --output, or pass --restart to replace it")
    try:
        with open(record_path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {record_path} is unreadable ({error}); pass --restart to start over") from None
    differing = sorted(k for k in set(record) | set(previous) if record.get(k) != previous.get(k))
    if differing:
        raise SystemExit(f"error: {output} was generated with another {', '.join(differing)}; pass --restart to "
                         f"start over, or choose another --output")


def run(args: argparse.Namespace) -> int:
    folder = adapter_folder(args.adapter)
    model, tokenizer, spec, meta = load_trained_model(folder)
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise SystemExit("error: --dataset is required (the adapter does not record one)")
    split = args.split or ("dev-heldout" if dataset == "e2e" else "dev")
    inputs = load_split(
        dataset, split, args.data_dir or meta.get("data_dir"),
        heldout_fraction=args.heldout_fraction if args.heldout_fraction is not None else meta.get("heldout_fraction", 0.1),
        heldout_seed=args.heldout_seed if args.heldout_seed is not None else meta.get("heldout_seed", 0),
        source=args.data_source,
    )
    without_refs = sum(1 for x in inputs if not x.references)
    inputs = [x for x in inputs if x.references]  # nothing to score them against
    if args.limit is not None:
        inputs = inputs[: args.limit]
    if without_refs:
        print(f"note: skipped {without_refs} inputs without references", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    paths = sidecar_paths(args.output)
    tokenize_lower = args.tokenize_lower
    if tokenize_lower is None:
        tokenize_lower = args.decoding == "authors" and dataset in ("webnlg", "dart")
    settings = DecodingSettings(beams=args.beams, length_penalty=args.length_penalty,
                                no_repeat_ngram_size=args.no_repeat_ngram_size,
                                repetition_penalty=args.repetition_penalty,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                mode=args.decoding, tokenize_lower=tokenize_lower)
    decoding = {k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"}
    record = {"adapter": adapter_fingerprint(folder), "dataset": dataset, "split": split, "decoding": decoding}
    _check_output_owner(args.output, paths["record"], record, args.restart)
    _check_resumable(paths["sources"], inputs, args.output, args.restart)
    with open(paths["record"], "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    written = write_reference_files(dataset, inputs, args.output, tokenize_lower=tokenize_lower)
    decoded = generate_hypotheses(model, tokenizer, inputs, args.output, settings, separator=spec.separator,
                                  resume=not args.restart, progress=not args.no_progress,
                                  max_length=spec.max_length)
    print(f"generated {decoded} new hypotheses ({len(inputs)} inputs) -> {args.output}", file=sys.stderr)
    for name, path in written.items():
        print(f"  {name}: {path}", file=sys.stderr)
    if args.score:
        from structlora.recipes.score import score_e2e, score_generation_eval

        result: dict[str, Any]
        if dataset == "e2e":
            result = score_e2e(args.output, written["references"])
        else:
            result = score_generation_eval(dataset, args.output, written["reference_prefix"], written.get("seen"))
        print(json.dumps(result))
    return 0
