"""Tests of `tokenloss demo`: the worked numbers it prints, its JSON, the options it passes on, and bad input."""

from __future__ import annotations

import json
import math

import pytest

import tokenloss.cli.demo as demo
from tokenloss.cli import main


def run_json(capsys, *args: str) -> dict:
    assert main(["demo", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_holds_the_reference_numbers(capsys):
    """--json: -log p of the course material, the sentence's 1.81, log V of uniform guesses, softmax - onehot."""
    result = run_json(capsys, "--no-bench")
    by_p = {row["p"]: row["loss_nats"] for row in result["worked_examples"]}
    assert round(by_p[0.7], 3) == 0.357 and round(by_p[0.95], 3) == 0.051 and round(by_p[0.05], 3) == 2.996
    assert [round(t["loss_nats"], 2) for t in result["sentence"]["tokens"]] == [3.91, 1.90, 0.92, 0.51]
    assert round(result["sentence"]["mean_nats"], 2) == 1.81
    assert result["sentence"]["perplexity"] == pytest.approx(math.exp(result["sentence"]["mean_nats"]))
    uniform = {row["V"]: row for row in result["uniform"]}
    assert round(uniform[5]["loss_nats"], 3) == 1.609 and round(uniform[256]["loss_nats"], 3) == 5.545
    for row in result["uniform"]:
        assert row["loss_nats"] == pytest.approx(math.log(row["V"]), rel=1e-6)
        assert row["perplexity"] == pytest.approx(row["V"], rel=1e-4)
    gradient = result["gradient"]
    assert gradient["autograd"] == pytest.approx(gradient["softmax_minus_onehot"], abs=1e-6)
    assert result["benchmark"] is None


def test_tables_show_the_numbers(capsys):
    """The human output is readable tables with the worked numbers and a benchmark row."""
    assert main(["demo", "--bench-size", "16x50", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for text in (
        "0.357",
        "2.996",
        "3.91",
        "mean 1.8091 nats",
        "exp(1.8091) = 6.10",
        "1.609",
        "5.545",
        "softmax - onehot",
        "(16, 50)",
    ):
        assert text in out, text
    assert "tokenloss.cross_entropy" in out and "speed-up" in out


def test_benchmark_options_reach_the_benchmark(capsys, monkeypatch):
    """The benchmark is opt-in: none by default; --bench runs 2048x32000, 3 rounds; --bench-size implies
    --bench; --bench-size and --repeats are passed on; the row is printed."""
    calls = []

    def fake_row(n_rows, vocab_size, repeats):
        calls.append((n_rows, vocab_size, repeats))
        return {
            "N": n_rows,
            "V": vocab_size,
            "repeats": repeats,
            "threads": 2,
            "tokenloss_ms": 1.0,
            "torch_ms": 2.0,
            "speedup": 2.0,
        }

    monkeypatch.setattr(demo, "benchmark_row", fake_row)
    assert run_json(capsys)["benchmark"] is None
    assert run_json(capsys, "--bench")["benchmark"]["speedup"] == 2.0
    run_json(capsys, "--bench-size", "128X7", "--repeats", "2")
    assert calls == [(2048, 32000, 3), (128, 7, 2)]


def test_benchmark_row_is_measured():
    """A real (tiny) benchmark row: positive times and the ratio of the two."""
    row = demo.benchmark_row(8, 11, repeats=2)
    assert row["tokenloss_ms"] > 0 and row["torch_ms"] > 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["tokenloss_ms"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bench-size", "2048"], "--bench-size must be NxV"),
        (["--bench-size", "0x5"], "--bench-size must be NxV"),
        (["--bench-size", "axb"], "--bench-size must be NxV"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(args, message, capsys):
    """A bad option is one 'Error: ...' line naming the option, exit status 2, no traceback."""
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err
