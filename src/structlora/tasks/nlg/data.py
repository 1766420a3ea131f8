"""E2E, WebNLG 2017 and DART readers, linearisation, held-out splits and reference files.

Every reader returns a list of :class:`NLGInput` — one per *unique* input, with all its references —
in file order. Training expands them to (input, reference) pairs; decoding uses one hypothesis per input.

Linearisation follows the LoRA / prefix-tuning data the MTLoRA paper reuses:
* E2E:  ``name : Alimentum | Type : pub | price : £20-25 | family friendly : no`` (attribute names as in
  the LoRA ``valid.txt`` files: eatType -> Type, priceRange -> price, familyFriendly -> family friendly).
* WebNLG / DART: ``subject : predicate : object | subject : predicate : object`` (DART predicates
  lower-cased, WebNLG kept as in the modified triples).

Data never lives in the repository: pass a folder, or set ``STRUCTLORA_DATA``; the default is
``../shared/data`` next to the repository when it exists.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import random
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..data_dir import DATA_ENV, resolve_data_dir
from ..data_errors import BadRows, DataRowError, read_text, strict

DATASETS: tuple[str, ...] = ("e2e", "webnlg", "dart")
# dev-train / dev-heldout: the dev set split by unique input (the official test sets are held back).
SPLITS: tuple[str, ...] = ("train", "dev", "test", "dev-train", "dev-heldout")
# The 10 WebNLG 2017 categories of the training data; test inputs of other categories are "unseen".
WEBNLG_SEEN_CATEGORIES: frozenset[str] = frozenset({
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam",
    "University", "WrittenWork",
})
E2E_ATTRIBUTE_NAMES: dict[str, str] = {
    "eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly",
    "customer rating": "customer rating",
}
# Hub ids for users with a network (the loaders map their fields onto NLGInput).
HUB_IDS: dict[str, tuple[str, str | None]] = {
    "e2e": ("e2e_nlg", None),
    "webnlg": ("web_nlg", "webnlg_challenge_2017"),
    "dart": ("dart", None),
}


@dataclass(frozen=True)
class NLGInput:
    """One unique input (linearised data) with every reference text written for it."""

    source: str
    references: tuple[str, ...]
    category: str | None = None  # WebNLG category
    seen: bool | None = None  # WebNLG: category among the 10 training categories

    def to_json(self) -> dict:
        return {"source": self.source, "references": list(self.references), "category": self.category,
                "seen": self.seen}


@dataclass
class _Grouper:
    """Collects (source, reference) rows into NLGInputs, keeping first-appearance order."""

    order: list[str] = field(default_factory=list)
    refs: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, tuple[str | None, bool | None]] = field(default_factory=dict)

    def add(self, source: str, reference: str | None, category: str | None = None,
            seen: bool | None = None) -> None:
        if source not in self.refs:
            self.order.append(source)
            self.refs[source] = []
            self.meta[source] = (category, seen)
        if reference is not None and reference.strip():
            self.refs[source].append(reference.strip())

    def inputs(self) -> list[NLGInput]:
        return [NLGInput(s, tuple(self.refs[s]), *self.meta[s]) for s in self.order]


# ------------------------------------------------------------------------------------ linearising
def linearize_triples(triples: Iterable[Sequence[str]]) -> str:
    """``[(s, p, o), ...]`` -> ``"s : p : o | s : p : o"``."""
    return " | ".join(f"{s.strip()} : {p.strip()} : {o.strip()}" for s, p, o in triples)


_E2E_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*(?:,|$)")


def linearize_e2e_mr(mr: str) -> str:
    """``name[Alimentum], eatType[pub]`` -> ``name : Alimentum | Type : pub``."""
    slots = _E2E_SLOT.findall(mr)
    if not slots:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{E2E_ATTRIBUTE_NAMES.get(k, k)} : {v.strip()}" for k, v in slots)


# ------------------------------------------------------------------------------------------- E2E
# Bad rows (a malformed MR, a missing reference, a broken triple) are a DataRowError naming file:line, or skipped
# and counted when the caller passes BadRows(skip=True) (the recipes' --skip-bad-rows).
def read_e2e_csv(path: str | os.PathLike, bad_rows: BadRows | None = None) -> list[NLGInput]:
    """The official E2E CSV (header ``mr,ref``; a test file may have ``mr`` only). A UTF-8 BOM is dropped."""
    bad_rows = strict(bad_rows)
    grouper = _Grouper()
    with io.StringIO(read_text(path, "utf-8-sig", newline=""), newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "mr" not in reader.fieldnames:
            raise DataRowError(f"{path}:1: expected a header with an 'mr' column, got {reader.fieldnames}")
        has_ref = "ref" in reader.fieldnames
        for row in reader:
            line = reader.line_num
            if None in row or None in row.values():
                bad_rows.report(path, line, f"{len(reader.fieldnames) + len(row.get(None) or [])} comma-separated "
                                            f"fields where the header has {len(reader.fieldnames)} (an unquoted "
                                            f"comma?)" if None in row else "fewer fields than the header")
                continue
            # The official scripts repair these mis-encoded pound/e-acute signs in some releases.
            ref = (row.get("ref") or "").replace("Â£", "£").replace("Ã©", "é")
            if has_ref and not ref.strip():
                bad_rows.report(path, line, "empty 'ref' (every row of a file with a ref column needs a reference)")
                continue
            try:
                source = linearize_e2e_mr(row["mr"].replace("Â£", "£"))
            except ValueError as error:
                bad_rows.report(path, line, str(error))
                continue
            grouper.add(source, ref)
    return grouper.inputs()


def read_e2e_lines(path: str | os.PathLike, bad_rows: BadRows | None = None) -> list[NLGInput]:
    """The LoRA / prefix-tuning line format ``linearised mr || reference`` (one pair per line)."""
    bad_rows = strict(bad_rows)
    grouper = _Grouper()
    with io.StringIO(read_text(path, "utf-8-sig")) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "||" not in line:
                bad_rows.report(path, number, "expected 'linearised mr || reference'")
                continue
            source, reference = line.split("||", 1)
            if not source.strip() or not reference.strip():
                bad_rows.report(path, number, f"empty {'mr' if not source.strip() else 'reference'} around '||'")
                continue
            grouper.add(source.strip(), reference)
    return grouper.inputs()


# ---------------------------------------------------------------------------------------- WebNLG
def _entry_line(path: str | os.PathLike, entry: ElementTree.Element) -> int | None:
    """The line of ``<entry eid=...>`` in ``path`` (ElementTree keeps no positions; only read on an error)."""
    eid = entry.get("eid")
    if eid is None:
        return None
    text = read_text(path, "utf-8-sig")
    position = text.find(f'eid="{eid}"')
    return text.count("\n", 0, position) + 1 if position >= 0 else None


def read_webnlg_xml(paths: Iterable[str | os.PathLike], good_only: bool = True,
                    bad_rows: BadRows | None = None) -> list[NLGInput]:
    """WebNLG 2017 challenge XML files (``<entry category=..><modifiedtripleset><mtriple>s | p | o``
    and ``<lex comment="good">text``). Lexicalisations marked other than "good" are skipped by default,
    as the LoRA converter does. An entry with a malformed or no triple is a bad row (file:line of the entry)."""
    bad_rows = strict(bad_rows)
    grouper = _Grouper()
    for path in paths:
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            raise DataRowError(f"{path}:{error.position[0]}: not well-formed XML ({error})") from None
        for entry in root.iter("entry"):
            category = entry.get("category")
            mtriples = [mtriple.text or "" for mtriple in entry.iter("mtriple")]
            triples = [[part.strip() for part in text.split(" | ")] for text in mtriples]
            malformed = next((text for text, parts in zip(mtriples, triples) if len(parts) != 3), None)
            if malformed is not None or not triples:
                reason = (f"malformed triple {malformed!r} (expected 'subject | predicate | object')"
                          if malformed is not None else "no <mtriple>")
                bad_rows.report(path, _entry_line(path, entry), f"entry {entry.get('eid')}: {reason}")
                continue
            source = linearize_triples(triples)
            seen = category in WEBNLG_SEEN_CATEGORIES if category else None
            grouper.add(source, None, category, seen)
            for lex in entry.iter("lex"):
                comment = lex.get("comment", "good")
                if good_only and comment not in ("good", ""):
                    continue
                grouper.add(source, "".join(lex.itertext()), category, seen)
    return grouper.inputs()


def webnlg_xml_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.xml`` under ``folder`` (the ``1triples`` … ``7triples`` sub-folders), sorted by
    triple count then name so the order is stable."""
    def key(path: Path) -> tuple[int, str]:
        match = re.match(r"(\d+)triple", path.parent.name)
        return (int(match.group(1)) if match else 0, str(path))

    files = sorted(Path(folder).rglob("*.xml"), key=key)
    if not files:
        raise FileNotFoundError(f"no WebNLG *.xml files under {folder}")
    return files


# ------------------------------------------------------------------------------------------ DART
def _json_array_line(text: str, index: int) -> int | None:
    """The line where element ``index`` of the top-level JSON array in ``text`` starts (only read on an error)."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    for current in range(index + 1):
        while text[position] in " \t\r\n,":
            position += 1
        if current == index:
            return text.count("\n", 0, position) + 1
        position = decoder.raw_decode(text, position)[1]
    return None


def _dart_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    triples = record.get("tripleset")
    if not isinstance(triples, list) or not triples:
        return "no 'tripleset' list"
    for triple in triples:
        if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
            return f"triple {triple!r} is not [subject, predicate, object] strings"
    annotations = record.get("annotations", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) and isinstance(a.get("text", ""), str)
                                                    for a in annotations):
        return "'annotations' is not a list of {\"text\": string} objects"
    return None


def read_dart_json(path: str | os.PathLike, bad_rows: BadRows | None = None) -> list[NLGInput]:
    """DART v1.1.1 JSON (a list of ``{"tripleset": [[s, p, o]...], "annotations": [{"text"}...]}``);
    predicates lower-cased as in the LoRA converter. A UTF-8 BOM is dropped; a malformed record is a bad row."""
    bad_rows = strict(bad_rows)
    with io.StringIO(read_text(path, "utf-8-sig")) as handle:
        text = handle.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataRowError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise DataRowError(f"{path}:1: expected a JSON list of DART records, got a {type(records).__name__}")
    grouper = _Grouper()
    for index, record in enumerate(records):
        problem = _dart_problem(record)
        if problem:
            bad_rows.report(path, _json_array_line(text, index), f"record {index}: {problem}")
            continue
        source = linearize_triples((s, p.lower(), o) for s, p, o in record["tripleset"])
        grouper.add(source, None)
        for annotation in record.get("annotations", []):
            grouper.add(source, annotation.get("text", ""))
    return grouper.inputs()


# ----------------------------------------------------------------------------------- locating data
def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def load_split(dataset: str, split: str, data_root: str | os.PathLike | None = None,
               heldout_fraction: float = 0.1, heldout_seed: int = 0,
               source: str = "auto", bad_rows: BadRows | None = None) -> list[NLGInput]:
    """Inputs of ``dataset`` / ``split`` from the official files under ``data_root`` (or the Hub when
    ``source="hub"``). ``dev-train`` / ``dev-heldout`` split the dev set by unique input. A bad row is a
    DataRowError naming file:line unless ``bad_rows`` skips (and counts) it."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if split in ("dev-train", "dev-heldout"):
        train_part, heldout_part = split_by_input(
            load_split(dataset, "dev", data_root, source=source, bad_rows=bad_rows), heldout_fraction, heldout_seed)
        return train_part if split == "dev-train" else heldout_part
    if source == "hub":
        return load_from_hub(dataset, split)
    return _split_reader(dataset, split, data_root)(bad_rows)


def has_split_files(dataset: str, split: str, data_root: str | os.PathLike | None = None) -> bool:
    """Whether the official files of ``dataset`` / ``split`` (train, dev or test) are under ``data_root``: what
    :func:`load_split` would read, found without reading it."""
    try:
        _split_reader(dataset, split, data_root)
    except FileNotFoundError:
        return False
    return True


def _split_reader(dataset: str, split: str, data_root: str | os.PathLike | None
                  ) -> Callable[[BadRows | None], list[NLGInput]]:
    """The reader of the local files of ``dataset`` / ``split`` (train, dev or test); FileNotFoundError naming
    what was looked for when there are none."""
    root = Path(data_root) if data_root else (resolve_data_dir(None) or Path("data"))  # the data rule
    if dataset == "e2e":
        folder = root / "e2e"
        official = {"train": ["trainset.csv"], "dev": ["devset.csv"],
                    "test": ["testset_w_refs.csv", "testset.csv"]}[split]
        lines = {"train": ["train.txt"], "dev": ["valid.txt", "dev.txt"], "test": ["test.txt"]}[split]
        path = _first_existing(folder, official)
        if path is not None:
            return functools.partial(read_e2e_csv, path)
        path = _first_existing(folder, lines)
        if path is not None:
            return functools.partial(read_e2e_lines, path)
        raise FileNotFoundError(f"E2E {split}: none of {official + lines} in {folder} "
                                f"(set --data-dir or ${DATA_ENV})")
    if dataset == "webnlg":
        folder = _first_existing(root, ["webnlg2017", "webnlg"])
        if folder is None:
            raise FileNotFoundError(f"no webnlg2017/ folder in {root} (set --data-dir or ${DATA_ENV})")
        split_folder = folder / split
        if not split_folder.is_dir():
            raise FileNotFoundError(f"WebNLG {split}: {split_folder} does not exist")
        files = webnlg_xml_files(split_folder)
        return lambda bad_rows: read_webnlg_xml(files, bad_rows=bad_rows)
    folder = root / "dart"
    path = _first_existing(folder, [f"dart-v1.1.1-full-{split}.json"])
    if path is None:
        raise FileNotFoundError(f"DART {split}: dart-v1.1.1-full-{split}.json not in {folder}")
    return functools.partial(read_dart_json, path)


def split_by_input(inputs: Sequence[NLGInput], heldout_fraction: float = 0.1,
                   seed: int = 0) -> tuple[list[NLGInput], list[NLGInput]]:
    """Seeded split of unique inputs (so no MR is in both parts); both parts keep file order."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in (0, 1)")
    indices = list(range(len(inputs)))
    random.Random(seed).shuffle(indices)
    heldout_count = max(1, round(len(inputs) * heldout_fraction))
    heldout = set(indices[:heldout_count])
    return ([x for i, x in enumerate(inputs) if i not in heldout],
            [x for i, x in enumerate(inputs) if i in heldout])


def load_from_hub(dataset: str, split: str) -> list[NLGInput]:
    """The same data from the Hugging Face Hub (needs a network; field names of the public datasets)."""
    from datasets import load_dataset

    hub_id, config = HUB_IDS[dataset]
    hub_split = {"dev": "validation"}.get(split, split)
    rows = load_dataset(hub_id, config, split=hub_split)
    grouper = _Grouper()
    for row in rows:
        if dataset == "e2e":
            grouper.add(linearize_e2e_mr(row["meaning_representation"]), row["human_reference"])
        elif dataset == "webnlg":
            triples = [t.split(" | ") for t in row["modified_triple_sets"]["mtriple_set"][0]]
            category = row["category"]
            source = linearize_triples(triples)
            seen = category in WEBNLG_SEEN_CATEGORIES
            grouper.add(source, None, category, seen)
            for text, comment in zip(row["lex"]["text"], row["lex"]["comment"]):
                if comment in ("good", ""):
                    grouper.add(source, text, category, seen)
        else:
            source = linearize_triples((s, p.lower(), o) for s, p, o in row["tripleset"])
            grouper.add(source, None)
            for text in row["annotations"]["text"]:
                grouper.add(source, text)
    return grouper.inputs()


def training_pairs(inputs: Iterable[NLGInput]) -> list[tuple[str, str]]:
    """(source, reference) pairs: one training example per reference."""
    return [(x.source, ref) for x in inputs for ref in x.references]


# ------------------------------------------------------------------------------ reference files
def write_e2e_references(inputs: Sequence[NLGInput], path: str | os.PathLike) -> None:
    """e2e-metrics layout: the references of one input on consecutive lines, a blank line between
    inputs."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join("\n".join(_one_line(r) for r in x.references) for x in inputs) + "\n")


def write_multi_references(inputs: Sequence[NLGInput], prefix: str | os.PathLike) -> list[str]:
    """GenerationEval layout: files ``PREFIX0``, ``PREFIX1``, … with line i of file k the k-th reference
    of input i (empty when input i has fewer). Returns the file paths. Higher-numbered files an earlier
    run left under the same prefix are removed (the scorer would read them as more references)."""
    count = max((len(x.references) for x in inputs), default=1)
    paths = []
    for k in range(count):
        path = f"{prefix}{k}"
        with open(path, "w", encoding="utf-8") as handle:
            for x in inputs:
                handle.write((_one_line(x.references[k]) if k < len(x.references) else "") + "\n")
        paths.append(path)
    stale = count
    while os.path.exists(f"{prefix}{stale}"):
        os.remove(f"{prefix}{stale}")
        stale += 1
    return paths


def _one_line(text: str) -> str:
    return " ".join(text.split())


def read_e2e_references(path: str | os.PathLike) -> list[list[str]]:
    """Inverse of :func:`write_e2e_references`, as e2e-metrics ``read_lines(multi_ref=True)``: a file
    without any blank line holds one reference per input."""
    groups: list[list[str]] = [[]]
    with io.StringIO(read_text(path)) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                groups.append([])
            else:
                groups[-1].append(line)
    if not groups[-1]:
        del groups[-1]
    if len(groups) == 1:
        return [[ref] for ref in groups[0]]
    return groups


def read_multi_references(prefix: str | os.PathLike) -> list[list[str]]:
    """Read ``PREFIX0``, ``PREFIX1``, … (or ``PREFIX`` alone); every line is kept (empty padding lines
    included, as multi-bleu-detok.perl keeps them) — callers drop empties where the metric does."""
    paths = []
    k = 0
    while os.path.exists(f"{prefix}{k}"):
        paths.append(f"{prefix}{k}")
        k += 1
    if not paths and os.path.exists(str(prefix)):
        paths.append(str(prefix))
    if not paths:
        raise FileNotFoundError(f"no reference files {prefix}0, {prefix}1, … (nor {prefix})")
    columns = [read_lines(p) for p in paths]
    length = max(len(c) for c in columns)
    return [[c[i] if i < len(c) else "" for c in columns] for i in range(length)]


def read_lines(path: str | os.PathLike) -> list[str]:
    """One item per line, newline and surrounding whitespace stripped (no phantom last line)."""
    with io.StringIO(read_text(path)) as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line.strip() for line in lines]
