"""Tests of ``tokenloss curve``: verdicts and plots from the fixture logs, flags, and malformed logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenloss.cli import main

FIXTURES = Path(__file__).parent.parent / "fixtures" / "curves"


def test_curve_plots_several_runs_and_prints_verdicts(tmp_path, capsys):
    """Two logs of different formats: one PNG, one verdict per run, log V mentioned."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    argv = ["curve", str(FIXTURES / "trainer_state.json"), str(FIXTURES / "overfit.jsonl"), "--out", str(out)]
    assert main([*argv, "--vocab-size", "256", "--smooth", "0.6", "--label", "hf", "--label", "mine"]) == 0
    stdout = capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "hf:\n" in stdout and "mine:\n" in stdout and "log V = ln 256 = 5.545" in stdout
    assert "OK: no overfitting" in stdout and "WARNING: overfitting" in stdout


def test_curve_json_and_strict(capsys):
    """--json lists the findings per run; --strict turns a warning into exit status 1."""
    assert main(["curve", str(FIXTURES / "diverged.tsv"), "--no-plot", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] is None and report["runs"][0]["findings"][0]["kind"] == "nonfinite"
    assert main(["curve", str(FIXTURES / "diverged.tsv"), "--no-plot", "--strict"]) == 1
    assert main(["curve", str(FIXTURES / "metrics.csv"), "--no-plot", "--strict"]) == 0


def test_curve_column_flags(capsys):
    """--val-col names a column that detection does not know."""
    argv = ["curve", str(FIXTURES / "custom_columns.csv"), "--no-plot", "--val-col", "valid/nll"]
    assert main(argv) == 0
    assert "val: 5 points" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("bad.jsonl", [], "bad.jsonl:3: invalid JSON"),
        ("bad_fields.csv", [], "bad_fields.csv:4: 3 fields"),
        ("trainer_state_bad_value.json", [], "trainer_state_bad_value.json:36: 'loss' must be a number"),
        ("absent.csv", [], "no such log file"),
        ("metrics.csv", ["--loss-col", "nope"], "no column 'nope'"),
        ("metrics.csv", ["--label", "a", "--label", "b"], "--label given 2 times for 1 logs"),
        ("metrics.csv", ["--smooth", "1.0"], "--smooth must be in [0, 1)"),
    ],
)
def test_curve_errors_name_the_file_and_line(capsys, name, extra, message):
    """A malformed log or bad flag: exit status 2, one 'Error:' line, no traceback."""
    assert main(["curve", str(FIXTURES / name), "--no-plot", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
