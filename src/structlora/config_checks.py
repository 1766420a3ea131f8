"""The checks behind the configs' fields: each raises an error that names the field and what would be valid,
and `portable_model_name`, the base model's name as a saved config records it.

Without peft or torch: `structlora.config` (which imports peft) and the modules that record a model's name use them.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Union

_HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\]")


def require_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(choices)}")


def require_number(name: str, value: Any, low: float, high: float = math.inf, low_inclusive: bool = False,
                   high_inclusive: bool = False) -> float:
    """A finite real number in the range, or an error naming the field (bools and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def require_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise TypeError(f"{name} must be true or false{' (or None)' if allow_none else ''}, got {value!r}")


def require_names(name: str, value: Any, allow_regex: bool) -> None:
    """None, a non-empty list of non-empty strings, or (target_modules) one regex that compiles."""
    if value is None:
        return
    if isinstance(value, str):
        if not allow_regex:
            raise TypeError(f"{name} must be a list of module names, got the string {value!r}")
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name} {value!r} is not a valid regular expression: {error}") from error
        return
    if not isinstance(value, list) or not value:
        raise TypeError(f"{name} must be a non-empty list of module names{' or a regex string' if allow_regex else ''}"
                        f", got {value!r}")
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"{name} entries must be non-empty strings, got {entry!r}")


def require_slices(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be a non-empty list of true/false per slice (e.g. [true, false, true]), "
                        f"got {value!r}")


def portable_model_name(name: Union[str, None]) -> Union[str, None]:
    """The base model's name as a saved config should record it: a Hub id stays as it is; a local folder
    becomes its folder name (an absolute path would not exist on another machine); a Hugging Face cache
    snapshot (`.../models--org--name/snapshots/<hash>`) becomes its Hub id `org/name`."""
    if not name:
        return None
    name = str(name)
    cached = _HUB_CACHE_SNAPSHOT.search(name)
    if cached:
        return cached.group("repo").replace("--", "/")
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or name.startswith((".", "~")) or os.path.exists(expanded):
        return os.path.basename(os.path.normpath(expanded)) or None
    return name
