"""`make demo` takes the data folder the errors ask for (`make demo DATA_DIR=DIR`)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_passes_data_dir_and_demo_args():
    def demo_command(*variables: str) -> str:
        dry = subprocess.run(["make", "-n", "-B", "demo", *variables], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        return next(line for line in dry.splitlines() if "-m structlora.demo" in line)

    assert demo_command("DATA_DIR=/data/my glue").endswith('-m structlora.demo --data-dir "/data/my glue" ')
    assert demo_command("DATA_DIR=/d", "DEMO_ARGS=--full").endswith('--data-dir "/d" --full')
    assert demo_command().endswith("-m structlora.demo  ")  # unchanged without them
