"""Converters on small fixture files written by the tests (E2E CSV + lines, WebNLG 2017 XML, DART JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structlora.tasks.nlg.data import (NLGInput, has_split_files, linearize_e2e_mr, linearize_triples, load_split,
                                 read_dart_json,
                                 read_e2e_csv, read_e2e_lines, read_webnlg_xml, split_by_input, training_pairs,
                                 webnlg_xml_files)
from shared_paths import SHARED_DATA

E2E_CSV = '''mr,ref
"name[The Eagle], eatType[coffee shop], priceRange[£20-25], familyFriendly[no]",The Eagle is a coffee shop.
"name[The Eagle], eatType[coffee shop], priceRange[£20-25], familyFriendly[no]","Costing £20-25, The Eagle is adult only."
"name[Zizzi], customer rating[5 out of 5], near[Burger King]",Zizzi is near Burger King.
'''

WEBNLG_ENTRY = '''<benchmark><entries>
<entry category="{category}" eid="Id{eid}" size="{size}">
  <originaltripleset><otriple>ignored | ignored | ignored</otriple></originaltripleset>
  <modifiedtripleset>{triples}</modifiedtripleset>
  <lex comment="good" lid="Id1">{text}</lex>
  <lex comment="toFix" lid="Id2">Bad text.</lex>
</entry>
</entries></benchmark>'''


def write_e2e(folder: Path) -> None:
    (folder / "e2e").mkdir(parents=True, exist_ok=True)
    (folder / "e2e" / "devset.csv").write_text(E2E_CSV, encoding="utf-8")


def write_webnlg(folder: Path, split: str = "dev") -> None:
    one = folder / "webnlg2017" / split / "1triples"
    two = folder / "webnlg2017" / split / "2triples"
    one.mkdir(parents=True, exist_ok=True)
    two.mkdir(parents=True, exist_ok=True)
    (one / f"1triple_allSolutions_Airport_{split}_challenge.xml").write_text(WEBNLG_ENTRY.format(
        category="Airport", eid=1, size=1, triples="<mtriple>Aarhus_Airport | cityServed | \"Aarhus, Denmark\"</mtriple>",
        text="Aarhus Airport serves Aarhus, Denmark."))
    (two / f"2triple_allSolutions_Artist_{split}_challenge.xml").write_text(WEBNLG_ENTRY.format(
        category="Artist", eid=1, size=2,
        triples="<mtriple>Ace_Wilder | genre | Hip_hop_music</mtriple><mtriple>Ace_Wilder | birthYear | 1982</mtriple>",
        text="Ace Wilder, born in 1982, plays hip hop &amp; pop."))


def write_dart(folder: Path) -> None:
    (folder / "dart").mkdir(parents=True, exist_ok=True)
    records = [
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill"]],
         "subtree_was_extended": True,
         "annotations": [{"source": "WikiSQL_decl_sents", "text": "A Mars Hill school joined in 1973."},
                         {"source": "x", "text": "Mars Hill College joined in 1973."}]},
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill"]],
         "annotations": [{"source": "y", "text": "In 1973 Mars Hill College joined."}]},
        {"tripleset": [["A", "B", "C"]], "annotations": [{"source": "z", "text": "A B C."}]},
    ]
    (folder / "dart" / "dart-v1.1.1-full-dev.json").write_text(json.dumps(records))


def test_linearisation():
    assert linearize_triples([("a", "b", "c"), ("d", "e", "f")]) == "a : b : c | d : e : f"
    assert linearize_e2e_mr("name[The Eagle], eatType[pub], customer rating[high], familyFriendly[yes]") == \
        "name : The Eagle | Type : pub | customer rating : high | family friendly : yes"


def test_e2e_csv_groups_references_by_mr(tmp_path):
    write_e2e(tmp_path)
    inputs = read_e2e_csv(tmp_path / "e2e" / "devset.csv")
    assert [x.source for x in inputs] == [
        "name : The Eagle | Type : coffee shop | price : £20-25 | family friendly : no",
        "name : Zizzi | customer rating : 5 out of 5 | near : Burger King",
    ]
    assert inputs[0].references == ("The Eagle is a coffee shop.", "Costing £20-25, The Eagle is adult only.")
    assert training_pairs(inputs)[2] == (inputs[1].source, "Zizzi is near Burger King.")
    assert load_split("e2e", "dev", tmp_path) == inputs


def test_e2e_line_format(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text("name : A | area : riverside||A is by the river . \n"
                    "name : A | area : riverside||By the river : A . \n"
                    "name : B||B . \n")
    inputs = read_e2e_lines(path)
    assert inputs == [NLGInput("name : A | area : riverside", ("A is by the river .", "By the river : A .")),
                      NLGInput("name : B", ("B .",))]


def test_webnlg_xml_seen_unseen_and_good_lexicalisations(tmp_path, monkeypatch):
    write_webnlg(tmp_path)
    files = webnlg_xml_files(tmp_path / "webnlg2017" / "dev")
    assert [f.parent.name for f in files] == ["1triples", "2triples"]
    inputs = read_webnlg_xml(files)
    assert inputs[0] == NLGInput('Aarhus_Airport : cityServed : "Aarhus, Denmark"',
                                 ("Aarhus Airport serves Aarhus, Denmark.",), "Airport", True)
    assert inputs[1].source == "Ace_Wilder : genre : Hip_hop_music | Ace_Wilder : birthYear : 1982"
    assert inputs[1].references == ("Ace Wilder, born in 1982, plays hip hop & pop.",)  # "toFix" dropped
    assert (inputs[1].category, inputs[1].seen) == ("Artist", False)
    monkeypatch.setenv("STRUCTLORA_DATA", str(tmp_path))
    assert load_split("webnlg", "dev") == inputs


def test_dart_json_merges_duplicate_triplesets(tmp_path):
    write_dart(tmp_path)
    inputs = read_dart_json(tmp_path / "dart" / "dart-v1.1.1-full-dev.json")
    assert len(inputs) == 2
    assert inputs[0].source == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill"
    assert inputs[0].references == ("A Mars Hill school joined in 1973.", "Mars Hill College joined in 1973.",
                                    "In 1973 Mars Hill College joined.")


def test_dev_split_by_input_is_seeded_and_disjoint():
    inputs = [NLGInput(f"mr {i}", (f"ref {i}",)) for i in range(50)]
    train, heldout = split_by_input(inputs, 0.1, seed=3)
    assert len(heldout) == 5 and len(train) == 45
    assert not {x.source for x in train} & {x.source for x in heldout}
    assert split_by_input(inputs, 0.1, seed=3) == (train, heldout)
    assert split_by_input(inputs, 0.1, seed=4)[1] != heldout
    assert heldout == sorted(heldout, key=lambda x: int(x.source.split()[1]))  # file order kept


def test_missing_files_say_where_to_look(tmp_path):
    with pytest.raises(FileNotFoundError, match="STRUCTLORA_DATA"):
        load_split("e2e", "test", tmp_path)


def test_has_split_files_finds_what_load_split_reads_without_reading_it(tmp_path):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "devset.csv").write_text("mr,ref\nname[Aromi],Aromi is a pub.\n")
    (tmp_path / "e2e" / "train.txt").write_text("no separator: a bad row, but not read here\n")
    (tmp_path / "webnlg2017" / "train").mkdir(parents=True)  # a folder without *.xml: nothing to read
    assert has_split_files("e2e", "dev", tmp_path) and has_split_files("e2e", "train", tmp_path)
    assert not has_split_files("e2e", "test", tmp_path)
    assert not has_split_files("webnlg", "train", tmp_path) and not has_split_files("dart", "dev", tmp_path)
    assert len(load_split("e2e", "dev", tmp_path)) == 1


@pytest.mark.skipif(not (SHARED_DATA / "e2e" / "devset.csv").exists(), reason="shared data not present")
def test_real_shared_files_parse():
    root = SHARED_DATA
    e2e = load_split("e2e", "dev", root)
    assert len(e2e) == 547 and sum(len(x.references) for x in e2e) == 4672
    train, heldout = load_split("e2e", "dev-train", root), load_split("e2e", "dev-heldout", root)
    assert (len(train), len(heldout)) == (492, 55)
    dart = load_split("dart", "dev", root)
    assert len(dart) == 2721
