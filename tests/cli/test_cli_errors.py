"""The CLI's error contract: bad input is one line and exit 2; ``--debug`` (anywhere on the line)
shows the traceback; a bug (an exception not caused by reading an input) is not disguised."""

from __future__ import annotations

import json

import pytest


def test_debug_shows_the_traceback(tmp_path, cli):
    code, _, err = cli("train", tmp_path / "nope.toml")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for argv in (("--debug", "train", tmp_path / "nope.toml"), ("train", tmp_path / "nope.toml", "--debug")):
        code, _, err = cli(*argv)
        assert code == 2 and "Traceback (most recent call last)" in err and "nope.toml" in err


def test_last_resort_names_the_file_of_an_uncaught_decoding_error(tmp_path, cli, monkeypatch):
    """A JSON error the room did not catch still ends in one line naming the file it read."""
    import relscale.sweep.cli as sweep_cli

    bad = tmp_path / "config.json"
    bad.write_text("{oops")

    def run_grid(args):
        path = bad
        return json.loads(path.read_text())

    monkeypatch.setattr(sweep_cli, "run_grid", run_grid)
    code, _, err = cli("grid", "--preset", "tiny")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(bad) in err and "JSONDecodeError" in err


def test_a_bug_keeps_its_traceback(cli, monkeypatch):
    """A KeyError that no input caused is a bug: it propagates (the traceback shows), not exit 2."""
    import relscale.sweep.cli as sweep_cli

    def run_grid(args):
        return {}["missing"]

    monkeypatch.setattr(sweep_cli, "run_grid", run_grid)
    with pytest.raises(KeyError):
        cli("grid", "--preset", "tiny")


def test_flag_errors_are_one_line(cli):
    code, _, err = cli("sweep", "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sweep_dir" in err
    code, out, _ = cli("fit", "--help")
    assert code == 0 and "--metric" in out


def test_warnings_are_printed_once_in_words(capsys, monkeypatch):
    import warnings

    from relscale import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    cli._warnings_in_words("fit")
    message = "results.parquet is unreadable;\nrebuilding it from the run marks"
    warnings.warn(message, UserWarning, stacklevel=1)
    warnings.warn("overflow encountered in exp", RuntimeWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "relscale fit: warning: results.parquet is unreadable; | rebuilding it from the run marks\n"


def test_unparseable_jsonl_is_one_line_in_a_real_process(tmp_path):
    # In-process runs miss log handlers bound to the real stderr (datasets logged a second line).
    import subprocess
    import sys

    bad = tmp_path / "garbage.jsonl"
    bad.write_text('{"text": "a"\nnot json\n')
    command = [sys.executable, "-m", "relscale", "prepare", str(bad), "--out", str(tmp_path / "p")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "garbage.jsonl" in lines[0] and "JSON parse error" in lines[0]
