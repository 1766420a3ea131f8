"""Phases without progress of their own (scoring) show what runs and for how long, on stderr only."""

from __future__ import annotations

import time

from structlora.cli import main
from structlora.recipes import progress


def test_a_phase_off_a_terminal_writes_whole_lines_at_the_log_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    with progress.phase("scoring x"):
        time.sleep(0.3)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and "\r" not in captured.err  # a log gets whole lines, no redraws
    assert lines[0] == "scoring x…" and lines[-1].startswith("scoring x: done in ")
    assert 1 <= sum("still running after" in line for line in lines) <= 6


def test_a_failed_phase_says_it_stopped(capsys):
    try:
        with progress.phase("scoring y"):
            raise ValueError("boom")
    except ValueError:
        pass
    assert capsys.readouterr().err.splitlines()[-1].startswith("scoring y: stopped after ")


def test_score_shows_the_phase_on_stderr_and_keeps_stdout_for_scores(tmp_path, capsys):
    (tmp_path / "refs.txt").write_text("the pub is cheap .\na cheap pub .\n\nthe cafe is near the river .\n")
    (tmp_path / "hyps.txt").write_text("the pub is cheap .\nthe cafe is by the river .\n")
    assert main(["score", "e2e", "--ref", str(tmp_path / "refs.txt"), "--hyp", str(tmp_path / "hyps.txt"),
                 "--no-java", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and '"BLEU"' in captured.out  # one JSON line, nothing else
    assert "scoring e2e: 2 hypotheses" in captured.err and ": done in " in captured.err
