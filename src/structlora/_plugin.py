"""Registering structlora's methods with PEFT without importing peft at `import structlora`.

Importing peft costs seconds (torch, transformers), which `structlora --help` must not pay. So `import structlora`
registers at once only when peft is already imported; otherwise it asks the import system to run the
registration (`structlora.peft_method`) right after peft's own import finishes. When peft is first imported by
`structlora.config` itself (the hook then finds that module half-built and leaves it), `structlora.config`
registers as its last statement.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

_REGISTRATION = "structlora.peft_method"
_CONFIG = "structlora.config"


def ensure_registered() -> None:
    """Import structlora.peft_method (which registers) unless it is imported already."""
    if _REGISTRATION not in sys.modules:
        importlib.import_module(_REGISTRATION)


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _after_peft_import() -> None:
    if not _initializing(_CONFIG):  # else: the config module registers at its end (see the module docstring)
        ensure_registered()


class _LoaderAfterPeft(importlib.abc.Loader):
    """peft's own loader, followed by the registration."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _after_peft_import()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PeftImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader that the other finders give for `peft` (once)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderAfterPeft(spec.loader)
                return spec
        return None


def activate() -> None:
    """Register now if peft is imported, else right after it is."""
    if "peft" in sys.modules and not _initializing("peft"):
        _after_peft_import()
    elif not any(isinstance(finder, _PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportWatcher())
