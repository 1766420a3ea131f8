"""Task definitions and prompt templates for the LoRETTA / MeZO large-model experiments.

Every task turns one raw record (either the Hugging Face hub layout or the local SuperGLUE
jsonl layout) into one or more `PromptedExample`s: a context, the candidate completions and
the gold candidates.  Completions carry their own leading separator (" great", "\nYes") so that
`context + completion` is exactly the text the language model reads, as in MeZO's templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

TaskFamily = Literal["classification", "multiple_choice", "generation"]
# "candidates": cross-entropy over the candidates' mean log-likelihoods (MeZO's
# --train_as_classification); "lm": language-model loss on the gold completion only.
TrainObjective = Literal["candidates", "lm"]


@dataclass(frozen=True)
class PromptedExample:
    """One scored or generated item: `context` followed by one of `candidates`."""

    context: str
    candidates: tuple[str, ...]
    gold: tuple[int, ...]  # indices into candidates; several for ReCoRD (duplicate entity spellings)
    answers: tuple[str, ...] = ()  # generation tasks: every accepted answer string
    group: str = ""  # MultiRC: the question an answer option belongs to (kept for reporting)

    @property
    def gold_completion(self) -> str:
        return self.candidates[self.gold[0]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: TaskFamily
    objective: TrainObjective
    render: Callable[[Mapping[str, Any]], list[PromptedExample]]
    hub_path: str  # `datasets.load_dataset` path
    hub_name: str | None
    hub_splits: tuple[str, str]  # (train, evaluation)
    local_dir: str  # folder under the data directory
    local_splits: tuple[str, str] = ("train", "val")
    aliases: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- label helpers


def _label_index(value: Any, names: Sequence[str]) -> int:
    """Map a label given as an int, a bool or a class name to its index in `names`."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ValueError(f"label {value} outside 0..{len(names) - 1}")
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return int(lowered == "true")
        if lowered.isdigit():
            return _label_index(int(lowered), names)
        if lowered in names:
            return list(names).index(lowered)
    raise ValueError(f"label {value!r} is not one of 0..{len(names) - 1}"
                     + ("" if tuple(names) == tuple(str(i) for i in range(len(names))) else f", {', '.join(names)}"))


def _binary(context: str, label: Any, verbalizer: tuple[str, ...], separator: str = "") -> PromptedExample:
    gold = _label_index(label, tuple(str(i) for i in range(len(verbalizer))))
    return PromptedExample(context, tuple(separator + word for word in verbalizer), (gold,))


# ---------------------------------------------------------------- templates (MeZO style)


def render_sst2(record: Mapping[str, Any]) -> list[PromptedExample]:
    # MeZO SST2Template: "{sentence} It was great|terrible", label 1 = positive.
    sentence = str(record["sentence"]).strip()
    return [_binary(f"{sentence} It was", record["label"], ("terrible", "great"), " ")]


def render_rte(record: Mapping[str, Any]) -> list[PromptedExample]:
    context = f'{record["premise"]}\nDoes this mean that "{record["hypothesis"]}" is true? Yes or No?\n'
    gold = _label_index(record["label"], ("entailment", "not_entailment"))
    return [PromptedExample(context, ("Yes", "No"), (gold,))]


def render_cb(record: Mapping[str, Any]) -> list[PromptedExample]:
    context = f'Suppose {record["premise"]} Can we infer that "{record["hypothesis"]}"? Yes, No, or Maybe?\n'
    gold = _label_index(record["label"], ("entailment", "contradiction", "neutral"))
    return [PromptedExample(context, ("Yes", "No", "Maybe"), (gold,))]


def render_boolq(record: Mapping[str, Any]) -> list[PromptedExample]:
    # MeZO/LoRETTA BoolQTemplateV3: "?" only when missing, the question's first letter capitalised.
    question = record["question"] if record["question"].endswith("?") else record["question"] + "?"
    context = f'{record["passage"]} {question[:1].upper()}{question[1:]}\n'
    return [_binary(context, record["label"], ("No", "Yes"))]


def render_wic(record: Mapping[str, Any]) -> list[PromptedExample]:
    context = (
        f'Does the word "{record["word"]}" have the same meaning in these two sentences? Yes, No?\n'
        f'{record["sentence1"]}\n{record["sentence2"]}\n'
    )
    return [_binary(context, record["label"], ("No", "Yes"))]


def render_wsc(record: Mapping[str, Any]) -> list[PromptedExample]:
    target = record.get("target", record)  # local jsonl nests the spans under "target"
    pronoun = str(target["span2_text"]).lower()
    context = (
        f'{record["text"]}\nIn the previous sentence, does the pronoun "{pronoun}" refer to '
        f'{target["span1_text"]}? Yes or No?\n'
    )
    return [_binary(context, record["label"], ("No", "Yes"))]


def _multirc_example(paragraph: str, question: str, answer: str, label: Any, group: str) -> PromptedExample:
    context = f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'
    example = _binary(context, label, ("No", "Yes"))
    return PromptedExample(example.context, example.candidates, example.gold, group=group)


def render_multirc(record: Mapping[str, Any]) -> list[PromptedExample]:
    """One example per answer option (MultiRC accuracy is per option)."""
    if "paragraph" in record:  # hub layout: already one row per answer option
        idx = record.get("idx", {})
        group = f'{idx.get("paragraph", "")}-{idx.get("question", "")}' if isinstance(idx, Mapping) else ""
        return [_multirc_example(record["paragraph"], record["question"], record["answer"], record["label"], group)]
    passage = record["passage"]
    examples = []
    for question in passage["questions"]:
        group = f'{record.get("idx", "")}-{question.get("idx", "")}'
        for answer in question["answers"]:
            examples.append(_multirc_example(passage["text"], question["question"], answer["text"], answer["label"], group))
    return examples


def _copa_lowercase_first(choice: str) -> str:
    # MeZO CopaTemplate(capitalization="correct"): lower-case the first word unless it is "I".
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def render_copa(record: Mapping[str, Any]) -> list[PromptedExample]:
    premise = str(record["premise"]).rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    connector = {"cause": "because", "effect": "so"}[record["question"]]
    choices = (" " + _copa_lowercase_first(record["choice1"]), " " + _copa_lowercase_first(record["choice2"]))
    return [PromptedExample(f"{premise} {connector}", choices, (_label_index(record["label"], ("0", "1")),))]


def _record_passage(text: str) -> str:
    return text.replace("@highlight\n", "- ")


def _record_examples(passage: str, query: str, entities: Sequence[str], answers: Sequence[str]) -> PromptedExample:
    # MeZO ReCoRDTemplateGPT3: "{passage}\n-" then " {query with @placeholder filled}".
    unique_entities = list(dict.fromkeys(entities))
    candidates = tuple(" " + query.replace("@placeholder", entity) for entity in unique_entities)
    accepted = set(answers)
    gold = tuple(i for i, entity in enumerate(unique_entities) if entity in accepted)
    if not gold:
        raise ValueError("ReCoRD record whose answers are not among its entities")
    return PromptedExample(f"{_record_passage(passage)}\n-", candidates, gold, answers=tuple(answers))


def render_record(record: Mapping[str, Any]) -> list[PromptedExample]:
    if "query" in record:  # hub layout
        return [_record_examples(record["passage"], record["query"], record["entities"], record["answers"])]
    text = record["passage"]["text"]
    entities = [text[span["start"] : span["end"] + 1] for span in record["passage"]["entities"]]
    return [
        _record_examples(text, qa["query"], entities, [answer["text"] for answer in qa.get("answers", [])])
        for qa in record["qas"]
    ]


def _generation_example(context: str, answers: Sequence[str]) -> PromptedExample:
    answers = tuple(a.strip() for a in answers if a and a.strip())
    if not answers:
        raise ValueError("generation record without an answer")
    # Training completion ends with a newline so the model learns where to stop.
    return PromptedExample(context, (f" {answers[0]}\n",), (0,), answers=answers)


def render_squad(record: Mapping[str, Any]) -> list[PromptedExample]:
    answers = record["answers"]["text"] if isinstance(record["answers"], Mapping) else record["answers"]
    context = (
        f'Title: {record.get("title", "")}\nContext: {record["context"]}\n'
        f'Question: {str(record["question"]).strip()}\nAnswer:'
    )
    return [_generation_example(context, list(answers))]


def render_drop(record: Mapping[str, Any]) -> list[PromptedExample]:
    spans = record["answers_spans"]["spans"] if "answers_spans" in record else record["answers"]
    context = f'Passage: {record["passage"]}\nQuestion: {str(record["question"]).strip()}\nAnswer:'
    return [_generation_example(context, list(spans))]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("SST-2", "classification", "candidates", render_sst2, "glue", "sst2", ("train", "validation"),
                 "sst2", ("train", "dev"), aliases=("sst2",)),
        TaskSpec("RTE", "classification", "candidates", render_rte, "super_glue", "rte", ("train", "validation"), "RTE"),
        TaskSpec("CB", "classification", "candidates", render_cb, "super_glue", "cb", ("train", "validation"), "CB"),
        TaskSpec("BoolQ", "classification", "candidates", render_boolq, "super_glue", "boolq", ("train", "validation"), "BoolQ"),
        TaskSpec("WSC", "classification", "candidates", render_wsc, "super_glue", "wsc.fixed", ("train", "validation"), "WSC"),
        TaskSpec("WiC", "classification", "candidates", render_wic, "super_glue", "wic", ("train", "validation"), "WiC"),
        TaskSpec("MultiRC", "classification", "candidates", render_multirc, "super_glue", "multirc", ("train", "validation"), "MultiRC"),
        TaskSpec("COPA", "multiple_choice", "lm", render_copa, "super_glue", "copa", ("train", "validation"), "COPA"),
        TaskSpec("ReCoRD", "multiple_choice", "lm", render_record, "super_glue", "record", ("train", "validation"), "ReCoRD"),
        TaskSpec("SQuAD", "generation", "lm", render_squad, "squad", None, ("train", "validation"), "squad",
                 ("train", "validation")),
        TaskSpec("DROP", "generation", "lm", render_drop, "drop", None, ("train", "validation"), "drop",
                 ("train", "validation")),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP = {_key(alias): spec for spec in TASKS.values() for alias in (spec.name, *spec.aliases)}


def get_task(name: str) -> TaskSpec:
    """Find a task by name, ignoring case and punctuation ("sst2", "SST-2", "boolq")."""
    try:
        return _LOOKUP[_key(name)]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


def with_demonstrations(example: PromptedExample, demonstrations: Sequence[PromptedExample],
                        separator: str = "\n\n") -> PromptedExample:
    """Prepend in-context demonstrations (each rendered with its gold completion)."""
    if not demonstrations:
        return example
    shown = separator.join((d.context + d.gold_completion).strip() for d in demonstrations)
    return PromptedExample(shown + separator + example.context, example.candidates, example.gold,
                           example.answers, example.group)
