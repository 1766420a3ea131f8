"""LLM task templates (MeZO prompts), label mapping, sampling and data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structlora.tasks.llm.data import DataUnavailableError, add_demonstrations, load_records, sample_splits
from structlora.tasks.llm.tasks import TASKS, PromptedExample, get_task


def render_one(task: str, record: dict) -> PromptedExample:
    (example,) = get_task(task).render(record)
    return example


def full_texts(example: PromptedExample) -> list[str]:
    return [example.context + candidate for candidate in example.candidates]


def test_every_task_is_registered() -> None:
    assert list(TASKS) == ["SST-2", "RTE", "CB", "BoolQ", "WSC", "WiC", "MultiRC", "COPA", "ReCoRD", "SQuAD", "DROP"]
    assert get_task("sst2").name == "SST-2" and get_task("boolq").name == "BoolQ"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mnli")


def test_sst2() -> None:
    example = render_one("SST-2", {"sentence": "a gorgeous film ", "label": "1"})
    assert full_texts(example) == ["a gorgeous film It was terrible", "a gorgeous film It was great"]
    assert example.gold == (1,)


def test_rte_local_and_hub_labels() -> None:
    local = render_one("RTE", {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": "not_entailment"})
    assert full_texts(local) == [
        'A cat sat.\nDoes this mean that "An animal sat." is true? Yes or No?\nYes',
        'A cat sat.\nDoes this mean that "An animal sat." is true? Yes or No?\nNo',
    ]
    assert local.gold == (1,)
    hub = render_one("RTE", {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0})
    assert hub.gold == (0,) and hub.context == local.context


def test_cb_three_way() -> None:
    example = render_one("CB", {"premise": "It rained.", "hypothesis": "the ground is wet", "label": "neutral"})
    assert example.context == 'Suppose It rained. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n'
    assert example.candidates == ("Yes", "No", "Maybe") and example.gold == (2,)
    assert render_one("CB", {"premise": "p", "hypothesis": "h", "label": 1}).gold == (1,)  # contradiction


def test_boolq() -> None:
    example = render_one("BoolQ", {"passage": "Paris is in France.", "question": "is paris in france",
                                   "label": True})
    # The authors' BoolQTemplateV3: first letter capitalised, "?" added only when missing.
    assert full_texts(example) == ["Paris is in France. Is paris in france?\nNo",
                                   "Paris is in France. Is paris in france?\nYes"]
    assert example.gold == (1,)
    asked = render_one("BoolQ", {"passage": "P.", "question": "is it?", "label": False})
    assert full_texts(asked)[0] == "P. Is it?\nNo"


def test_wic() -> None:
    example = render_one("WiC", {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank lent money.",
                                 "label": False})
    assert example.context == ('Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
                               "The river bank.\nThe bank lent money.\n")
    assert example.candidates == ("No", "Yes") and example.gold == (0,)


def test_wsc_local_nested_and_hub_flat() -> None:
    local = {"text": "Mark told Pete he was late.", "label": True,
             "target": {"span1_text": "Pete", "span2_text": "He", "span1_index": 2, "span2_index": 3}}
    hub = {"text": "Mark told Pete he was late.", "label": 1, "span1_text": "Pete", "span2_text": "He"}
    expected = 'Mark told Pete he was late.\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\n'
    assert render_one("WSC", local).context == expected == render_one("WSC", hub).context
    assert render_one("WSC", local).gold == (1,)


def test_multirc_one_example_per_answer() -> None:
    record = {"idx": 3, "passage": {"text": "Sam went home.", "questions": [
        {"question": "Where did Sam go?", "idx": 0, "answers": [{"text": "home", "label": 1}, {"text": "school", "label": 0}]},
        {"question": "Who went?", "idx": 1, "answers": [{"text": "Sam", "label": 1}]},
    ]}}
    examples = get_task("MultiRC").render(record)
    assert len(examples) == 3
    assert examples[1].context == ('Sam went home.\nQuestion: Where did Sam go?\n'
                                   'I found this answer "school". Is that correct? Yes or No?\n')
    assert [e.gold for e in examples] == [(1,), (0,), (1,)]
    assert examples[0].group == examples[1].group != examples[2].group
    hub = render_one("MultiRC", {"paragraph": "Sam went home.", "question": "Where did Sam go?", "answer": "school",
                                 "label": 0, "idx": {"paragraph": 3, "question": 0, "answer": 1}})
    assert hub.context == examples[1].context


def test_copa_connectors_and_capitalisation() -> None:
    effect = render_one("COPA", {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
                                 "choice2": "Water flowed.", "question": "effect", "label": 1})
    assert full_texts(effect) == ["The man turned on the faucet so the toilet filled.",
                                  "The man turned on the faucet so water flowed."]
    cause = render_one("COPA", {"premise": "I was tired.", "choice1": "I ran.", "choice2": "She sang.",
                                "question": "cause", "label": 0})
    assert full_texts(cause) == ["I was tired because I ran.", "I was tired because she sang."]
    assert cause.gold == (0,) and get_task("COPA").objective == "lm"


def test_record_local_entities_and_gold_set() -> None:
    text = "Ann met Bob.\n@highlight\nBob smiled"
    record = {"passage": {"text": text, "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10},
                                                     {"start": 24, "end": 26}]},
              "qas": [{"query": "@placeholder was happy.", "answers": [{"text": "Bob"}]}]}
    example = render_one("ReCoRD", record)
    assert example.context == "Ann met Bob.\n- Bob smiled\n-"
    assert example.candidates == (" Ann was happy.", " Bob was happy.")  # duplicate "Bob" spans merged
    assert example.gold == (1,)
    hub = render_one("ReCoRD", {"passage": text, "query": "@placeholder was happy.", "entities": ["Ann", "Bob"],
                                "answers": ["Bob"]})
    assert hub == example


def test_squad_and_drop_generation_prompts() -> None:
    squad = render_one("SQuAD", {"title": "Paris", "context": "Paris is the capital.", "question": " What is Paris? ",
                                 "answers": {"text": ["the capital", "capital"], "answer_start": [9, 13]}})
    assert squad.context == "Title: Paris\nContext: Paris is the capital.\nQuestion: What is Paris?\nAnswer:"
    assert squad.candidates == (" the capital\n",) and squad.answers == ("the capital", "capital")
    drop = render_one("DROP", {"passage": "He scored 3 goals.", "question": "How many goals?",
                               "answers_spans": {"spans": ["3"], "types": ["number"]}})
    assert drop.context == "Passage: He scored 3 goals.\nQuestion: How many goals?\nAnswer:"
    assert drop.gold_completion == " 3\n"


def test_demonstrations_are_seeded_and_prepended() -> None:
    pool = [render_one("SST-2", {"sentence": f"film {i}", "label": i % 2}) for i in range(6)]
    target = render_one("SST-2", {"sentence": "new film", "label": 1})
    first = add_demonstrations([target], pool, k=2, seed=1)[0]
    assert first == add_demonstrations([target], pool, k=2, seed=1)[0]
    shown = first.context.split("\n\n")
    assert len(shown) == 3 and shown[-1] == "new film It was"
    assert all(text.startswith("film ") and text.split(" It was ")[1] in ("great", "terrible") for text in shown[:2])
    with pytest.raises(ValueError, match="at least 7"):
        add_demonstrations([target], pool, k=7)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sampling_is_seeded_disjoint_and_proportional(tmp_path: Path) -> None:
    records = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "entailment"} for i in range(40)]
    write_jsonl(tmp_path / "superglue" / "RTE" / "train.jsonl", records[:12])
    write_jsonl(tmp_path / "superglue" / "RTE" / "val.jsonl", records[12:])
    spec = get_task("RTE")
    splits = sample_splits(spec, n_train=1000, n_dev=500, n_eval=10, seed=3, data_dir=tmp_path)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (8, 4, 10)  # 12 shared 2:1
    again = sample_splits(spec, n_train=1000, n_dev=500, n_eval=10, seed=3, data_dir=tmp_path)
    assert again == splits
    assert not {e.context for e in splits.train} & {e.context for e in splits.dev}
    assert all(e.context.startswith("p1") or e.context.startswith("p2") or e.context.startswith("p3")
               for e in splits.eval)  # records 12..39 only
    split_val = sample_splits(spec, n_train=5, n_dev=3, n_eval=10, seed=3, data_dir=tmp_path, split_validation=True)
    assert (len(split_val.train), len(split_val.dev), len(split_val.eval)) == (5, 3, 10)
    assert not {e.context for e in split_val.eval} & {e.context for e in split_val.train + split_val.dev}


def test_missing_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match=r"no eval data for task CB; tried: .*superglue/\]CB/val"):
        load_records(get_task("CB"), "eval", data_dir=tmp_path)


def test_hub_is_used_when_no_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str | None, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"passage": f"Passage {i}.", "question": "is it", "label": i % 2, "idx": i} for i in range(6)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = sample_splits(get_task("BoolQ"), n_train=3, n_dev=2, n_eval=4, seed=0, data_dir=tmp_path)
    assert calls == [("super_glue", "boolq", "validation"), ("super_glue", "boolq", "train")]
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (3, 2, 4)
    assert {e.gold for e in splits.eval} <= {(0,), (1,)} and splits.eval[0].candidates == ("No", "Yes")
