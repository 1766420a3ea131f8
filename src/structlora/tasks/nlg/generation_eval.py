"""WebNLG / DART scores as the WebNLG ``GenerationEval`` script computes them (used by the LoRA and MTLoRA papers).

  * BLEU as Moses ``multi-bleu-detok.perl`` (case-sensitive mteval-v13a tokenisation, no smoothing,
    every line of every reference file is a reference, empty ones included).
  * METEOR 1.5 (``-l en -norm -r N``) on NLTK-tokenised text, through the jar ``pycocoevalcap`` ships.
  * TER as ``pyter`` (greedy phrase shifts + word edit distance), the minimum over references,
    averaged over inputs.

Java, the jars and the mteval tokenizer are ``metrics``'s (called through the module, so one setting or stand-in
there applies here too).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

from . import metrics


# ----------------------------------------------------------------------------- multi-bleu-detok BLEU
def multi_bleu_detok(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                     lowercase: bool = False) -> float:
    """Corpus BLEU (0-100) as Moses ``multi-bleu-detok.perl``: every reference given counts, empty
    ones included (length 0 for the closest-length rule), no smoothing."""
    correct = [0] * 5
    total = [0] * 5
    hyp_length = ref_length = 0
    for hyp_text, refs in zip(hypotheses, references):
        hyp = metrics.mteval_tokenize(hyp_text.lower() if lowercase else hyp_text)
        closest_diff, closest_length = 9999, 9999
        max_ref_counts: Counter = Counter()
        for ref_text in refs:
            ref = metrics.mteval_tokenize(ref_text.lower() if lowercase else ref_text)
            diff = abs(len(hyp) - len(ref))
            if diff < closest_diff:
                closest_diff, closest_length = diff, len(ref)
            elif diff == closest_diff and len(ref) < closest_length:
                closest_length = len(ref)
            for n in range(1, 5):
                for ngram, count in metrics._ngram_counts(ref, n).items():
                    if count > max_ref_counts[ngram]:
                        max_ref_counts[ngram] = count
        hyp_length += len(hyp)
        ref_length += closest_length
        for n in range(1, 5):
            for ngram, count in metrics._ngram_counts(hyp, n).items():
                total[n] += count
                correct[n] += min(count, max_ref_counts.get(ngram, 0))
    if ref_length == 0:
        return 0.0
    precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
    brevity = math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0
    if hyp_length == 0:
        return 0.0
    log_sum = sum(math.log(p) if p else -9999999999 for p in precisions)
    return 100 * brevity * math.exp(log_sum / 4)


# ---------------------------------------------------------------------------------- NLTK tokenising
@lru_cache(maxsize=1)
def _nltk_tokenizer_kind() -> str:
    import nltk

    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return "punkt"
        except LookupError:
            continue
    return "untrained-punkt"


def nltk_word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` when NLTK's punkt data is installed; otherwise an untrained Punkt sentence
    splitter (no abbreviation list) followed by the same Treebank word tokenizer."""
    if _nltk_tokenizer_kind() == "punkt":
        import nltk

        return nltk.word_tokenize(text)
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    words = NLTKWordTokenizer()
    return [w for sentence in PunktSentenceTokenizer().tokenize(text) for w in words.tokenize(sentence)]


# GenerationEval pins nltk==3.5; later releases split en-dashes ("1983–1984") and keep inner apostrophes
# ("Su'a") differently, which moves METEOR/TER slightly (measured in docs/NLG.md).
GENERATION_EVAL_NLTK = "3.5"


def nltk_tokenizer_notes() -> list[str]:
    """Why METEOR/TER tokens may differ from the official GenerationEval run, if they may."""
    import nltk

    notes = []
    if _nltk_tokenizer_kind() != "punkt":
        notes.append("NLTK punkt data not installed: METEOR/TER input uses an untrained Punkt sentence splitter "
                     "(may differ from nltk.word_tokenize on abbreviations)")
    if nltk.__version__ != GENERATION_EVAL_NLTK:
        notes.append(f"NLTK {nltk.__version__} tokenises en-dashes and inner apostrophes unlike GenerationEval's "
                     f"pinned nltk=={GENERATION_EVAL_NLTK}: METEOR/TER may differ in the 4th decimal "
                     f"(install nltk=={GENERATION_EVAL_NLTK} for identical values)")
    return notes


# ----------------------------------------------------------------------------------- METEOR 1.5 file
def meteor_generation_eval(hypotheses_tok: Sequence[str], references_tok: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 as GenerationEval runs it: ``java -jar meteor-1.5.jar HYP REF -l en -norm -r N`` with
    N references per input (shorter groups padded with empty lines). Raises JavaUnavailable."""
    java = metrics._require_java()
    num_refs = max((len(refs) for refs in references_tok), default=1)
    with tempfile.TemporaryDirectory(prefix="structlora-meteor-") as tmp:
        hyp_path = os.path.join(tmp, "hypothesis")
        ref_path = os.path.join(tmp, "reference")
        with open(hyp_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(hypotheses_tok))
        with open(ref_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(r for refs in references_tok
                                   for r in list(refs) + [""] * (num_refs - len(refs))))
        output = metrics._run_java([java, "-Xmx2G", "-jar", str(metrics.meteor_jar()), hyp_path, ref_path, "-l", "en",
                            "-norm", "-r", str(num_refs)], "METEOR 1.5 (Java)").stdout
    return float(output.decode("utf-8").strip().split("\n")[-1].split()[-1])


# ------------------------------------------------------------------------------------------- TER
def _edit_distance(source: Sequence[str], target: Sequence[str]) -> int:
    previous = list(range(len(target) + 1))
    for i, word in enumerate(source, start=1):
        current = [i] + [0] * len(target)
        for j, other in enumerate(target, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other))
        previous = current
    return previous[-1]


def _shift_candidates(words: Sequence[str], reference: Sequence[str]) -> Iterable[tuple[int, int, int]]:
    """(start in words, start in reference, length) of maximal common runs starting at a word match,
    excluding runs that are already in place (same start)."""
    for i in range(len(words)):
        for j in range(len(reference)):
            if i == j or words[i] != reference[j]:
                continue
            length = 1
            while i + length < len(words) and j + length < len(reference) \
                    and words[i + length] == reference[j + length]:
                length += 1
            yield i, j, length


def ter(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Translation edit rate as ``pyter.ter``: repeatedly apply the phrase shift that lowers the edit
    distance most (ties: the largest shifted word list, as pyter's tuple sort), then
    (shifts + edit distance) / reference length."""
    words = list(hypothesis)
    reference = list(reference)
    shifts = 0
    while True:
        base = _edit_distance(words, reference)
        best: tuple[int, list[str]] | None = None
        for i, j, length in _shift_candidates(words, reference):
            shifted = words[:i] + words[i + length:]
            shifted[j:j] = words[i:i + length]
            candidate = (base - _edit_distance(shifted, reference), shifted)
            if best is None or candidate > best:
                best = candidate
        if best is None or best[0] <= 0:
            break
        shifts += 1
        words = best[1]
    return (shifts + _edit_distance(words, reference)) / len(reference)


def generation_eval_ter(hypotheses_tok: Sequence[str], references_tok: Sequence[Sequence[str]]) -> float:
    """GenerationEval's TER: per input the minimum ``ter`` over its references (an empty reference
    scores 1), averaged over inputs."""
    per_input = []
    for hyp, refs in zip(hypotheses_tok, references_tok):
        candidates = [ter(hyp.split(), ref.split()) if ref.split() else 1.0 for ref in refs] or [1.0]
        per_input.append(min(candidates))
    return sum(per_input) / len(per_input) if per_input else 0.0


def generation_eval_tokenize(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                             ) -> tuple[list[str], list[list[str]]]:
    """METEOR/TER input as GenerationEval makes it: ``nltk.word_tokenize`` tokens joined by spaces."""
    return ([" ".join(nltk_word_tokenize(h)) for h in hypotheses],
            [[" ".join(nltk_word_tokenize(r)) for r in refs] for refs in references])


def generation_eval_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                           use_java: bool = True) -> tuple[dict[str, float | None], list[str]]:
    """``{"BLEU", "METEOR", "TER"}`` for WebNLG / DART (BLEU 0-100, METEOR and TER 0-1)."""
    notes: list[str] = []
    scores: dict[str, float | None] = {"BLEU": multi_bleu_detok(hypotheses, references)}
    hyps_tok, refs_tok = generation_eval_tokenize(hypotheses, references)
    notes.extend(nltk_tokenizer_notes())
    if use_java and metrics.java_executable() is not None:
        scores["METEOR"] = meteor_generation_eval(hyps_tok, refs_tok)
        empty = sum(1 for h in hyps_tok if not h.strip())
        if empty:
            notes.append(f"{empty} empty hypotheses: METEOR 1.5 in file mode mis-reads empty lines (the official "
                         "GenerationEval call does the same), so METEOR is unreliable here")
    else:
        scores["METEOR"] = None
        notes.append("Java not found: METEOR 1.5 skipped (install a Java runtime to compute it)" if use_java
                     else "Java disabled: METEOR 1.5 skipped")
    scores["TER"] = generation_eval_ter(hyps_tok, refs_tok)
    return scores, notes
