"""Every CLI failure is one `error:` line and exit code 1, unforeseen exceptions included (issue 12, item 7)."""
from __future__ import annotations

import pytest

from structlora import cli
from structlora.recipes import score


def _raise(error: Exception):  # noqa: ANN202 - a stand-in for a command's run()
    def run(args):  # noqa: ANN001, ANN202
        raise error
    return run


@pytest.mark.parametrize("error, expected", [
    (ValueError("--lr must be finite"), "error: --lr must be finite (set STRUCTLORA_TRACEBACK=1"),
    (RuntimeError("shape mismatch in mm"), "error: unexpected RuntimeError: shape mismatch in mm (probably a structlora bug"),
    (KeyError("missing"), "error: unexpected KeyError: 'missing'"),
])
def test_failure_is_one_error_line(monkeypatch, capsys, error, expected):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(score, "run", _raise(error))
    assert cli.main(["score", "e2e", "--hyp", "h.txt", "--ref", "r.txt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    monkeypatch.setattr(score, "run", _raise(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["score", "e2e", "--hyp", "h.txt", "--ref", "r.txt"])
