"""Registering structlora's methods with PEFT without importing peft at `import structlora`.

Importing peft costs seconds (torch, transformers), which `structlora --help` must not pay. So `import structlora`
registers at once only when peft is already imported; otherwise it asks the import system to run the
registration (`structlora.peft_method`) right after peft's own import finishes. When peft is first imported by
`structlora.config` itself (the hook then finds that module half-built and leaves it), `structlora.config`
registers as its last statement — unless another structlora module is still being imported (one that imported the
config module first, such as `structlora.layers`): the registration would import it back half-built, so the first
config built registers instead.
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


def _other_module_half_built() -> bool:
    """Whether a structlora module other than the config module is still being imported: the registration imports
    the tuner and its layers, which would meet that module half-built (`import structlora.layers` first imports
    the config module, whose end registers)."""
    return any(_initializing(name) for name in list(sys.modules) if name.startswith("structlora.") and name != _CONFIG)


def register_when_possible() -> None:
    """ensure_registered(), unless another structlora module is still being imported; then the next config built
    (AdapterConfig.__post_init__ calls this) registers."""
    if _REGISTRATION not in sys.modules and not _other_module_half_built():
        ensure_registered()


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _after_peft_import() -> None:
    if not _initializing(_CONFIG):  # else: the config module registers at its end (see the module docstring)
        register_when_possible()


class _LoaderAfterPeft(importlib.abc.Loader):
    """peft's own loader, followed by the registration."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _remove_watchers()
        _after_peft_import()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PeftImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader that the other finders give for `peft`. It stays on sys.meta_path
    until peft is executed: a look-up that imports nothing (`importlib.util.find_spec("peft")`, which transformers'
    `is_peft_available()` does) must not use it up before the import it waits for."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _PeftImportWatcher):
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderAfterPeft(spec.loader)
                return spec
        return None


def _remove_watchers() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PeftImportWatcher)]


def activate() -> None:
    """Register now if peft is imported, else right after it is."""
    if "peft" in sys.modules and not _initializing("peft"):
        _after_peft_import()
    elif not any(isinstance(finder, _PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportWatcher())
