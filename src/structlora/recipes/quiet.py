"""Other libraries' log lines that are not the user's concern, dropped one message at a time.

Each filter matches one known message exactly enough that every other warning of the same logger still shows:

- torchao, when transformers imports it: "Failed to load …/torchao/_C_….so" for its optional CUDA kernels (a CPU
  machine, or another CUDA build, has no use for them);
- torch's pytree registry, from the same import: "<enum …> is an Enum subclass and is now natively supported by
  torch.compile" (a deprecation addressed to torchao);
- transformers' LOAD REPORT when a trained run's base model is loaded without its task head, where every MISSING
  tensor belongs to a head the run's adapter then loads (``head_in_adapter``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator, Sequence


class _Drop(logging.Filter):
    def __init__(self, matches: Callable[[str], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.matches(record.getMessage())
        except Exception:  # noqa: BLE001 - a filter must never lose a record because of its own bug
            return True


def _torchao_kernel(message: str) -> bool:
    return message.startswith("Failed to load ") and "torchao" in message and "_C_" in message


def _pytree_enum(message: str) -> bool:
    return "is an Enum subclass and is now natively supported by torch.compile" in message


_IMPORT_NOISE = (("torchao", _torchao_kernel), ("torch.utils._pytree", _pytree_enum))
_installed = False


def silence_import_noise() -> None:
    """Install the import-noise filters once per process."""
    global _installed
    if _installed:
        return
    for name, matches in _IMPORT_NOISE:
        logging.getLogger(name).addFilter(_Drop(matches))
    _installed = True


_MISSING_ROW = re.compile(r"^\s*([\w.]+)\s*\|\s*MISSING\s*\|", re.MULTILINE)


def missing_only_in(message: str, modules: Sequence[str]) -> bool:
    """Whether ``message`` is a transformers LOAD REPORT whose rows are all MISSING tensors inside ``modules``."""
    if "LOAD REPORT" not in message:
        return False
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)  # transformers colours the report on a terminal
    rows = [line for line in message.splitlines() if "|" in line and not line.lstrip().startswith(("Key", "-"))]
    missing = _MISSING_ROW.findall(message)
    return bool(missing) and len(missing) == len(rows) and all(
        set(name.split(".")) & set(modules) for name in missing)


@contextlib.contextmanager
def head_in_adapter(modules: Sequence[str]) -> Iterator[None]:
    """Within: drop transformers' LOAD REPORT when every tensor it reports MISSING lies in ``modules`` (the task head
    a run's adapter holds and then loads, strictly); any other report still shows."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _Drop(lambda message: missing_only_in(message, modules))
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
