"""A status line on stderr for a phase that reports no progress of its own (the official scorers, METEOR in Java):
what runs and for how long, so that a long scoring run is visibly alive."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator

# On a terminal the elapsed time is redrawn every second; off one (a log file, CI) a line is written at most
# this often, so a log shows the phase is alive without one line per second.
LOG_INTERVAL_S = 30.0


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """Show `description` and its elapsed time on stderr while the block runs, then how long it took."""
    stream = sys.stderr
    interactive = stream.isatty()
    interval = 1.0 if interactive else LOG_INTERVAL_S
    start = time.perf_counter()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(interval):
            elapsed = time.perf_counter() - start
            if interactive:
                stream.write(f"\r{description}: {elapsed:.0f} s")
            else:
                stream.write(f"{description}: still running after {elapsed:.0f} s\n")
            stream.flush()

    stream.write(f"{description}…" + ("" if interactive else "\n"))
    stream.flush()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    outcome = "stopped after"
    try:
        yield
        outcome = "done in"
    finally:
        done.set()
        ticker.join()
        elapsed = time.perf_counter() - start
        stream.write(f"{chr(13) if interactive else ''}{description}: {outcome} {elapsed:.1f} s\n")
        stream.flush()
