"""E2E BLEU/NIST as ``measure_scores.py -p`` (e2e-metrics' pymteval), the MTLoRA README's scorer.
Golden values: the official code run outside this repository (tests/fixtures/e2e_metrics_example/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structlora.tasks.nlg import metrics as M
from structlora.tasks.nlg.data import read_e2e_references, read_lines
from test_nlg_metrics import E2E_GOLDEN_HYPS, E2E_GOLDEN_REFS

EXAMPLE = Path(__file__).parent / "fixtures" / "e2e_metrics_example"


def test_official_example_inputs_python_and_perl():
    refs = read_e2e_references(str(EXAMPLE / "devel-conc.txt"))
    hyps = read_lines(str(EXAMPLE / "baseline-output.txt"))
    assert (len(refs), len(hyps)) == (10, 10)
    python = M.pymteval_bleu_nist(hyps, refs)
    assert python["BLEU"] == pytest.approx(0.7202928494322162, abs=1e-12)
    assert python["NIST"] == pytest.approx(7.788887609555574, abs=1e-12)
    perl = M.e2e_bleu_nist(hyps, refs)  # measure_scores.py without -p prints NIST 7.8212
    assert round(perl["NIST"], 4) == 7.8212 and round(perl["BLEU"], 4) == 0.7203


def test_own_golden_cases():
    scores = M.pymteval_bleu_nist(E2E_GOLDEN_HYPS, E2E_GOLDEN_REFS)  # includes an empty output
    assert scores["BLEU"] == pytest.approx(0.35782982641432315, abs=1e-12)
    assert scores["NIST"] == pytest.approx(2.9805516674074295, abs=1e-12)
    # Unicode lower-casing, an empty output, a one-token output (negative n-gram counts), £20-25, 5.5, &amp;
    hyps = ["CAFÉ Rouge is near The Eagle.", "", "a", "Price: £20-25, 5.5 stars & more"]
    refs = [["Café Rouge is near the Eagle.", "The Eagle is close to Café Rouge"], ["Zizzi is a pub."],
            ["a b"], ["It costs £20-25 and has 5.5 stars &amp; more.", "Price range £20-25."]]
    scores = M.pymteval_bleu_nist(hyps, refs)
    assert scores["BLEU"] == pytest.approx(0.520662187065955, abs=1e-12)
    assert scores["NIST"] == pytest.approx(3.6540152088415945, abs=1e-12)


def test_tokenizer_matches_pymteval():
    assert M.pymteval_tokenize("") == [""]
    assert M.pymteval_tokenize("£20-25, 5.5 stars.") == ["£20", "-", "25", ",", "5.5", "stars", "."]


def test_score_cli_defaults_to_python_mteval(tmp_path, capsys):
    from structlora.cli import main

    args = ["score", "e2e", "--ref", str(EXAMPLE / "devel-conc.txt"), "--hyp", str(EXAMPLE / "baseline-output.txt"),
            "--json", "--no-java"]
    assert main(args) == 0
    assert round(json.loads(capsys.readouterr().out)["NIST"], 4) == 7.7889
    assert main(args + ["--mteval", "perl"]) == 0
    assert round(json.loads(capsys.readouterr().out)["NIST"], 4) == 7.8212
