"""Checks of the PEFT tuner that run before anything is injected or loaded (`structlora.peft_tuner` calls them).

- `modules_to_save` entries must each name a module of the model (PEFT skips one that names none: the user's
  module would silently stay frozen);
- a target that is also trained in full (inside `modules_to_save`, or the classification head that PEFT adds to it)
  is not adapted (PEFT's rule), with a `TargetWarning` naming those modules; targets that are all trained in full
  are refused (PEFT would report "matched no module", pointing at the wrong cause);
- `loading_from(path)`: which weights file a load reads, so that a refusal of its tensors names the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from typing import Any, Callable, Iterator

from torch import nn

from .config import TaskType
from .targets import TargetWarning, module_matches

# The task heads PEFT adds to `modules_to_save` itself (peft.peft_model.CLASSIFIER_MODULE_NAMES): a model without
# one of them is fine.
_PEFT_HEADS = ("classifier", "score", "pre_classifier", "qa_outputs")
_HEAD = "the classification head"

_CHECKPOINT: contextvars.ContextVar[str] = contextvars.ContextVar("structlora_checkpoint", default="the checkpoint")


@contextlib.contextmanager
def loading_from(path: str) -> Iterator[None]:
    """Within the block, refusals of checkpoint tensors name `path` (see `checkpoint_name`)."""
    token = _CHECKPOINT.set(f"the checkpoint {path!r}")
    try:
        yield
    finally:
        _CHECKPOINT.reset(token)


def checkpoint_name() -> str:
    """'the checkpoint', or 'the checkpoint <path>' inside `loading_from(path)`."""
    return _CHECKPOINT.get()


def _user_stacklevel() -> int:
    """The `stacklevel` at which a warning raised by our caller points at the first frame outside structlora and
    PEFT (whose PeftModel and BaseTuner sit between the user's call and the tuner's checks)."""
    import peft

    packages = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], peft))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


def _is_head(config: Any, entry: str) -> bool:
    task_type = getattr(getattr(config, "task_type", None), "value", getattr(config, "task_type", None))
    return entry in _PEFT_HEADS and task_type in (TaskType.SEQ_CLS.value, TaskType.TOKEN_CLS.value,
                                                   "QUESTION_ANS")


def _names_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def check_modules_to_save(model: nn.Module, config: Any, is_internal: Callable[[str], bool]) -> None:
    """ValueError naming a `modules_to_save` entry that matches no module (the heads PEFT adds itself excepted)."""
    names = [n for n, _ in model.named_modules() if n and not is_internal(n)]
    for entry in config.modules_to_save or ():
        if _is_head(config, entry):
            continue
        if not any(_names_match(name, entry) or module_matches(name, [entry]) for name in names):
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of this model (an entry is a module "
                             f"name or its last components, e.g. 'classifier' or 'pooler.dense'); nothing was changed")


def check_trained_in_full(model: nn.Module, config: Any, is_internal: Callable[[str], bool],
                          inside_any: Callable[[str, Any], bool]) -> None:
    """PEFT's rule, said out loud: targets inside a module trained in full are not adapted. Warns which (pointing at
    the user's line), or refuses when no target is left; nothing is changed either way."""
    owners = list(config.modules_to_save or ())
    if not owners:
        return
    matched = [n for n, _ in model.named_modules()
               if n and not is_internal(n) and module_matches(n, config.target_modules)]
    overlap = [n for n in matched if inside_any(n, owners)]
    if not overlap:
        return
    reasons = " / ".join(sorted({_HEAD if _is_head(config, owner) else "modules_to_save" for owner in owners
                                 if any(inside_any(n, (owner,)) for n in overlap)}))
    listed = f"{', '.join(overlap[:5])}{' …' if len(overlap) > 5 else ''}"
    targets = config.target_modules
    if len(overlap) == len(matched):
        raise ValueError(
            f"target_modules {targets!r} matches only modules trained in full ({reasons}): {listed}. A module is "
            f"either adapted or trained in full, not both: target other modules"
            f"{', or leave these out of modules_to_save' if 'modules_to_save' in reasons else ''}")
    warnings.warn(f"target_modules {targets!r} also matches {len(overlap)} module(s) trained in full ({reasons}): "
                  f"{listed}. Those are trained in full, not adapted (PEFT's rule)", TargetWarning,
                  stacklevel=_user_stacklevel())


__all__ = ["check_modules_to_save", "check_trained_in_full", "checkpoint_name", "loading_from"]
