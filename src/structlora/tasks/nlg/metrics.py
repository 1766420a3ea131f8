"""Offline equivalents of the official data-to-text metrics.

E2E (``measure_scores.py`` of the e2e-metrics repository, default Perl mode):
  * BLEU and NIST as computed by its ``mteval-v13a-sig.pl`` (mteval-v13a tokenisation, ASCII lower-casing,
    closest reference length with ties to the shorter one, counting the empty references that
    measure_scores.py pads every input with (length 0), the script's 1/2^k smoothing of zero n-gram
    matches, NIST's information weights from all references and its length penalty against total
    reference words / number of reference sets).
  * METEOR, ROUGE_L and CIDEr from the MS-COCO caption code (``pycocoevalcap``) after the Stanford PTB
    tokenizer (the Java jar that ``pycocoevalcap`` ships), exactly as the official wrapper calls them.

WebNLG / DART (the WebNLG ``GenerationEval`` script): ``structlora.tasks.nlg.generation_eval``, which uses the
Java helpers and the mteval tokenizer defined here.

Nothing here needs the network; METEOR and the PTB tokenizer need Java. When Java is missing the
functions that need it raise :class:`JavaUnavailable`; the scorers report that and go on.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Sequence

# --------------------------------------------------------------------------------------------- Java
class JavaUnavailable(RuntimeError):
    """Raised when a metric needs Java (METEOR 1.5, Stanford PTB tokenizer) and there is none."""


class JavaTimeout(TimeoutError):
    """A Java scorer ran longer than ``STRUCTLORA_JAVA_TIMEOUT`` seconds and was stopped (an OSError: the CLI
    prints it as one ``error:`` line)."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what} did not finish within {timeout:g} s and was stopped "
                         f"(raise STRUCTLORA_JAVA_TIMEOUT, in seconds, for very large inputs)")


def _run_java(command: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True,
                              timeout=JAVA_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise JavaTimeout(what, JAVA_TIMEOUT_S) from err


def java_executable() -> str | None:
    """Path of ``java`` (``$JAVA`` wins, then ``$JAVA_HOME/bin/java``, then ``PATH``), or None."""
    explicit = os.environ.get("JAVA")
    if explicit:
        return explicit if shutil.which(explicit) else None
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return os.path.join(java_home, "bin", "java")
    return shutil.which("java")


def _coco_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as err:  # pragma: no cover - the recipes extra installs it
        raise JavaUnavailable("pycocoevalcap is not installed (pip install pycocoevalcap)") from err
    # pycocoevalcap is a namespace-like package without __file__ in some releases.
    locations = list(getattr(pycocoevalcap, "__path__", []))
    return Path(locations[0])


def meteor_jar() -> Path:
    return _coco_dir() / "meteor" / "meteor-1.5.jar"


def ptb_tokenizer_jar() -> Path:
    return _coco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"


def _require_java() -> str:
    java = java_executable()
    if java is None:
        raise JavaUnavailable("Java was not found (install a JRE or set JAVA_HOME): METEOR needs it")
    return java


# --------------------------------------------------------------------------------- mteval tokeniser
# A Java scorer that runs longer than this is stopped (JavaTimeout) instead of hanging the run.
JAVA_TIMEOUT_S = float(os.environ.get("STRUCTLORA_JAVA_TIMEOUT", "1800"))
_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def mteval_tokenize(text: str, lowercase: bool = False) -> list[str]:
    """mteval-v13a's default tokenisation (sacrebleu's ``13a`` runs the same regular expressions).
    ``lowercase`` is mteval's ``tr/[A-Z]/[a-z]/``: ASCII letters only, before tokenising."""
    if lowercase:
        text = text.translate(_ASCII_UPPER)
    tokenized = _tokenizer_13a()(text)
    return tokenized.split() if tokenized else []


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


# ------------------------------------------------------------------------------------ E2E BLEU/NIST
def e2e_bleu_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (4-gram) and NIST (5-gram) exactly as the E2E ``mteval-v13a-sig.pl`` computes them.

    ``references[i]`` holds the references of input ``i`` (any number >= 1).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    hyp_tokens = [mteval_tokenize(h, lowercase=True) for h in hypotheses]
    ref_tokens = [[mteval_tokenize(r, lowercase=True) for r in refs] for refs in references]
    num_ref_sets = max((len(refs) for refs in references), default=1)

    # NIST information weights from every reference n-gram (orders 1..5) of the whole corpus.
    total_ref_words = 0
    ref_ngram_totals: Counter = Counter()
    for refs in ref_tokens:
        for ref in refs:
            total_ref_words += len(ref)
            for n in range(1, 6):
                ref_ngram_totals.update(_ngram_counts(ref, n))

    def information(ngram: tuple[str, ...]) -> float:
        prefix = ngram[:-1]
        # Perl tests the prefix string for truth: an empty prefix *and* the 1-word prefix "0" both fall
        # back to the total number of reference words.
        if not prefix or prefix == ("0",):
            denominator = total_ref_words
        else:
            denominator = ref_ngram_totals[prefix]
        return -math.log(ref_ngram_totals[ngram] / denominator) / math.log(2)

    bleu_matches = [0] * 5  # index n = order
    bleu_totals = [0] * 5
    nist_info = [0.0] * 6
    nist_totals = [0] * 6
    closest_ref_length = 0
    for hyp, refs in zip(hyp_tokens, ref_tokens):
        # Brevity-penalty length: the closest reference length, ties to the shorter. measure_scores.py pads
        # every input to the same number of reference sets with empty segments, and mteval counts those
        # as references of length 0 -- so a short (or empty) output of an input with fewer references
        # than the maximum can be "closest" to the empty padding (checked against the Perl script).
        lengths = [len(ref) for ref in refs] + [0] * (num_ref_sets - len(refs))
        closest_ref_length += min(lengths, key=lambda length: (abs(len(hyp) - length), length), default=0)
        for n in range(1, 6):
            hyp_counts = _ngram_counts(hyp, n)
            max_ref_counts: Counter = Counter()
            for ref in refs:
                for ngram, count in _ngram_counts(ref, n).items():
                    if count > max_ref_counts[ngram]:
                        max_ref_counts[ngram] = count
            matched = {g: min(c, max_ref_counts[g]) for g, c in hyp_counts.items() if g in max_ref_counts}
            total = max(len(hyp) - n + 1, 0)
            nist_totals[n] += total
            nist_info[n] += sum(information(g) * c for g, c in matched.items())
            if n <= 4:
                bleu_totals[n] += total
                bleu_matches[n] += sum(matched.values())

    # BLEU with the script's default smoothing (zero matches count as 1/2^k of the n-gram total).
    brevity = math.exp(min(0.0, 1.0 - closest_ref_length / bleu_totals[1])) if bleu_totals[1] > 0 else 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, 5):
        if bleu_totals[n] == 0:
            log_precision = 0.0
        elif bleu_matches[n] == 0:
            smooth *= 2
            log_precision = math.log(1.0 / (smooth * bleu_totals[n]))
        else:
            log_precision = math.log(bleu_matches[n] / bleu_totals[n])
        log_sum += log_precision
    bleu = math.exp(log_sum / 4) * brevity

    average_ref_length = total_ref_words / num_ref_sets
    nist_sum = sum(nist_info[n] / max(nist_totals[n], 1) for n in range(1, 6))
    nist = nist_sum * _nist_length_penalty(nist_totals[1] / average_ref_length if average_ref_length else 0.0)
    return {"BLEU": bleu, "NIST": nist}


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) * math.log(ratio))


# ------------------------------------------------------------------------------------ COCO metrics
_PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                    "--", "...", ";"}


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """The COCO caption tokenisation: Stanford PTBTokenizer (``-preserveLines -lowerCase``) with
    punctuation tokens removed, one output line per input sentence. Needs Java."""
    java = _require_java()
    with tempfile.TemporaryDirectory(prefix="structlora-ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(s.replace("\n", " ") for s in sentences))
        result = _run_java([java, "-cp", str(ptb_tokenizer_jar()), "edu.stanford.nlp.process.PTBTokenizer",
                            "-preserveLines", "-lowerCase", path], "the Stanford PTB tokenizer (Java)")
    lines = result.stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION)
            for line, _ in zip(lines, sentences)]


_APPROX_PTB = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def approximate_ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """A pure-Python stand-in for :func:`ptb_tokenize` when Java is missing (NOT official: lower-case
    word/punctuation split, punctuation dropped)."""
    out = []
    for sentence in sentences:
        words = _APPROX_PTB.findall(sentence.lower())
        out.append(" ".join(w for w in words if w not in _PTB_PUNCTUATION and re.search(r"\w", w)))
    return out


class MeteorScorer:
    """pycocoevalcap's METEOR 1.5 wrapper, started with an explicit Java path (raises JavaUnavailable)."""

    def __init__(self) -> None:
        java = _require_java()
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor.__new__(Meteor)
        self._meteor.meteor_cmd = [java, "-jar", "-Xmx2G", str(meteor_jar()), "-", "-", "-stdio", "-l", "en",
                                   "-norm"]
        self._meteor.meteor_p = subprocess.Popen(self._meteor.meteor_cmd, cwd=str(meteor_jar().parent),
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        self._meteor.lock = threading.Lock()

    def compute_score(self, gts: dict, res: dict, timeout: float | None = None) -> tuple[float, list[float]]:
        """METEOR of ``res`` against ``gts``. The process answers line by line on a pipe: a watchdog kills it
        after ``timeout`` seconds (default ``JAVA_TIMEOUT_S``) so a stuck jar raises JavaTimeout, not a hang."""
        timeout = JAVA_TIMEOUT_S if timeout is None else timeout
        process = self._meteor.meteor_p
        fired = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (fired.set(), process.kill()))
        watchdog.start()
        try:
            return self._meteor.compute_score(gts, res)
        except Exception as err:
            watchdog.cancel()
            self.close()  # the process is in an unknown state; close() also frees the lock the failed call kept
            if fired.is_set():  # the error is the pipe the watchdog closed
                raise JavaTimeout("METEOR 1.5 (Java, persistent process)", timeout) from err
            raise
        finally:
            watchdog.cancel()

    def close(self) -> None:
        process = self._meteor.meteor_p
        # A dead process's pipe fails the flush of the unsent line (BrokenPipeError); the file is closed all the same,
        # so pycocoevalcap's Meteor.__del__ later closes nothing and cannot raise while it holds its lock.
        with contextlib.suppress(OSError):
            process.stdin.close()
        if process.poll() is None:
            process.kill()
        process.wait()
        # pycocoevalcap's compute_score keeps its lock when it raises, and Meteor.__del__ takes that lock:
        # a fresh one lets the garbage collector finish instead of hanging the interpreter at exit.
        self._meteor.lock = threading.Lock()


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                use_java: bool = True) -> tuple[dict[str, float | None], list[str]]:
    """METEOR, ROUGE_L, CIDEr as the e2e-metrics wrapper of the COCO code computes them.

    Returns ``(scores, notes)``; without Java METEOR is None and ROUGE_L/CIDEr use the approximate
    tokenizer (the notes say so)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notes: list[str] = []
    flat_refs = [r for refs in references for r in refs]
    java_ok = use_java and java_executable() is not None
    if java_ok:
        tokenized = ptb_tokenize(list(flat_refs) + list(hypotheses))
    else:
        reason = "Java not found" if use_java else "Java disabled"
        notes.append(f"{reason}: METEOR skipped; ROUGE_L and CIDEr use an approximate Python "
                     "tokenizer instead of the Stanford PTB tokenizer (not official numbers)")
        tokenized = approximate_ptb_tokenize(list(flat_refs) + list(hypotheses))
    gts: dict[str, list[str]] = {}
    res: dict[str, list[str]] = {}
    position = 0
    for index, refs in enumerate(references):
        gts[f"inst-{index}"] = tokenized[position:position + len(refs)]
        position += len(refs)
    for index in range(len(hypotheses)):
        res[f"inst-{index}"] = [tokenized[position + index]]
    scores: dict[str, float | None] = {}
    if java_ok:
        meteor = MeteorScorer()
        try:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.close()
    else:
        scores["METEOR"] = None
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores, notes


# ------------------------------------------------------------- E2E BLEU/NIST, measure_scores.py -p
_PYMTEVAL_RULES = (  # e2e-metrics metrics/pymteval.py NGramScore.tokenize, in its order
    (r"<skipped>", ""), (r"-\n", ""), (r"\n", " "), (r"&quot;", '"'), (r"&amp;", "&"), (r"&lt;", "<"),
    (r"&gt;", ">"),
)
_PYMTEVAL_SPLITS = (
    (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),  # punctuation
    (r"([^0-9])([\.,])", r"\1 \2 "),  # period and comma unless preceded by a digit
    (r"([\.,])([^0-9])", r" \1 \2"),  # period and comma unless followed by a digit
    (r"([0-9])(-)", r"\1 \2 "),  # dash after a digit
)


def pymteval_tokenize(text: str) -> list[str]:
    """pymteval's tokeniser (its own port of mteval's): Unicode lower-casing is applied later, per
    n-gram, as pymteval does; an empty text is one empty token, as ``"".split(" ")``."""
    for pattern, replacement in _PYMTEVAL_RULES:
        text = re.sub(pattern, replacement, text)
    text = " " + text + " "
    for pattern, replacement in _PYMTEVAL_SPLITS:
        text = re.sub(pattern, replacement, text)
    return re.sub(r"\s+", " ", text).strip().split(" ")


def _lower_ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    lowered = [w.lower() for w in words]
    return [tuple(lowered[i:i + n]) for i in range(len(lowered) - n + 1)]


def _clipped_hits(n: int, hyp: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[tuple[str, ...], int]:
    """Hypothesis n-grams matched, each clipped at its maximum count in any single reference."""
    most: Counter = Counter()
    for ref in refs:
        most |= Counter(_lower_ngrams(ref, n))
    return {g: min(c, most[g]) for g, c in Counter(_lower_ngrams(hyp, n)).items() if most[g]}


def pymteval_bleu_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and NIST as e2e-metrics ``measure_scores.py -p`` (``metrics/pymteval.py``), the
    command the MTLoRA README scores E2E with. It differs from the Perl mteval (:func:`e2e_bleu_nist`)
    in its NIST: information weights over the given references only (no padding references), the
    length penalty against the mean of each input's average reference length, and n-gram counts
    ``len - n + 1`` per sentence even when negative; BLEU adds 1e-15 to zero hit counts."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    hyps = [pymteval_tokenize(h) for h in hypotheses]
    refs = [[pymteval_tokenize(r) for r in group] for group in references]
    # BLEU (4-gram, case-insensitive, closest reference length, ties to the shorter one).
    hits, cand, ref_len = [0] * 4, [0] * 4, 0
    for hyp, group in zip(hyps, refs):
        for n in range(4):
            hits[n] += sum(_clipped_hits(n + 1, hyp, group).values())
            cand[n] += len(hyp) - n
        ref_len += len(min(group, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
    log_precision = sum(math.log(max(h, 1e-15) / max(c, 1e-9)) for h, c in zip(hits, cand))
    brevity = math.exp(1.0 - ref_len / (cand[0] if cand[0] else 1e-5)) if cand[0] <= ref_len else 1.0
    bleu = brevity * math.exp(log_precision / 4)
    # NIST (5-gram): information from all reference n-gram counts; unigrams over the total reference words.
    counts: list[Counter] = [Counter() for _ in range(6)]
    matched: list[list[dict]] = [[] for _ in range(5)]
    cand_nist, average_ref = [0] * 5, 0.0
    for hyp, group in zip(hyps, refs):
        for n in range(5):
            cand_nist[n] += len(hyp) - n
            matched[n].append(_clipped_hits(n + 1, hyp, group))
            for ref in group:
                counts[n + 1].update(_lower_ngrams(ref, n + 1))
        words = sum(len(r) for r in group)
        counts[0][()] += words
        average_ref += words / len(group)

    def information(ngram: tuple[str, ...]) -> float:
        if ngram not in counts[len(ngram)]:
            return 0.0
        return math.log2(counts[len(ngram) - 1][ngram[:-1]] / counts[len(ngram)][ngram])

    nist = 0.0
    for n in range(5):
        gained = sum(information(g) * h for sentence in matched[n] for g, h in sentence.items())
        nist += gained / cand_nist[n] if cand_nist[n] else 0.0
    ratio = cand_nist[0] / average_ref if average_ref else 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return {"BLEU": bleu, "NIST": penalty * nist}


MTEVAL_VARIANTS: tuple[str, ...] = ("python", "perl")


def e2e_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
               use_java: bool = True, mteval: str = "python") -> tuple[dict[str, float | None], list[str]]:
    """``{"BLEU","NIST","METEOR","ROUGE_L","CIDEr"}`` as the official E2E ``measure_scores.py``:
    ``mteval="python"`` as its ``-p`` (pymteval; the MTLoRA README's command), ``"perl"`` as without
    it (``mteval-v13a-sig.pl``)."""
    if mteval not in MTEVAL_VARIANTS:
        raise ValueError(f"mteval {mteval!r} is not one of {', '.join(MTEVAL_VARIANTS)}")
    bleu_nist = pymteval_bleu_nist if mteval == "python" else e2e_bleu_nist
    scores: dict[str, float | None] = dict(bleu_nist(hypotheses, references))
    coco, notes = coco_scores(hypotheses, references, use_java=use_java)
    scores.update(coco)
    return {k: scores[k] for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")}, notes
