"""`--resume` continues the run that was started, or says why not.

A run records its flags when training starts (``OUTPUT/run_flags.json``). ``--resume`` compares every flag that
changes training (learning rate and schedule, batch, seed, data, model, adapter; the length of the schedule unless
the recorded run finished and is being continued) with that record and refuses a change, unless
``--allow-resume-changes`` is given. Then the record says what ran: the optimizer's own hyper-parameters (learning
rate, weight decay, Adam's) are the checkpoint's, whatever the flags say, so they are reported as the checkpoint's;
every other change is listed with its step in ``results.json`` (``resumes``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

RECORD_FILE = "run_flags.json"
# Flags that change neither the trained weights nor the data: evaluation, logging, output handling.
_FREE_FLAGS = frozenset({
    "output", "resume", "overwrite", "config", "init_from", "allow_incomplete_checkpoint", "allow_resume_changes",
    "eval_batch_size", "logging_steps", "report_to", "gradient_checkpointing", "skip_nonfinite_steps", "checkpoint",
    "max_eval_samples", "eval_subset", "n_eval", "max_eval_examples", "eval_split", "max_new_tokens",
})
# Restored from the checkpoint's optimizer and scheduler state: a new value would not be used.
_CHECKPOINT_FLAGS = frozenset({"lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon"})
# The schedule's length: a finished run may be continued with a longer one.
_LENGTH_FLAGS = frozenset({"epochs", "max_steps"})


def record_path(output: str) -> str:
    return os.path.join(output, RECORD_FILE)


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def read_record(output: str) -> dict[str, Any] | None:
    """The run's record: run_flags.json, else the flags of a results.json (runs from before the record)."""
    for path, key in ((record_path(output), "flags"), (os.path.join(output, "results.json"), "flags")):
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError) as error:
                raise SystemExit(f"error: --resume: {path} is unreadable ({error}); pass --overwrite to start "
                                 f"over") from None
            if isinstance(data, dict) and isinstance(data.get(key), dict):
                return {"flags": data[key], "resumes": list(data.get("resumes", []))}
    return None


def changed_flags(flags: dict[str, Any], recorded: dict[str, Any], finished: bool) -> dict[str, tuple[Any, Any]]:
    """``{flag: (recorded, now)}`` for every training flag whose value differs from the record (flags the record
    does not know are not compared)."""
    changed = {}
    for name, value in _json(flags).items():
        if name in _FREE_FLAGS or name not in recorded or recorded[name] == value:
            continue
        if name in _LENGTH_FLAGS and finished:
            continue  # continuing a finished run with a longer schedule
        changed[name] = (recorded[name], value)
    return changed


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"--{name.replace('_', '-')} {now!r} (the run: {before!r})" for name, (before, now)
                     in sorted(changed.items()))


def check_resume_flags(args: argparse.Namespace, flags: dict[str, Any], finished: bool,
                       write: bool = False) -> None:
    """Refuse a ``--resume`` whose training flags differ from the run's record (``--allow-resume-changes``: accept
    them, set the optimizer's hyper-parameters back to the checkpoint's with a warning, and, when ``write``, append
    the changes to the record)."""
    record = read_record(args.output)
    if record is None:
        print(f"warning: --resume: {args.output} has no record of the flags it was trained with ({RECORD_FILE}); "
              f"they cannot be compared", file=sys.stderr)
        return
    changed = changed_flags(flags, record["flags"], finished)
    if not changed:
        return
    if not getattr(args, "allow_resume_changes", False):
        raise SystemExit(f"error: --resume: {_describe(changed)} differ from the flags {args.output} was trained "
                         f"with; resuming with them would not continue that run. Give the run's values, pass "
                         f"--allow-resume-changes to continue with these (the learning rate, weight decay and Adam "
                         f"settings stay the checkpoint's), or --overwrite to start over")
    kept = {name: pair for name, pair in changed.items() if name in _CHECKPOINT_FLAGS}
    if kept:
        print(f"warning: --resume: {_describe(kept)} not used: the optimizer continues with the checkpoint's values, "
              f"which results.json records", file=sys.stderr)
        for name, (before, _) in kept.items():
            setattr(args, name, before)
    if write:
        applied = {name: {"run": before, "resumed": now} for name, (before, now) in changed.items()
                   if name not in kept}
        record.setdefault("resumes", []).append({"resume": str(args.resume), "changed": applied,
                                                 "not_used": {name: now for name, (_, now) in kept.items()}})
        _write(args.output, record)


def write_record(output: str, flags: dict[str, Any]) -> None:
    """The flags of a run that starts training (not of a resumed one: its record stays the first run's)."""
    _write(output, {"flags": _json(flags)})


def _write(output: str, record: dict[str, Any]) -> None:
    os.makedirs(output, exist_ok=True)
    with open(record_path(output), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")


def resumes_of(output: str) -> list[dict[str, Any]]:
    """The resumes with changed flags recorded for the run in ``output`` (for results.json)."""
    path = record_path(output)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return list(json.load(handle).get("resumes", []))
