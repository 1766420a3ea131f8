"""Loading and seeded sampling of the LLM task data.

Sources, in order: a local data directory (`--data-dir` or the `STRUCTLORA_DATA` variable) holding
`superglue/<Task>/{train,val}.jsonl` (or `<Task>/...`, `sst2/{train,dev}.tsv`, `squad/...jsonl`),
then the Hugging Face hub (`super_glue`, `squad`, `drop`, ...).  Nothing is ever copied into the repo.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data_dir import DATA_ENV, resolve_data_dir
from ..data_errors import BadRows, DataRowError, read_text, strict
from .tasks import PromptedExample, TaskSpec, with_demonstrations

_EXTENSIONS = (".jsonl", ".json", ".tsv")


class DataUnavailableError(ValueError, RuntimeError):
    """Neither a local copy nor the hub could provide a split (a ValueError, as the library's other errors; also a
    RuntimeError for code written against earlier releases)."""


@dataclass(frozen=True)
class TaskSplits:
    train: list[PromptedExample]
    dev: list[PromptedExample]
    eval: list[PromptedExample]


def local_candidates(spec: TaskSpec, data_dir: Path, split: str) -> list[Path]:
    """Every path where a local copy of `split` may live, most specific first."""
    folders = [data_dir / "superglue" / spec.local_dir, data_dir / spec.local_dir, data_dir]
    return [folder / f"{split}{ext}" for folder in folders for ext in _EXTENSIONS]


def read_records(path: Path, bad_rows: BadRows | None = None) -> list[dict[str, Any]]:
    """Read a jsonl (one object per line), a json list or a tab-separated file with a header."""
    return [record for _, record in read_located_records(path, bad_rows)]


def read_located_records(path: Path, bad_rows: BadRows | None = None) -> list[tuple[int | None, dict[str, Any]]]:
    """``(line, record)`` of every record of a jsonl / json list / tsv file (a UTF-8 BOM is dropped); a line
    that is not a JSON object, or a tsv row with too few columns, is a bad row (DataRowError by default)."""
    bad_rows = strict(bad_rows)
    if path.suffix == ".tsv":
        with io.StringIO(read_text(path, "utf-8-sig", newline=""), newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            located = []
            for row in reader:
                if None in row or None in row.values():
                    bad_rows.report(path, reader.line_num, f"not the {len(reader.fieldnames or [])} tab-separated "
                                                           f"columns of the header")
                    continue
                located.append((reader.line_num, dict(row)))
            return located
    text = read_text(path, "utf-8-sig")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(None, record) for record in json.loads(text)]
        except json.JSONDecodeError as error:
            raise DataRowError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    located = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            bad_rows.report(path, number, f"not a JSON object ({error.msg})")
            continue
        if not isinstance(record, dict):
            bad_rows.report(path, number, f"a JSON {type(record).__name__}, not an object")
            continue
        located.append((number, record))
    return located


def _load_hub(spec: TaskSpec, split: str, hub_path: str | None) -> list[dict[str, Any]]:
    import datasets  # optional: only users with a network reach this

    dataset = datasets.load_dataset(hub_path or spec.hub_path, spec.hub_name, split=split)
    return [dict(row) for row in dataset]


def load_records(spec: TaskSpec, role: str, data_dir: str | os.PathLike[str] | None = None,
                 hub_path: str | None = None) -> list[dict[str, Any]]:
    """Raw records of the `role` ("train" or "eval") split: local copy first, then the hub."""
    return [record for _, record in load_located_records(spec, role, data_dir, hub_path)]


def load_located_records(spec: TaskSpec, role: str, data_dir: str | os.PathLike[str] | None = None,
                         hub_path: str | None = None, bad_rows: BadRows | None = None
                         ) -> list[tuple[tuple[str, int | None], dict[str, Any]]]:
    """``((source, line), record)`` of the `role` split: the file and its line, or the hub split and row (line
    None), as :meth:`BadRows.report` takes them."""
    index = {"train": 0, "eval": 1}[role]
    local_split, hub_split = spec.local_splits[index], spec.hub_splits[index]
    root = resolve_data_dir(data_dir)
    tried: list[str] = []
    if root is not None:
        for path in local_candidates(spec, root, local_split):
            if path.is_file():
                return [((str(path), line), record) for line, record in read_located_records(path, bad_rows)]
        tried.append(f"{root}/[superglue/]{spec.local_dir}/{local_split}{{{','.join(_EXTENSIONS)}}}")
    try:
        hub_rows = _load_hub(spec, hub_split, hub_path)
        return [((f"hub {hub_path or spec.hub_path} {hub_split} row {i}", None), row)
                for i, row in enumerate(hub_rows)]
    except Exception as error:  # offline, unknown id, missing `datasets`: all mean "no data"
        hub_id = f"{hub_path or spec.hub_path}" + (f"/{spec.hub_name}" if spec.hub_name else "")
        tried.append(f"hub {hub_id} split {hub_split!r} ({type(error).__name__}: {error})")
    hint = f"pass --data-dir or set {DATA_ENV} to a folder with superglue/<Task>/{{train,val}}.jsonl"
    raise DataUnavailableError(
        f"no {role} data for task {spec.name}; tried: " + "; ".join(tried) + f". {hint}")


def render_all(spec: TaskSpec, records: Sequence[dict[str, Any]],
               locations: Sequence[tuple[str, int | None]] | None = None,
               bad_rows: BadRows | None = None) -> list[list[PromptedExample]]:
    """Render every record; a record may yield several examples (MultiRC options, ReCoRD queries). A record
    that cannot be rendered (a missing field, a label out of range or of the wrong type) is a DataRowError naming
    its ``file:line`` (``locations``: ``(source, line)`` per record), or skipped and counted by ``bad_rows``."""
    bad_rows = strict(bad_rows)
    rendered = []
    for index, record in enumerate(records):
        try:
            rendered.append(spec.render(record))
        except KeyError as error:
            reason = f"missing field {error} for task {spec.name}"
        except (ValueError, TypeError, AttributeError) as error:
            reason = f"{error} (task {spec.name})"
        else:
            continue
        source, line = locations[index] if locations is not None else (f"record {index}", None)
        bad_rows.report(source, line, reason)
    return rendered


def _render_split(spec: TaskSpec, role: str, data_dir: Any, hub_path: str | None,
                  bad_rows: BadRows | None) -> list[list[PromptedExample]]:
    located = load_located_records(spec, role, data_dir, hub_path, bad_rows)
    return render_all(spec, [record for _, record in located], [where for where, _ in located], bad_rows)


def _take(groups: Sequence[list[PromptedExample]], sizes: Sequence[int]) -> list[list[PromptedExample]]:
    """Fill buckets of `sizes` examples from whole groups in order, so a passage never straddles two
    buckets (MultiRC answer options of one question stay together); the last group may be cut."""
    buckets: list[list[PromptedExample]] = [[] for _ in sizes]
    bucket = 0
    for group in groups:
        while bucket < len(sizes) and len(buckets[bucket]) >= sizes[bucket]:
            bucket += 1
        if bucket == len(sizes):
            break
        buckets[bucket].extend(group[: sizes[bucket] - len(buckets[bucket])])
    return buckets


def _groups_used(groups: Sequence[list[PromptedExample]], n_examples: int) -> int:
    """How many leading groups `_take` touched to collect `n_examples` examples."""
    used = total = 0
    while total < n_examples and used < len(groups):
        total += len(groups[used])
        used += 1
    return used


def _shuffled(groups: list[list[PromptedExample]], seed: int) -> list[list[PromptedExample]]:
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    return [groups[i] for i in order]


def _fit_train_dev(available: int, n_train: int, n_dev: int) -> tuple[int, int]:
    """When fewer examples exist than asked for, share them between train and dev in the asked ratio
    (32 local training examples with 1000:500 give 21 train, 11 dev), so model selection still works."""
    if available >= n_train + n_dev or n_dev == 0:
        return n_train, n_dev
    dev = round(available * n_dev / (n_train + n_dev))
    return available - dev, dev


def _count(groups: Sequence[list[PromptedExample]]) -> int:
    return sum(len(group) for group in groups)


def sample_splits(spec: TaskSpec, n_train: int, n_dev: int, n_eval: int, seed: int = 0,
                  data_dir: str | os.PathLike[str] | None = None, split_validation: bool = False,
                  hub_path: str | None = None, bad_rows: BadRows | None = None) -> TaskSplits:
    """Seeded train / dev / eval samples.

    Default (the authors' protocol): train and dev are disjoint samples of the training split,
    eval a sample of the validation split.  `split_validation=True` (benchmarks on the local
    SuperGLUE copy, whose train split holds only 32 examples): the validation split is shuffled
    and cut into eval first, then train and dev.
    """
    eval_groups = _shuffled(_render_split(spec, "eval", data_dir, hub_path, bad_rows), seed)
    if split_validation:
        (evaluation,) = _take(eval_groups, (n_eval,))
        train_groups = eval_groups[_groups_used(eval_groups, len(evaluation)):]
    else:
        (evaluation,) = _take(eval_groups, (n_eval,))
        train_groups = _shuffled(_render_split(spec, "train", data_dir, hub_path, bad_rows), seed)
    train, dev = _take(train_groups, _fit_train_dev(_count(train_groups), n_train, n_dev))
    return TaskSplits(train=train, dev=dev, eval=evaluation)


def add_demonstrations(examples: Sequence[PromptedExample], pool: Sequence[PromptedExample], k: int,
                       seed: int = 0) -> list[PromptedExample]:
    """In-context learning: each example gets its own seeded draw of `k` demonstrations from `pool`."""
    if k <= 0:
        return list(examples)
    if len(pool) < k:
        raise ValueError(f"--icl {k} needs at least {k} training examples, found {len(pool)}")
    return [with_demonstrations(example, random.Random(seed * 100_003 + i).sample(list(pool), k))
            for i, example in enumerate(examples)]
