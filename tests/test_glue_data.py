"""GLUE loaders on small fixture files in each local layout, the hub fallback's error, and the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

from structlora.tasks.data_errors import BadRows, DataRowError
from structlora.tasks.glue import GLUE_TASKS, GlueDataError, load_glue, load_glue_local
from shared_paths import SHARED_DATA



def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def test_shared_sst2_layout_label_first(tmp_path):
    write_tsv(tmp_path / "sst2" / "train.tsv", [["label", "sentence"], ["1", "a great film"], ["0", "dull ' and \" bad"]])
    write_tsv(tmp_path / "sst2" / "dev.tsv", [["label", "sentence"], ["0", "boring"]])
    data = load_glue_local(tmp_path, "sst2")
    assert data["train"]["sentence"] == ["a great film", "dull ' and \" bad"]  # quotes are plain text
    assert data["train"]["label"] == [1, 0]
    assert data["validation"]["label"] == [0]


def test_shared_cola_layout_sentence_first_out_of_domain_dev(tmp_path):
    write_tsv(tmp_path / "cola" / "train.tsv", [["sentence", "label"], ["the dog ran", "1"], ["dog the ran", "0"]])
    write_tsv(tmp_path / "cola" / "dev_out_of_domain.tsv", [["sentence", "label"], ["who ran", "1"]])
    data = load_glue_local(tmp_path, "cola")
    assert data["train"]["sentence"] == ["the dog ran", "dog the ran"]
    assert data["train"]["label"] == [1, 0]
    assert data["validation"]["sentence"] == ["who ran"]


def test_glue_cola_without_header(tmp_path):
    rows = [["gj04", "1", "", "the dog ran ."], ["gj04", "0", "*", "dog the ran ."]]
    write_tsv(tmp_path / "CoLA" / "train.tsv", rows)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", rows[:1])
    data = load_glue_local(tmp_path, "cola")
    assert data["train"]["sentence"] == ["the dog ran .", "dog the ran ."]
    assert data["train"]["label"] == [1, 0]
    assert len(data["validation"]) == 1


def test_glue_mrpc_layout(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(tmp_path / "MRPC" / "train.tsv", [header, ["1", "1", "2", "he ran", "he ran fast"], ["0", "3", "4", "a", "b"]])
    write_tsv(tmp_path / "MRPC" / "dev.tsv", [header, ["1", "5", "6", "x", "y"]])
    data = load_glue_local(tmp_path, "mrpc")
    assert data["train"]["sentence1"] == ["he ran", "a"]
    assert data["train"]["sentence2"] == ["he ran fast", "b"]
    assert data["train"]["label"] == [1, 0]


def test_glue_mnli_layout_string_labels_and_two_dev_sets(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]

    def row(premise: str, hypothesis: str, label: str) -> list[str]:
        return ["0", "1", "2", "fiction", "(", "(", "(", "(", premise, hypothesis, label, label]

    write_tsv(tmp_path / "MNLI" / "train.tsv", [header, row("p1", "h1", "contradiction"), row("p2", "h2", "entailment")])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [header, row("p3", "h3", "neutral"), row("p4", "h4", "-")])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", [header, row("p5", "h5", "entailment")])
    data = load_glue_local(tmp_path, "mnli")
    assert set(data) == {"train", "validation_matched", "validation_mismatched"}
    # Hub order: entailment 0, neutral 1, contradiction 2; "-" (no gold label) rows are dropped.
    assert data["train"]["label"] == [2, 0]
    assert data["train"]["premise"] == ["p1", "p2"] and data["train"]["hypothesis"] == ["h1", "h2"]
    assert data["validation_matched"]["label"] == [1]
    assert data["validation_mismatched"]["label"] == [0]


def test_glue_stsb_float_scores(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "train.tsv", [header, ["0", "g", "f", "y", "0", "s", "s", "a man", "a woman", "3.8"]])
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [header, ["0", "g", "f", "y", "0", "s", "s", "a", "b", "0.25"]])
    data = load_glue_local(tmp_path, "stsb")
    assert data["train"]["label"] == [pytest.approx(3.8)]
    assert data["validation"]["label"] == [pytest.approx(0.25)]


@pytest.mark.parametrize(
    ("task", "folder", "header", "row", "expected"),
    [
        ("rte", "RTE", ["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "not_entailment"], 1),
        ("qnli", "QNLI", ["index", "question", "sentence", "label"], ["0", "who?", "he", "entailment"], 0),
        ("qqp", "QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["0", "1", "2", "a?", "b?", "1"], 1),
    ],
)
def test_glue_pair_layouts(tmp_path, task, folder, header, row, expected):
    broken = row[:2]  # a truncated line: an error naming file:line, skipped and counted with --skip-bad-rows
    write_tsv(tmp_path / folder / "train.tsv", [header, row, broken])
    write_tsv(tmp_path / folder / "dev.tsv", [header, row])
    with pytest.raises(DataRowError, match=rf"{folder}/train\.tsv:3: 2 tab-separated column\(s\)"):
        load_glue_local(tmp_path, task)
    bad_rows = BadRows(skip=True)
    data = load_glue_local(tmp_path, task, bad_rows)
    assert bad_rows.count == 1
    assert data["train"]["label"] == [expected]
    for column in GLUE_TASKS[task].text_columns:
        assert len(data["validation"][column]) == 1


def test_missing_task_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(GlueDataError, match="How to get the data"):
        load_glue("rte", tmp_path)


def test_missing_data_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(GlueDataError, match="does not exist.*How to get the data"):
        load_glue("sst2", tmp_path / "nowhere")


def test_unreachable_hub_says_how_to_get_data(tmp_path, monkeypatch):
    # Offline mode with an empty cache: what a user without network and without --data-dir sees.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(GlueDataError, match="nyu-mll/glue.*How to get the data"):
        load_glue("sst2", None)


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="shared data not present")
def test_shared_data_sizes():
    sst2 = load_glue("sst2", SHARED_DATA)
    assert (len(sst2["train"]), len(sst2["validation"])) == (6920, 872)
    cola = load_glue("cola", SHARED_DATA)
    assert (len(cola["train"]), len(cola["validation"])) == (8551, 516)
    assert set(sst2["train"]["label"]) == {0, 1} and set(cola["validation"]["label"]) == {0, 1}
