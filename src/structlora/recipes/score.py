"""``structlora score e2e|webnlg|dart``: the official data-to-text metrics, offline.

    structlora score e2e --ref refs.txt --hyp hyps.txt --json
    structlora score webnlg --ref-prefix hyps.reference --hyp hyps.txt [--seen-file hyps.seen.txt] --json
    structlora score dart --ref-prefix hyps.reference --hyp hyps.txt --json

E2E prints BLEU, NIST, METEOR, ROUGE_L, CIDEr as e2e-metrics ``measure_scores.py -p`` (``--mteval perl``:
without ``-p``); WebNLG / DART print
BLEU (multi-bleu-detok.perl, 0-100), METEOR 1.5 and TER as the WebNLG GenerationEval script, and for
WebNLG also the seen / unseen subsets. Without Java METEOR is reported as null, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from structlora.tasks.nlg import generation_eval, metrics
from structlora.tasks.nlg.data import read_e2e_references, read_lines, read_multi_references
from structlora.recipes.progress import phase


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=("e2e", "webnlg", "dart"), help="which official scorer to mimic")
    parser.add_argument("--hyp", required=True, help="system outputs, one line per input")
    parser.add_argument("--ref", help="E2E: references, one input's references on consecutive lines, "
                                      "inputs separated by a blank line")
    parser.add_argument("--ref-prefix", help="WebNLG/DART: reference files PREFIX0, PREFIX1, …")
    parser.add_argument("--seen-file", help="WebNLG: 'seen'/'unseen' per input line "
                                            "(default: HYP's .seen.txt beside it, when present)")
    parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                        help="print the scores as one JSON object")
    parser.add_argument("--java", action=argparse.BooleanOptionalAction, default=True,
                        help="run the Java metrics (METEOR, PTB tokenizer) when Java is on PATH; --no-java skips them")
    parser.add_argument("--mteval", choices=metrics.MTEVAL_VARIANTS, default="python",
                        help="E2E BLEU/NIST: python = measure_scores.py -p (pymteval; the MTLoRA README's "
                             "command, default), perl = measure_scores.py without -p (mteval-v13a-sig.pl)")


def _require_content(path: str, items: Sequence[Any]) -> None:
    """Empty inputs are an error (scoring nothing gives no number, and the METEOR process would wait forever)."""
    if not items:
        raise SystemExit(f"error: {path} is empty: nothing to score")


def warn_empty_hypotheses(path: str, hypotheses: Sequence[str]) -> int:
    """A warning when hypotheses are empty (a model that ends at once): they are scored as empty outputs, which
    lowers every metric. Returns how many are empty."""
    empty = [number for number, line in enumerate(hypotheses, start=1) if not line.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", …" if len(empty) > 5 else "")
        print(f"warning: {len(empty)} of {len(hypotheses)} hypotheses in {path} are empty (line(s) {shown}): they are "
              "scored as empty outputs; a model that emits end-of-text at once needs more training, or check the "
              "prompt layout", file=sys.stderr)
    return len(empty)


def score_e2e(hyp_path: str, ref_path: str, use_java: bool = True, mteval: str = "python") -> dict[str, Any]:
    hypotheses = read_lines(hyp_path)
    references = read_e2e_references(ref_path)
    _require_content(hyp_path, hypotheses)
    warn_empty_hypotheses(hyp_path, hypotheses)
    _require_content(ref_path, references)
    if len(hypotheses) != len(references):
        raise SystemExit(f"error: {hyp_path} has {len(hypotheses)} lines but {ref_path} has "
                         f"{len(references)} reference groups")
    with phase(f"scoring e2e: {len(hypotheses)} hypotheses"):
        scores, notes = metrics.e2e_scores(hypotheses, references, use_java=use_java, mteval=mteval)
    result: dict[str, Any] = dict(scores)
    if notes:
        result["notes"] = notes
    return result


def _generation_eval(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                     use_java: bool) -> tuple[dict[str, Any], list[str]]:
    return generation_eval.generation_eval_scores(hypotheses, references, use_java=use_java)


def score_generation_eval(dataset: str, hyp_path: str, ref_prefix: str, seen_file: str | None = None,
                          use_java: bool = True) -> dict[str, Any]:
    hypotheses = read_lines(hyp_path)
    references = read_multi_references(ref_prefix)
    _require_content(hyp_path, hypotheses)
    warn_empty_hypotheses(hyp_path, hypotheses)
    _require_content(f"{ref_prefix}*", references)
    if len(hypotheses) != len(references):
        raise SystemExit(f"error: {hyp_path} has {len(hypotheses)} lines but the reference files have "
                         f"{len(references)}")
    with phase(f"scoring {dataset}: {len(hypotheses)} hypotheses"):
        return _score_generation_eval(dataset, hypotheses, references, hyp_path, seen_file, use_java)


def _score_generation_eval(dataset: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                           hyp_path: str, seen_file: str | None, use_java: bool) -> dict[str, Any]:
    scores, notes = _generation_eval(hypotheses, references, use_java)
    result: dict[str, Any] = dict(scores)
    if dataset == "webnlg":
        if seen_file is None:
            stem = hyp_path[:-4] if hyp_path.endswith(".txt") else hyp_path
            candidate = f"{stem}.seen.txt"
            seen_file = candidate if os.path.exists(candidate) else None
        if seen_file:
            flags = read_lines(seen_file)
            if len(flags) != len(hypotheses):
                raise SystemExit(f"error: {seen_file} has {len(flags)} lines, {hyp_path} {len(hypotheses)}")
            result["all"] = dict(scores)
            for subset in ("seen", "unseen"):
                rows = [i for i, flag in enumerate(flags) if flag.strip().lower() == subset]
                if rows:
                    result[subset] = _generation_eval([hypotheses[i] for i in rows],
                                                      [references[i] for i in rows], use_java)[0]
                else:
                    result[subset] = None
    if notes:
        result["notes"] = notes
    return result


def run(args: argparse.Namespace) -> int:
    use_java = args.java
    if args.dataset == "e2e":
        if not args.ref:
            raise SystemExit("error: score e2e needs --ref")
        result = score_e2e(args.hyp, args.ref, use_java, args.mteval)
    else:
        if not args.ref_prefix:
            raise SystemExit(f"error: score {args.dataset} needs --ref-prefix")
        result = score_generation_eval(args.dataset, args.hyp, args.ref_prefix, args.seen_file, use_java)
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "notes":
                continue
            if isinstance(value, dict):
                print(f"{key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()))
            else:
                print(f"{key}: {_fmt(value)}")
    return 0


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
