"""The floor plan (docs/ARCHITECTURE.md): library, tasks and command line; nothing imports a wing above its own."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "structlora"
COMMAND_LINE = ("structlora.recipes", "structlora.cli", "structlora.cli_docs", "structlora.demo")


def wing(module: str) -> int:
    """0: library (the package top), 1: tasks, 2: command line."""
    if module.startswith(COMMAND_LINE):
        return 2
    return 1 if module.startswith("structlora.tasks") else 0


def imports() -> list[tuple[str, str]]:
    """(importer, imported) for every structlora import in the package, function-level ones included."""
    edges = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] if not node.module else [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges += [(module, target) for target in targets if target.startswith("structlora")]
    return edges


def test_no_module_imports_a_wing_above_its_own():
    edges = imports()
    assert len(edges) > 100  # the walk sees the package's imports
    upward = sorted({(a, b) for a, b in edges if wing(b) > wing(a)})
    assert upward == []


def test_the_three_wings_exist():
    modules = {a for a, _ in imports()}
    assert {wing(m) for m in modules} == {0, 1, 2}
    assert {"structlora.tasks.glue.data", "structlora.tasks.nlg.data", "structlora.recipes.runs"} <= modules
