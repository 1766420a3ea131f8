"""GLUE tasks: their columns, labels and metrics, and loaders for the hub and for local TSV files.

Every loader returns a ``datasets.DatasetDict`` with the hub's column names (e.g. ``sentence``,
``premise``/``hypothesis``) plus an integer ``label`` (a float score for STS-B), a ``train`` split and the
task's evaluation splits (``validation``; MNLI: ``validation_matched`` and ``validation_mismatched``).

Local layouts understood by ``load_glue_local`` (``DATA_DIR/<task folder>/<split file>``):

- GLUE's own download (``glue_data/``): ``CoLA/`` (no header: source, label, notation, sentence),
  ``SST-2/``, ``MRPC/``, ``QQP/``, ``STS-B/``, ``MNLI/`` (``dev_matched.tsv``, ``dev_mismatched.tsv``),
  ``QNLI/``, ``RTE/``, each with ``train.tsv`` and ``dev.tsv`` and their original headers.
- Lower-case task folders with headed TSVs in any column order, e.g. ``sst2/{train,dev}.tsv``
  (``label<TAB>sentence``) and ``cola/{train,dev_out_of_domain}.tsv`` (``sentence<TAB>label``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data_errors import BadRows, read_text, strict

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task looks like: text columns, label vocabulary, metrics."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    main_metric: str
    glue_folder: str  # folder name in GLUE's own download
    label_names: tuple[str, ...] = ()  # string labels of the TSVs, in the hub's index order
    eval_splits: tuple[str, ...] = ("validation",)
    # Header names of each hub column across the local layouts (first match wins).
    column_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Candidate dev file names per eval split.
    dev_files: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_DEV = ("dev.tsv", "validation.tsv", "dev_in_domain.tsv", "dev_out_of_domain.tsv")
_LABEL_ALIASES = ("label", "gold_label", "Quality", "is_duplicate", "score")
_NLI_LABELS = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), 2, "matthews_correlation", "CoLA"),
        GlueTask("sst2", ("sentence",), 2, "accuracy", "SST-2"),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, "accuracy", "MRPC",
                 column_aliases={"sentence1": ("sentence1", "#1 String"),
                                 "sentence2": ("sentence2", "#2 String")}),
        GlueTask("qqp", ("question1", "question2"), 2, "accuracy", "QQP"),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, "pearson", "STS-B"),
        GlueTask("mnli", ("premise", "hypothesis"), 3, "matched_accuracy", "MNLI",
                 label_names=("entailment", "neutral", "contradiction"),
                 eval_splits=("validation_matched", "validation_mismatched"),
                 column_aliases={"premise": ("premise", "sentence1"),
                                 "hypothesis": ("hypothesis", "sentence2")},
                 dev_files={"validation_matched": ("dev_matched.tsv", "validation_matched.tsv"),
                            "validation_mismatched": ("dev_mismatched.tsv", "validation_mismatched.tsv")}),
        GlueTask("qnli", ("question", "sentence"), 2, "accuracy", "QNLI", label_names=_NLI_LABELS),
        GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy", "RTE", label_names=_NLI_LABELS),
    )
}


class GlueDataError(ValueError, RuntimeError):
    """GLUE data could not be found or read; the message says how to get it (a ValueError, as the library's other
    errors; also a RuntimeError for code written against earlier releases)."""


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def how_to_get_data(task: GlueTask) -> str:
    return (
        "How to get the data: (a) with a network, let `datasets` download it once "
        f"(python -c \"import datasets; datasets.load_dataset('{HUB_ID}', '{task.name}')\"), it is cached "
        "afterwards; or (b) download GLUE's TSV files (e.g. with the `download_glue_data.py` script of the "
        f"GLUE baselines, giving glue_data/{task.glue_folder}/train.tsv and dev.tsv) and pass "
        "`--data-dir glue_data` (or set STRUCTLORA_DATA)."
    )


# ----------------------------------------------------------------------------------------------- hub
def load_glue_hub(task: GlueTask) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(HUB_ID, task.name)
    except Exception as error:  # no network, no cache, hub down: all the same to the user
        raise GlueDataError(
            f"Could not load GLUE task '{task.name}' from the hub id '{HUB_ID}' "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}) and no --data-dir "
            f"was given. {how_to_get_data(task)}"
        ) from error
    return datasets.DatasetDict({split: loaded[split] for split in ("train", *task.eval_splits)})


# --------------------------------------------------------------------------------------------- local
def find_task_folder(data_dir: Path, task: GlueTask) -> Path | None:
    candidates = {task.name, task.glue_folder, task.glue_folder.lower(), task.name.upper(),
                  task.glue_folder.replace("-", ""), task.glue_folder.replace("-", "").lower()}
    for name in sorted(candidates):
        if (data_dir / name).is_dir():
            return data_dir / name
    # data_dir may already be the task folder itself
    if (data_dir / "train.tsv").is_file() and data_dir.name.lower().replace("-", "") == task.name:
        return data_dir
    return None


def _split_files(folder: Path, task: GlueTask) -> dict[str, Path]:
    files: dict[str, Path] = {}
    wanted = {"train": ("train.tsv",), **{s: task.dev_files.get(s, _DEV) for s in task.eval_splits}}
    for split, names in wanted.items():
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is None:
            raise GlueDataError(
                f"GLUE task '{task.name}': none of {', '.join(names)} in {folder}. {how_to_get_data(task)}"
            )
        files[split] = found
    return files


def _read_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-empty row. A UTF-8 byte-order mark is dropped."""
    # GLUE's TSVs hold unbalanced quotes (MNLI, SST-2): never treat quotes as quoting.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with io.StringIO(read_text(path, "utf-8-sig", newline=""), newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as error:
        raise GlueDataError(f"{path}: not UTF-8 text ({error})") from None


# A gold label of "-" marks an example the annotators did not agree on (MNLI): unlabelled, not malformed.
_NO_GOLD_LABEL = "-"


def _parse_label(task: GlueTask, raw: str) -> int | float:
    """The label as the hub stores it; ValueError (with what is valid) for anything else."""
    raw = raw.strip()
    if task.is_regression:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(f"label {raw!r} is not a finite number")
        return value
    if raw in task.label_names:
        return task.label_names.index(raw)
    valid = f"0..{task.num_labels - 1}" + (f" or {', '.join(task.label_names)}" if task.label_names else "")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"label {raw!r} is not one of {valid}") from None
    if not value.is_integer() or not 0 <= value < task.num_labels:
        raise ValueError(f"label {raw!r} is not one of {valid}")
    return int(value)


def read_task_file(path: Path, task: GlueTask, bad_rows: BadRows | None = None) -> dict[str, list[Any]]:
    """Columns (hub names + ``label``) of one local TSV file of ``task``. A row with too few columns or an invalid
    label is a DataRowError naming ``file:line`` (``bad_rows`` with ``skip=True``: skipped and counted); rows whose
    gold label is ``-`` (MultiNLI's "no annotator consensus") are skipped and reported."""
    bad_rows = strict(bad_rows)
    rows = _read_tsv(path)
    if not rows:
        raise GlueDataError(f"{path} is empty")
    header = [cell.strip() for cell in rows[0][1]]
    aliases = {column: task.column_aliases.get(column, (column,)) for column in task.text_columns}
    aliases["label"] = _LABEL_ALIASES
    positions: dict[str, int] = {}
    for column, names in aliases.items():
        index = next((header.index(n) for n in names if n in header), None)
        if index is not None:
            positions[column] = index
    body = rows[1:]
    if len(positions) < len(aliases):
        if task.name == "cola" and len(header) == 4:
            # GLUE's CoLA files have no header: source, label, original-label mark, sentence.
            positions, body = {"label": 1, "sentence": 3}, rows
        else:
            missing = sorted(set(aliases) - set(positions))
            raise GlueDataError(
                f"{path}: cannot find column(s) {', '.join(missing)} of task '{task.name}' in header "
                f"{header}. Expected GLUE's TSV layout or a header naming {', '.join(aliases)}."
            )
    columns: dict[str, list[Any]] = {column: [] for column in (*task.text_columns, "label")}
    width = max(positions.values()) + 1
    unlabelled: list[int] = []
    for line, row in body:
        if len(row) < width:
            bad_rows.report(path, line, f"{len(row)} tab-separated column(s), task '{task.name}' needs at least "
                                        f"{width} here")
            continue
        raw = row[positions["label"]]
        if raw.strip() == _NO_GOLD_LABEL:
            unlabelled.append(line)
            continue
        try:
            label = _parse_label(task, raw)
        except ValueError as error:
            bad_rows.report(path, line, f"{error} (task '{task.name}')")
            continue
        for column in task.text_columns:
            columns[column].append(row[positions[column]])
        columns["label"].append(label)
    if unlabelled:
        print(f"note: {path}: skipped {len(unlabelled)} row(s) without a gold label ('-'), first at line "
              f"{unlabelled[0]}", file=sys.stderr)
    return columns


def load_glue_local(data_dir: str | os.PathLike, task_name: str, bad_rows: BadRows | None = None) -> Any:
    """Read ``task_name`` from local files under ``data_dir`` (see the module docstring for layouts); bad rows
    are errors unless ``bad_rows`` skips them (see :mod:`structlora.tasks.data_errors`)."""
    import datasets

    task = get_task(task_name)
    root = Path(data_dir)
    folder = find_task_folder(root, task)
    if folder is None:
        raise GlueDataError(
            f"GLUE task '{task.name}': no folder '{task.name}' or '{task.glue_folder}' under {root}. "
            f"{how_to_get_data(task)}"
        )
    label_feature = (datasets.Value("float32") if task.is_regression
                     else datasets.ClassLabel(names=list(task.label_names) or [str(i) for i in range(task.num_labels)]))
    features = datasets.Features({**{c: datasets.Value("string") for c in task.text_columns}, "label": label_feature})
    splits = {}
    for split, path in _split_files(folder, task).items():
        columns = read_task_file(path, task, bad_rows)
        if not columns["label"]:
            raise GlueDataError(f"{path}: no labelled rows")
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def load_glue(task_name: str, data_dir: str | os.PathLike | None = None, bad_rows: BadRows | None = None) -> Any:
    """Local files when ``data_dir`` is given, else the hub (``nyu-mll/glue``)."""
    task = get_task(task_name)
    if data_dir:
        if not Path(data_dir).is_dir():
            raise GlueDataError(f"--data-dir {data_dir} does not exist. {how_to_get_data(task)}")
        return load_glue_local(data_dir, task.name, bad_rows)
    return load_glue_hub(task)


def tokenize_split(dataset: Any, tokenizer: Any, text_columns: tuple[str, ...], max_length: int,
                   sort_by_length: bool = False) -> Any:
    """``dataset`` tokenized for a classifier (``text_columns`` as one input or a pair, ``label`` -> ``labels``)."""
    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    # keep_in_memory: no cache files, so torchrun ranks never race on writing them.
    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, keep_in_memory=True)
    if sort_by_length:
        # Evaluation metrics do not depend on the order; batches of similar lengths pad (and cost) less.
        lengths = [len(ids) for ids in encoded["input_ids"]]
        encoded = encoded.select(sorted(range(len(lengths)), key=lengths.__getitem__), keep_in_memory=True)
    return encoded


def take_examples(dataset: Any, limit: int | None, shuffle_seed: int | None) -> Any:
    """The first ``limit`` examples (all when ``limit`` is unset or larger), after a seeded shuffle when
    ``shuffle_seed`` is given."""
    if not limit or limit >= len(dataset):
        return dataset
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed, keep_in_memory=True)
    return dataset.select(range(limit))
