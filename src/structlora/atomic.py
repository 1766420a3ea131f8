"""All-or-nothing writes: adapter tensors copied with a rollback, and files replaced by renaming.

An exception in the middle of an operation, an interrupt (Ctrl-C) or an out-of-memory error included, must leave
what was there before: a half-loaded adapter computes neither the old function nor the new one, and a half-written
folder loads as neither adapter."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import torch

from .distributed import copy_whole


def copy_all_or_nothing(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each value into its target (`copy_whole`: sharded targets too), or none of them: on any exception the
    targets written so far get their previous values back, bit for bit, and the exception is raised. The backup
    is a copy of the targets (adapter tensors: small)."""
    backups = [target.detach().clone() for target, _ in pairs]
    started = 0
    try:
        for target, value in pairs:
            started += 1
            copy_whole(target, value)
    except BaseException:
        for (target, _), backup in zip(pairs[:started], backups):
            copy_whole(target, backup)
        raise


def _move(source: str, destination: str) -> None:
    """Rename a staged file into place (os.replace: atomic per file). A name of this module, looked up at each call,
    so that a test can make one fail."""
    os.replace(source, destination)


@contextlib.contextmanager
def staged_files(directory: str, order: tuple[str, ...]) -> Iterator[str]:
    """Yield a fresh staging folder inside `directory` (created if needed); once the block has written the files
    named in `order` there, each is flushed to disk and renamed into `directory` (`os.replace`: atomic per file) in
    that order. If the block raises, or a file is missing, `directory` is left as it was. The staging folder is
    removed in every case but a killed process (a hidden `.saving-*` folder then stays, ignored by loaders)."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=directory)
    try:
        yield staging
        for name in order:
            _flush(os.path.join(staging, name))
        for name in order:
            _move(os.path.join(staging, name), os.path.join(directory, name))
        _flush_directory(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _flush(path: str) -> None:
    with open(path, "rb+") as handle:  # FileNotFoundError when the block did not write it
        os.fsync(handle.fileno())


def _flush_directory(directory: str) -> None:
    """Make the renames durable where the platform allows it (POSIX; Windows cannot open a folder)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def flush_tree(folder: str) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk (before the tree is renamed into
    place: a crash after the rename then finds whole files)."""
    for root, _, files in os.walk(folder):
        for name in files:
            _flush(os.path.join(root, name))
        _flush_directory(root)
