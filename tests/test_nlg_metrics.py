"""Scorers against values derived by hand (formulas in the comments), against independent packages, and
against golden outputs of the official scripts."""

from __future__ import annotations

import json
import math

import pytest

from structlora.tasks.nlg import generation_eval
from structlora.tasks.nlg import metrics as M
from structlora.tasks.nlg.data import NLGInput, read_e2e_references, read_multi_references, write_e2e_references, \
    write_multi_references

needs_java = pytest.mark.skipif(M.java_executable() is None, reason="Java runtime not installed")


def test_mteval_tokenization_matches_v13a_rules():
    # punctuation split, "'" kept, period/comma split unless between digits, dash split after a digit,
    # ASCII-only lower-casing (mteval's tr/[A-Z]/[a-z]/)
    assert M.mteval_tokenize("Hello, world. It's £20-25!", lowercase=True) == \
        ["hello", ",", "world", ".", "it's", "£20", "-", "25", "!"]
    assert M.mteval_tokenize("Costs 2,500.50 now.") == ["Costs", "2,500.50", "now", "."]
    assert M.mteval_tokenize("ÉCOLE", lowercase=True) == ["\u00c9cole"]  # É is not ASCII: kept


def test_e2e_bleu_brevity_penalty_by_hand():
    # all n-gram precisions 1; c=4, r=6: BP = exp(1 - 6/4)
    scores = M.e2e_bleu_nist(["a b c d"], [["a b c d e f"]])
    assert scores["BLEU"] == pytest.approx(math.exp(-0.5), abs=1e-12)


def test_e2e_bleu_smoothing_of_zero_matches_by_hand():
    # p1 = 2/4, p2 = 1/3, p3: 0 matches of 2 -> 1/(2*2), p4: 0 of 1 -> 1/(4*1); BP = 1
    scores = M.e2e_bleu_nist(["a b x y"], [["a b c d"]])
    expected = (0.5 * (1 / 3) * 0.25 * 0.25) ** 0.25
    assert scores["BLEU"] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.3194716, abs=1e-6)


def test_e2e_bleu_closest_reference_ignores_none_and_prefers_shorter():
    # hyp of 3 words, refs of 2 and 4 words: tie -> shorter (2) -> no penalty; precisions 2/3, 1/2, 0->1/2, 0
    scores = M.e2e_bleu_nist(["a b z"], [["a b", "a b c d"]])
    expected = ((2 / 3) * (1 / 2) * (1 / (2 * 1))) ** 0.25 * 1.0
    # p4: no 4-grams in a 3-word hypothesis -> the script counts log-precision 0 for it
    assert scores["BLEU"] == pytest.approx(expected, abs=1e-12)


def test_e2e_nist_by_hand_variable_references():
    # refs: ["a b", "a c"], ["a"] -> 5 words; counts a:3 b:1 c:1, "a b":1, "a c":1; 2 reference sets
    info_a, info_b, info_ab = -math.log2(3 / 5), -math.log2(1 / 5), -math.log2(1 / 3)
    scores = M.e2e_bleu_nist(["a b", "a"], [["a b", "a c"], ["a"]])
    # 1-grams: (a + b + a) / 3 hypothesis words; 2-grams: "a b" / 1; system/ref length 3 / (5/2) >= 1
    assert scores["NIST"] == pytest.approx((info_a + info_b + info_a) / 3 + info_ab, abs=1e-12)
    assert scores["BLEU"] == pytest.approx(1.0)
    # shorter output: length ratio 2 / (5 / 2) = 0.8 -> exp(-beta ln(0.8)^2), beta = -ln(.5)/ln(1.5)^2
    beta = -math.log(0.5) / math.log(1.5) ** 2
    short = M.e2e_bleu_nist(["a", "a"], [["a b", "a c"], ["a"]])
    assert short["NIST"] == pytest.approx(info_a * math.exp(-beta * math.log(0.8) ** 2), abs=1e-12)
    assert short["NIST"] == pytest.approx(0.5974109, abs=1e-6)


def test_e2e_bleu_equals_sacrebleu_when_no_smoothing_is_involved():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi serves French food, rated 5 out of 5.",
            "Loch Fyne is a family-friendly restaurant in the city centre."]
    refs = [["The Eagle is a low-priced coffee shop near Burger King.", "Near Burger King is The Eagle."],
            ["Zizzi has French food and a customer rating of 5 out of 5."],
            ["Loch Fyne is a kid-friendly restaurant in the city centre.", "In the centre: Loch Fyne.",
             "Loch Fyne, a restaurant, is family friendly."]]
    ours = M.e2e_bleu_nist(hyps, refs)["BLEU"] * 100
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    theirs = sacrebleu.corpus_bleu(hyps, streams, lowercase=True, smooth_method="none").score
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_multi_bleu_detok_by_hand_and_against_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    # no smoothing: a zero 3-gram precision makes BLEU 0
    assert generation_eval.multi_bleu_detok(["a b x y"], [["a b c d"]]) == 0.0
    assert generation_eval.multi_bleu_detok(["a b c d"], [["a b c d e f"]]) == pytest.approx(100 * math.exp(-0.5))
    # case-sensitive (GenerationEval runs it without -lc)
    assert generation_eval.multi_bleu_detok(["A b c d"], [["a b c d"]]) == 0.0
    hyps = ["Aarhus Airport serves the city of Aarhus, Denmark.", "Alan Shepard was born in New Hampshire."]
    refs = [["The Aarhus is the airport of Aarhus, Denmark.", "Aarhus Airport serves the city of Aarhus."],
            ["Alan Shepard was born in New Hampshire, U.S.", "New Hampshire is where Alan Shepard was born."]]
    theirs = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [r[1] for r in refs]], smooth_method="none")
    assert generation_eval.multi_bleu_detok(hyps, refs) == pytest.approx(theirs.score, abs=1e-9)


def test_multi_bleu_detok_counts_empty_padding_references():
    # "a b c" (3 words) vs refs of 5 words and the empty line: distances 2 and 3 -> length 5 is used
    # (BP = exp(1 - 5/3)); "a b" vs refs of 5 words and "": distances 3 and 2 -> the empty line wins,
    # reference length 0 -> the Perl script prints BLEU = 0.
    assert generation_eval.multi_bleu_detok(["a b c d"], [["a b c d x", ""]]) == pytest.approx(100 * math.exp(1 - 5 / 4))
    assert generation_eval.multi_bleu_detok(["a b"], [["a b c d x", ""]]) == 0.0


def test_ter_matches_pyter_published_example_and_hand_cases():
    # pyter's documented example: 0.308
    ref = "SAUDI ARABIA denied THIS WEEK information published in the AMERICAN new york times".split()
    hyp = "THIS WEEK THE SAUDIS denied information published in the new york times".split()
    assert f"{generation_eval.ter(hyp, ref):.3f}" == "0.308"
    assert generation_eval.ter("a b c".split(), "a b c".split()) == 0.0
    assert generation_eval.ter("a b".split(), "a b c d".split()) == 0.5  # two insertions / 4
    assert generation_eval.ter("c a b".split(), "a b c".split()) == pytest.approx(1 / 3)  # one shift / 3
    # GenerationEval: min over references, empty reference scores 1
    assert generation_eval.generation_eval_ter(["a b c"], [["a b c d", ""]]) == 0.25


def test_coco_rouge_and_cider_by_hand():
    # use_java=False: same COCO ROUGE-L / CIDEr-D code; these inputs tokenize identically either way.
    # ROUGE-L: LCS(a b c d, a c d e f) = 3, P = 3/4, R = 3/5, beta = 1.2
    scores, notes = M.coco_scores(["a b c d"], [["a c d e f"]], use_java=False)
    precision, recall, beta = 3 / 4, 3 / 5, 1.2
    assert scores["ROUGE_L"] == pytest.approx((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    assert scores["ROUGE_L"] == pytest.approx(0.6535714, abs=1e-7)
    assert scores["METEOR"] is None and notes
    # CIDEr-D, two inputs with one unigram each: idf = ln 2, cosine 1 at n=1, 0 at n=2..4 -> 10 * 1/4
    scores, _ = M.coco_scores(["alpha", "beta"], [["alpha"], ["beta"]], use_java=False)
    assert scores["CIDEr"] == pytest.approx(2.5)


@needs_java
def test_e2e_scores_with_java_identical_output():
    # PTB tokenizer: lower-cased, punctuation tokens dropped, "n't" split
    assert M.ptb_tokenize(["The Eagle isn't cheap.", "Near Burger King, a pub!"]) == \
        ["the eagle is n't cheap", "near burger king a pub"]
    scores, notes = M.e2e_scores(["The Eagle is a pub.", "Zizzi is cheap."],
                                 [["The Eagle is a pub.", "A pub: The Eagle."], ["Zizzi is cheap."]])
    assert notes == []
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["METEOR"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}


@pytest.mark.slow
@needs_java
def test_generation_eval_meteor_file_mode():
    assert generation_eval.meteor_generation_eval(["the cat sat on the mat"], [["the cat sat on the mat", ""]]) == \
        pytest.approx(1.0)
    partial = generation_eval.meteor_generation_eval(["Acharya University"], [["Acharya University is in India ."]])
    assert 0.0 < partial < 1.0


def test_without_java_the_other_metrics_are_reported(monkeypatch):
    monkeypatch.setattr(M, "java_executable", lambda: None)
    scores, notes = M.e2e_scores(["a b c d"], [["a b c d e f"]])
    assert scores["METEOR"] is None and scores["BLEU"] == pytest.approx(math.exp(-0.5))
    assert any("Java not found" in n for n in notes)
    scores, notes = generation_eval.generation_eval_scores(["a b c"], [["a b c d", ""]])
    assert scores["METEOR"] is None and scores["TER"] == 0.25
    assert any("Java not found" in n for n in notes)


def test_score_cli_e2e_and_webnlg(tmp_path, capsys):
    from structlora.cli import main

    inputs = [NLGInput("s1", ("a b c d e f",), "Airport", True), NLGInput("s2", ("x y", "x y z"), "Artist", False)]
    write_e2e_references(inputs, tmp_path / "refs.txt")
    assert read_e2e_references(tmp_path / "refs.txt") == [["a b c d e f"], ["x y", "x y z"]]
    write_multi_references(inputs, tmp_path / "ref")
    assert read_multi_references(tmp_path / "ref") == [["a b c d e f", ""], ["x y", "x y z"]]
    (tmp_path / "hyps.txt").write_text("a b c d\nx y\n")
    (tmp_path / "hyps.seen.txt").write_text("seen\nunseen\n")

    assert main(["score", "e2e", "--ref", str(tmp_path / "refs.txt"), "--hyp", str(tmp_path / "hyps.txt"),
                 "--json", "--no-java"]) == 0
    e2e = json.loads(capsys.readouterr().out)
    assert set(e2e) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "notes"}
    assert e2e["METEOR"] is None

    assert main(["score", "webnlg", "--ref-prefix", str(tmp_path / "ref"), "--hyp", str(tmp_path / "hyps.txt"),
                 "--json", "--no-java"]) == 0
    webnlg = json.loads(capsys.readouterr().out)
    # the unseen subset is the exact match "x y" -> BLEU 0 (no 3/4-grams), TER 0
    assert webnlg["unseen"]["TER"] == 0.0
    assert webnlg["seen"]["TER"] == pytest.approx(2 / 6)  # "a b c d" vs 6 words: 2 insertions
    assert webnlg["all"]["TER"] == pytest.approx(1 / 6)
    assert webnlg["TER"] == webnlg["all"]["TER"]


# Golden values from the official scripts themselves, run once outside this repository (e2e-metrics
# `measure_scores.py` with mteval-v13a-sig.pl; GenerationEval `eval.py` as in microsoft/LoRA, NLTK 3.5).
# mteval prints BLEU/NIST with 4 decimals, multi-bleu-detok.perl BLEU with 2, hence the tolerances.
E2E_GOLDEN_REFS = [
    ["The Eagle is a cheap pub near Cafe Rouge.", "A cheap pub, The Eagle, is near Cafe Rouge."],
    ["Zizzi serves French food; it's rated 5 out of 5."],
    ["Browns Cambridge is a family-friendly Italian restaurant in the city centre.",
     "In the city centre, Browns Cambridge serves Italian food and welcomes families.",
     "Browns Cambridge, an Italian place in the centre, is kid friendly."],
]
# The empty output of an input with fewer references than the maximum is "closest" to the empty padding
# reference measure_scores.py adds (length 0): BLEU 0.5100, not the 0.3285 of skipping the padding.
E2E_GOLDEN_HYPS = ["The Eagle is a pub near Cafe Rouge, it's cheap.", "",
                   "Browns Cambridge is an Italian restaurant in the city centre for families."]


def test_e2e_bleu_nist_equal_official_measure_scores():
    scores = M.e2e_bleu_nist(E2E_GOLDEN_HYPS, E2E_GOLDEN_REFS)
    assert scores["BLEU"] == pytest.approx(0.5100, abs=5e-5)
    assert scores["NIST"] == pytest.approx(4.9410, abs=5e-5)


@needs_java
def test_e2e_coco_metrics_equal_official_measure_scores():
    scores, _ = M.e2e_scores(E2E_GOLDEN_HYPS, E2E_GOLDEN_REFS)
    assert scores["METEOR"] == pytest.approx(0.32731164163751436, abs=1e-12)
    assert scores["ROUGE_L"] == pytest.approx(0.5344947517893808, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(2.8254292532161447, abs=1e-12)


GE_GOLDEN_REFS = [
    ["Alan Bean was born in Wheeler, Texas and was a crew member of Apollo 12.",
     "Alan Bean, a member of the Apollo 12 crew, was born in Wheeler, Texas.",
     "Born in Wheeler, Texas, Alan Bean flew on Apollo 12."],
    ["Aarhus Airport serves the city of Aarhus in Denmark.", "", ""],
    ["The Acharya Institute of Technology is located in Bangalore, India.",
     "Bangalore, India is home to the Acharya Institute of Technology.", ""],
]
GE_GOLDEN_HYPS = ["Alan Bean was born in Wheeler, Texas and flew on Apollo 12.", "Aarhus Airport",
                  "The Acharya Institute of Technology is in Bangalore, India."]


def test_generation_eval_bleu_and_ter_equal_official_eval_py():
    # BLEU: official run on files ending with a newline (without one, Perl's `chop` eats the last
    # character of each file's last line). TER: official run on files without a final newline (with one,
    # eval.py's split('\n') adds a phantom empty input scoring TER 1: (3 * 0.39248 + 1) / 4 = 0.54436).
    assert generation_eval.multi_bleu_detok(GE_GOLDEN_HYPS, GE_GOLDEN_REFS) == pytest.approx(84.41, abs=5e-3)
    hyps_tok, refs_tok = generation_eval.generation_eval_tokenize(GE_GOLDEN_HYPS, GE_GOLDEN_REFS)
    assert generation_eval.generation_eval_ter(hyps_tok, refs_tok) == pytest.approx(0.39248366013071895, abs=1e-12)


@needs_java
def test_generation_eval_meteor_equal_official_eval_py():
    scores, _ = generation_eval.generation_eval_scores(GE_GOLDEN_HYPS, GE_GOLDEN_REFS)
    assert scores["METEOR"] == pytest.approx(0.41762145892324465, abs=1e-12)


# The official WebNLG GenerationEval (github.com/WebNLG/GenerationEval, 8067849), run outside this repository as
# the LoRA/MTLoRA README does, `eval.py -R reference -H hypothesis -nr 6 -m bleu,meteor,ter`, on the six files
# gpt2_decode.py --ref_num 6 --tokenize --lower writes for these raw texts (docs/FIDELITY.md says how it ran).
# It printed BLEU 74.51, METEOR 0.5, TER 0.22; its run() returned METEOR 0.49578656081476247 and
# TER 0.22415193350067297 on files without a final newline (with one, its split('\n') adds a phantom empty
# input: METEOR fails (-1) and TER is (7 * 0.22415 + 1) / 8 = 0.32113).
GE_OFFICIAL_REFS = [
    ["Alan Bean was born in Wheeler, Texas and was a crew member of Apollo 12.",
     "Alan Bean, a member of the Apollo 12 crew, was born in Wheeler, Texas.",
     "Born in Wheeler, Texas, Alan Bean flew on Apollo 12."],
    ["Aarhus Airport serves the city of Aarhus in Denmark."],
    ["The Acharya Institute of Technology is located in Bangalore, India.",
     "Bangalore, India is home to the Acharya Institute of Technology."],
    ["Ajoblanco is a dish from Spain; its main ingredients are bread, almonds and garlic.",
     "Bread, almonds and garlic are the main ingredients of ajoblanco, which comes from Spain.",
     "Ajoblanco, from Spain, is made with bread, almonds and garlic.",
     "The Spanish dish ajoblanco contains bread, almonds and garlic.",
     "Ajoblanco originates from Spain and is made of bread, almonds and garlic.",
     "Spain is the home of ajoblanco, made from bread, almonds and garlic.",
     "A dish called ajoblanco comes from Spain and uses bread, almonds and garlic."],
    ["The runway of Amsterdam Airport Schiphol is 2014 metres long.",
     "Amsterdam Airport Schiphol has a runway length of 2014.0."],
    ["Alfred Garth Jones was born in Manchester in 1872 and died in Sidcup in 1955.",
     "Born in Manchester in 1872, Alfred Garth Jones died in Sidcup in 1955.",
     "Alfred Garth Jones (1872-1955) was born in Manchester and died in Sidcup.",
     "Alfred Garth Jones, who died in Sidcup in 1955, was born in Manchester in 1872."],
    ["The 11th Mississippi Infantry Monument is in Adams County, Pennsylvania.",
     "Adams County, Pennsylvania has the 11th Mississippi Infantry Monument."],
]
GE_OFFICIAL_HYPS = [
    "Alan Bean was born in Wheeler, Texas and flew on Apollo 12.",
    "Aarhus Airport serves the city of Aarhus.",
    "The Acharya Institute of Technology is in Bangalore, India.",
    "Ajoblanco is a Spanish dish made with bread, almonds and garlic.",
    "Amsterdam Airport Schiphol's runway is 2014 metres long.",
    "Alfred Garth Jones was born in Manchester in 1872 and he died in Sidcup.",
    "The 11th Mississippi Infantry Monument is located in Adams County, Pennsylvania.",
]


def test_score_equals_official_generation_eval_nr6(tmp_path, capsys):
    dataset = "dart"  # `score webnlg` shares the code (plus the seen/unseen split, tested above)
    from structlora.cli import main
    from structlora.tasks.nlg.authors_decoding import authors_post_process
    from structlora.tasks.nlg.generation import write_reference_files

    inputs = [NLGInput(f"input {i}", tuple(refs)) for i, refs in enumerate(GE_OFFICIAL_REFS)]
    written = write_reference_files(dataset, inputs, tmp_path / "hyps.txt", tokenize_lower=True)
    assert len(read_multi_references(written["reference_prefix"])[0]) == 6  # -nr 6
    (tmp_path / "hyps.txt").write_text("".join(authors_post_process(h, True, True) + "\n" for h in GE_OFFICIAL_HYPS))
    java = ["--java"] if M.java_executable() else ["--no-java"]
    assert main(["score", dataset, "--ref-prefix", written["reference_prefix"], "--hyp", str(tmp_path / "hyps.txt"),
                 "--json", *java]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert round(scores["BLEU"], 2) == 74.51
    assert scores["TER"] == pytest.approx(0.22415193350067297, abs=1e-12)
    if M.java_executable():
        assert scores["METEOR"] == pytest.approx(0.49578656081476247, abs=1e-12)


def test_nltk_version_other_than_generation_evals_pin_is_noted(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk, "__version__", "3.9.1")
    assert any("NLTK 3.9.1" in n and "nltk==3.5" in n for n in generation_eval.nltk_tokenizer_notes())
    monkeypatch.setattr(nltk, "__version__", "3.5")
    assert not any("nltk==3.5" in n for n in generation_eval.nltk_tokenizer_notes())
