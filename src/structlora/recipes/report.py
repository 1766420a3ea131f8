"""`structlora report DIR...`: a markdown table of several runs (their results.json files).

Each DIR is a run folder (holding results.json) or a folder of run folders (searched recursively).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run folders (or folders containing them)")
    parser.add_argument("--output", default=None, help="also write the table to this markdown file")


def run(args: argparse.Namespace) -> int:
    results = load_runs(args.runs)
    if not results:
        raise SystemExit(f"error: no results.json under {', '.join(args.runs)}")
    table = markdown_table(results)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """results.json of each run folder, with ``run`` set to the folder (as given or found)."""
    runs: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw)
        files = [path] if path.is_file() else ([path / "results.json"] if (path / "results.json").is_file()
                                               else sorted(path.rglob("results.json")))
        for file in files:
            record = json.loads(file.read_text())
            record["run"] = str(file.parent)
            runs.append(record)
    return runs


def _format_number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """| run | task | method | trainable params | <each metric> | train time (s) |"""
    metric_names: list[str] = []
    for record in results:
        for name in record.get("eval", {}):
            if name not in metric_names:
                metric_names.append(name)
    header = ["run", "task", "method", "trainable params", *metric_names, "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for record in results:
        cells = [record.get("run", ""), record.get("task", ""), record.get("method", ""),
                 f"{int(record.get('trainable_params', 0)):,}",
                 *(_format_number(record.get("eval", {}).get(name)) for name in metric_names),
                 f"{float(record.get('train_seconds', 0.0)):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
