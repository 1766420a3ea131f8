"""Every CLI failure is one `error:` line and exit code 1, unforeseen exceptions included (issue 12, item 7)."""
from __future__ import annotations

import pytest

from structlora.recipes import commands as cli
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


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_process_group_is_destroyed_when_the_command_ends(monkeypatch, tmp_path, outcome):
    """Under torchrun, accelerate starts a gloo group inside the command; the CLI ends it: left to interpreter
    exit, gloo can abort a successful run with SIGABRT ("terminate called without an active exception")."""
    import torch.distributed as dist

    def run(args):  # noqa: ANN001, ANN202 - starts the group as accelerate does, then succeeds or fails
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if outcome == "failure":
            raise ValueError("bad")
        return 0

    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(score, "run", run)
    try:
        assert cli.main(["score", "e2e", "--hyp", "h.txt", "--ref", "r.txt"]) == (0 if outcome == "success" else 1)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_process_group_the_caller_started_is_left_alone(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setattr(score, "run", lambda args: 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert cli.main(["score", "e2e", "--hyp", "h.txt", "--ref", "r.txt"]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_structlora_warnings_are_one_warning_line(monkeypatch, capsys):
    """structlora's own warnings print as `warning: …` (no file path, no source line); other libraries' warnings
    go to the hook that was there before (here pytest's recorder); that hook is restored after the command."""
    import warnings

    from structlora.targets import TargetWarning

    def run(args):  # noqa: ANN001, ANN202
        warnings.warn("target_modules ['dense'] also matches 1 module(s)", TargetWarning)
        warnings.warn("a deprecation from elsewhere", FutureWarning)
        return 0

    monkeypatch.setattr(score, "run", run)
    with pytest.warns(FutureWarning, match="a deprecation from elsewhere") as recorded:
        hook = warnings.showwarning
        assert cli.main(["score", "e2e", "--hyp", "h.txt", "--ref", "r.txt"]) == 0
        assert warnings.showwarning is hook
    assert [w.category for w in recorded] == [FutureWarning]
    assert capsys.readouterr().err.splitlines() == ["warning: target_modules ['dense'] also matches 1 module(s)"]


@pytest.mark.parametrize("dataset", ["e2e", "webnlg", "dart"])
@pytest.mark.parametrize("bad", ["hyp", "ref"])
def test_a_scorer_names_the_file_that_is_not_utf8(monkeypatch, capsys, tmp_path, dataset, bad):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    hyp, ref = tmp_path / "hyps.txt", tmp_path / ("refs.txt" if dataset == "e2e" else "hyps.reference0")
    hyp.write_text("a cheap pub\n", encoding="utf-8")
    ref.write_text("a cheap pub .\n", encoding="utf-8")
    broken = hyp if bad == "hyp" else ref
    broken.write_bytes(b"caf\xe9 near the river\n")  # latin-1
    refs = ["--ref", str(ref)] if dataset == "e2e" else ["--ref-prefix", str(tmp_path / "hyps.reference")]
    assert cli.main(["score", dataset, "--hyp", str(hyp), *refs, "--no-java"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken} is not UTF-8 text (byte 0xe9 at offset 3)"), err


def test_an_unreachable_hub_is_one_error_line_at_once_naming_what_is_accepted(monkeypatch, tmp_path):
    """No waiting for the Hub's retries: a connection test decides, the Hub is switched off for the command, and a
    model that is not in the cache is refused before any data or weights are read."""
    from structlora.recipes import hub

    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=1.0: probes.append(timeout) or False)
    monkeypatch.setenv(hub.OFFLINE_ENV, "0")  # restored after the test
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as refused:
        cli.main(["train", "glue", "--task", "sst2", "--model", "nobody/no-such-model", "--output",
                  str(tmp_path / "run")])
    assert str(refused.value.code) == (
        "error: cannot load --model 'nobody/no-such-model': it is not a local folder nor in the Hugging Face cache, "
        "and the Hugging Face Hub is unreachable. Offline, --model takes a local folder (config.json + weights), a "
        ".gguf file, a model already in the cache, or (train nlg / train llm) the packaged smollm2-135m")
    assert probes == [1.0] and __import__("os").environ[hub.OFFLINE_ENV] == "1"
    assert not (tmp_path / "run").exists()
    # A local folder is never probed for.
    hub.check_model_available(str(tmp_path))
    assert probes == [1.0]


def test_import_noise_is_dropped_and_other_warnings_of_the_same_loggers_kept(capsys):
    import logging

    from structlora.recipes.quiet import silence_import_noise

    silence_import_noise()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    noise = {"torchao": "Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
             "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                                    "torch.compile as an opaque value type."}
    for name, message in noise.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler := Keep())
        try:
            logger.warning(message)
            logger.warning(f"a real {name} warning")
        finally:
            logger.removeHandler(handler)
    assert records == ["a real torchao warning", "a real torch.utils._pytree warning"]


def test_a_load_report_is_dropped_only_when_every_missing_tensor_is_a_head_the_adapter_holds():
    from structlora.recipes.quiet import missing_only_in

    report = ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: m\nKey | Status | \n----+----+-\n"
              "classifier.bias | MISSING | \nbert.pooler.dense.bias | MISSING | \n\nNotes:\n- MISSING:\tthose params")
    assert missing_only_in(report, ("classifier", "pooler"))
    assert not missing_only_in(report, ("classifier",))  # the pooler is not in the adapter: the report shows
    unexpected = report.replace("bert.pooler.dense.bias | MISSING", "bert.extra.weight | UNEXPECTED")
    assert not missing_only_in(unexpected, ("classifier", "pooler"))
    assert not missing_only_in("some other warning", ("classifier",))


def test_generate_continues_after_a_raised_limit_and_refuses_a_lowered_one(tmp_path):
    from structlora.tasks.nlg.data import NLGInput
    from structlora.recipes.generate import _check_resumable

    inputs = [NLGInput(f"name : Place {i}", ("x",)) for i in range(4)]
    output, sources = tmp_path / "hyps.txt", tmp_path / "hyps.sources.txt"
    output.write_text("a\nb\n")
    sources.write_text("name : Place 0\nname : Place 1\n")  # written with --limit 2
    _check_resumable(str(sources), inputs, str(output), restart=False)  # --limit 4: continues after line 2
    _check_resumable(str(sources), inputs[:2], str(output), restart=False)  # the same inputs: resumes
    with pytest.raises(SystemExit, match=r"holds hypotheses for the first 2 inputs; --limit 1 asks for fewer"):
        _check_resumable(str(sources), inputs[:1], str(output), restart=False)
    with pytest.raises(SystemExit, match="was generated for other inputs"):
        _check_resumable(str(sources), inputs[2:], str(output), restart=False)
    _check_resumable(str(sources), inputs[2:], str(output), restart=True)


def test_empty_hypotheses_are_scored_with_a_warning(tmp_path, capsys):
    hyp, ref = tmp_path / "hyps.txt", tmp_path / "refs.txt"
    hyp.write_text("a cheap pub .\n\n")
    ref.write_text("a cheap pub .\n\na pub .\n")
    result = score.score_e2e(str(hyp), str(ref), use_java=False)
    assert "BLEU" in result
    assert f"warning: 1 of 2 hypotheses in {hyp} are empty (line(s) 2)" in capsys.readouterr().err
