"""The output folder and its checkpoints: never train over a finished run or another run's checkpoints without an
explicit flag (``check_output_dir``), and which checkpoint ``--resume`` continues (``resume_checkpoint``: the newest
complete one; an incomplete one only with ``--allow-incomplete-checkpoint``). The flags a resumed run may change are
``resume.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

from .outputs import flags_of, is_main_process
from .resume import check_resume_flags, write_record


def checkpoint_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output, "checkpoints")


def resume_checkpoint(args: argparse.Namespace) -> str | bool | None:
    resume = getattr(args, "resume", None)
    if not resume:
        return None
    if resume in ("latest", "auto", True):
        folder = checkpoint_dir(args)
        checkpoints = _checkpoints_newest_first(folder)
        if not checkpoints:
            raise SystemExit(f"error: --resume: no checkpoint-* folder in {folder}")
        for checkpoint in checkpoints:
            missing = _missing_state(checkpoint, args.method)
            if not missing or _tolerated_missing(missing, args):
                _warn_incomplete(checkpoint, missing)
                return checkpoint
            print(f"--resume: {checkpoint} is incomplete (lacks {', '.join(missing)}; interrupted while saving?): "
                  f"trying the one before", file=sys.stderr)
        raise SystemExit(f"error: --resume: no complete checkpoint in {folder}")
    if not os.path.isdir(resume):
        raise SystemExit(f"error: --resume: {resume} is not a checkpoint folder")
    missing = _missing_state(resume, args.method)
    if missing and not _tolerated_missing(missing, args):
        raise SystemExit(f"error: --resume: {resume} lacks {', '.join(missing)}; resuming it would not continue the "
                         f"same run (--allow-incomplete-checkpoint resumes anyway, with fresh state for what is "
                         f"missing)")
    _warn_incomplete(resume, missing)
    return resume


def _warn_incomplete(checkpoint: str, missing: list[str]) -> None:
    if missing:
        print(f"warning: --allow-incomplete-checkpoint: resuming {checkpoint} without {', '.join(missing)} (fresh "
              f"state for them: the result differs from an uninterrupted run)", file=sys.stderr)


def _checkpoints_newest_first(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(folder)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for _, name in sorted(steps, reverse=True)]


def _missing_state(checkpoint: str, method: str) -> list[str]:
    from structlora.trainer import missing_checkpoint_state

    # --method full (and PEFT's methods) checkpoint transformers' own weight files: only the state files are checked.
    return missing_checkpoint_state(checkpoint, weights=() if method == "full" else ("adapter_model.safetensors",
                                                                                      "adapter_config.json"))


def _tolerated_missing(missing: list[str], args: argparse.Namespace) -> bool:
    """--allow-incomplete-checkpoint resumes without optimizer/scheduler/RNG state, never without the weights."""
    return bool(getattr(args, "allow_incomplete_checkpoint", False)) and not any(
        name.startswith("adapter_") for name in missing)


def _run_status(output: str) -> str | None:
    """The status of the run in `output`: None (no results.json), else results.json's status ("completed" for
    results written before runs recorded one)."""
    path = os.path.join(output, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return str(json.load(handle).get("status", "completed"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def check_output_dir(args: argparse.Namespace, remove: bool = True) -> None:
    """Never train over a finished run or another run's checkpoints without an explicit flag. The recipes call it
    twice: before loading anything with ``remove=False`` (refusals only), and when training starts, where
    ``--overwrite`` then deletes the old run (so a failure in between leaves it in place)."""
    output = args.output
    status = _run_status(output)
    has_checkpoints = bool(_checkpoints_newest_first(checkpoint_dir(args)))
    if getattr(args, "overwrite", False):
        if remove and is_main_process():
            shutil.rmtree(checkpoint_dir(args), ignore_errors=True)
            if status is not None:
                os.remove(os.path.join(output, "results.json"))
        elif not remove and is_main_process():
            write_record(output, flags_of(args))
        return
    if getattr(args, "resume", None):
        if status == "completed" and _schedule_done(args):
            print(f"{output} holds a finished run (results.json) whose last checkpoint already reached the "
                  f"requested schedule: nothing to resume, nothing was done. Pass --overwrite to train it again, or "
                  f"a longer --max-steps/--epochs to continue it", file=sys.stderr)
            raise SystemExit(0)
        if not remove:  # before anything is loaded, with the flags as given (the record was written likewise)
            check_resume_flags(args, flags_of(args), finished=status == "completed", write=is_main_process())
        return
    if status is not None:
        raise SystemExit(f"error: --output {output} holds a {status} run (results.json); pass --overwrite to replace "
                         f"it, --resume to continue it, or choose another --output")
    if has_checkpoints:
        raise SystemExit(f"error: --output {output} holds checkpoints of an unfinished run; pass --resume to continue "
                         f"it, --overwrite to start over, or choose another --output")
    if not remove and is_main_process():
        write_record(output, flags_of(args))


def _schedule_done(args: argparse.Namespace) -> bool:
    """Whether the newest checkpoint already completed the schedule these flags ask for."""
    checkpoints = _checkpoints_newest_first(checkpoint_dir(args))
    if not checkpoints:
        return True  # a finished run without checkpoints: nothing to resume from either
    try:
        with open(os.path.join(checkpoints[0], "trainer_state.json")) as handle:
            state = json.load(handle)
        step, planned = int(state["global_step"]), int(state["max_steps"])
        epochs = float(state.get("num_train_epochs") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False  # let --resume pick a complete checkpoint and report
    if args.max_steps is not None and args.max_steps > 0:
        return step >= args.max_steps
    return step >= planned and epochs >= float(args.epochs)


def write_status(output: str, status: str, error: str) -> None:
    if is_main_process():
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "results.json"), "w") as handle:
            json.dump({"status": status, "error": error}, handle, indent=2)
            handle.write("\n")
