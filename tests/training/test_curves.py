"""Tests of the log readers, the detectors (each firing and silent), smoothing, and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tokenloss.training.curves import (
    LogFormatError,
    Run,
    Series,
    best_point,
    check_run,
    detect_no_learning,
    detect_nonfinite,
    detect_overfitting,
    detect_spikes,
    ema,
    plot_runs,
    read_log,
    verdict,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "curves"


def _falling(n: int = 50, start: float = 5.0, end: float = 2.0, noise: float = 0.03) -> Series:
    """A smoothly falling loss with a fixed zig-zag of +-noise (deterministic)."""
    values = [end + (start - end) * math.exp(-4 * i / n) + noise * (-1) ** i for i in range(n)]
    return Series([float(10 * i) for i in range(n)], values)


# ---------------------------------------------------------------------------------------------
# Readers


def test_reads_trainer_state():
    """trainer_state.json: train points from 'loss', validation from 'eval_loss', the summary entry ignored."""
    run = read_log(FIXTURES / "trainer_state.json")
    assert run.train.steps == [float(s) for s in range(10, 210, 10)]
    assert run.train.values[0] == pytest.approx(2.0 + 3.5 * math.exp(-0.2) + 0.03 * 0, abs=1e-4)
    assert run.val.steps == [50.0, 100.0, 150.0, 200.0]
    assert run.val.values[-1] == pytest.approx(2.1 + 3.3 * math.exp(-4), abs=1e-4)


def test_reads_a_directory_of_checkpoints(tmp_path):
    """A Trainer output directory: the latest checkpoint-*/trainer_state.json is read."""
    for step in (500, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"log_history": [{"loss": 1.0 / step, "step": step}]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    run = read_log(tmp_path)
    assert run.train.steps == [1500.0] and run.source.endswith("checkpoint-1500/trainer_state.json")


def test_reads_jsonl_with_sparse_validation():
    """JSONL: every line an object; val_loss only on some lines."""
    run = read_log(FIXTURES / "overfit.jsonl")
    assert len(run.train) == 11 and run.train.steps[-1] == 100.0
    assert run.val.steps == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]


def test_reads_csv_with_blank_cells():
    """CSV: train_loss and val_loss detected; blank validation cells are skipped."""
    run = read_log(FIXTURES / "metrics.csv")
    assert run.train.values[:2] == [4.2, 4.0]
    assert run.val.steps == [0.0, 50.0, 100.0] and run.val.values == [4.0, 3.0, 2.0]
    assert "step=step, loss=train_loss, val_loss=val_loss" in run.notes[0]


def test_reads_csv_with_named_columns():
    """Unusual column names: iteration and train/loss are detected, valid/nll is named by the caller."""
    detected = read_log(FIXTURES / "custom_columns.csv")
    assert len(detected.train) == 5 and len(detected.val) == 0
    named = read_log(FIXTURES / "custom_columns.csv", val_col="valid/nll", loss_col="train/loss", step_col="iteration")
    assert named.val.values == pytest.approx([3.1, 3.0, 2.9, 2.8, 2.7])


def test_reads_tsv_with_nan():
    """TSV: tab separated; 'nan' cells are read as NaN (for the detector to see)."""
    run = read_log(FIXTURES / "diverged.tsv")
    assert len(run.train) == 18 and math.isnan(run.train.values[-1])


def test_rows_without_step_column_use_the_row_number(tmp_path):
    """No step column: the record index is the step, and the note says so."""
    path = tmp_path / "l.jsonl"
    path.write_text('{"loss": 3}\n{"loss": 2}\n')
    run = read_log(path)
    assert run.train.steps == [0.0, 1.0] and "row number" in run.notes[0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad.jsonl", r"bad\.jsonl:3: invalid JSON"),
        ("bad_not_object.jsonl", r"bad_not_object\.jsonl:2: expected a JSON object"),
        ("bad_fields.csv", r"bad_fields\.csv:4: 3 fields, but the header has 2"),
        ("bad_value.csv", r"bad_value\.csv:3: 'loss' must be a number, got 'four'"),
        ("trainer_state_bad_value.json", r"trainer_state_bad_value\.json:36: 'loss' must be a number, got 'abc'"),
        ("trainer_state_truncated.json", r"trainer_state_truncated\.json:\d+: invalid JSON"),
        ("no_loss.csv", r"no_loss\.csv: no loss column found among: step, accuracy"),
    ],
)
def test_malformed_logs_name_file_and_line(name, message):
    """Each malformed log raises LogFormatError (a ValueError) naming the file and the line."""
    with pytest.raises(LogFormatError, match=message):
        read_log(FIXTURES / name)


def test_missing_file_and_wrong_kind_of_json(tmp_path):
    """A missing path is FileNotFoundError; a JSON file without log_history says what it expected."""
    with pytest.raises(FileNotFoundError, match="no such log file"):
        read_log(tmp_path / "absent.json")
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(LogFormatError, match=r"x\.json:1: no 'log_history' list"):
        read_log(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="directory without"):
        read_log(tmp_path)


# ---------------------------------------------------------------------------------------------
# Detectors: each fires on the problem and stays silent on a healthy curve


def test_nonfinite_fires_on_nan_and_inf_only():
    """NaN/inf values are reported with the first step and the count."""
    healthy = _falling()
    assert detect_nonfinite(healthy) == []
    broken = Series(healthy.steps[:5], [3.0, 2.9, math.nan, math.inf, 2.5])
    (finding,) = detect_nonfinite(broken)
    assert finding.kind == "nonfinite" and finding.step == 20.0 and "2 non-finite" in finding.message


def test_spike_fires_on_a_jump_and_not_on_noise():
    """A one-off jump to 3x the level is a spike; a noisy but falling curve is not."""
    healthy = _falling(noise=0.1)
    assert detect_spikes(healthy) == []
    values = list(healthy.values)
    values[30] = 3 * values[29]
    values[31] = 3 * values[29]  # two consecutive points: one finding
    (finding,) = detect_spikes(Series(healthy.steps, values))
    assert finding.kind == "spike" and finding.step == 300.0


def test_spike_fires_from_the_first_points():
    """A training loss of 50 at step 3 is a spike (too early for a full window of history)."""
    (finding,) = detect_spikes(Series([0.0, 1.0, 2.0, 3.0, 4.0], [5.5, 5.3, 5.1, 50.0, 4.9]))
    assert finding.step == 3.0 and "50" in finding.message


def test_validation_spikes_are_found_like_training_ones():
    """A validation loss of 1e6 among a falling validation curve is reported by check_run."""
    train = _falling()
    val = Series([0.0, 50.0, 100.0, 150.0], [5.5, 4.0, 1e6, 3.5])
    findings = check_run(Run(name="r", source="test", train=train, val=val))
    spikes = [f for f in findings if f.kind == "spike"]
    assert [(f.series, f.step) for f in spikes] == [("val", 100.0)]
    assert "validation loss spikes" in spikes[0].message


def test_spike_ignores_a_fast_fall():
    """A loss that drops quickly at the start never reads as a spike."""
    steep = Series([float(i) for i in range(30)], [10.0 * 0.7**i + 1 for i in range(30)])
    assert detect_spikes(steep) == []


def test_no_learning_fires_near_log_v():
    """A loss that stays near log V (V = 256) fires; a learned one does not."""
    flat = Series([float(i) for i in range(20)], [math.log(256) - 0.01 * (i % 2) for i in range(20)])
    (finding,) = detect_no_learning(flat, vocab_size=256)
    assert finding.kind == "no_learning" and "log V = 5.545" in finding.message
    assert detect_no_learning(_falling(), vocab_size=256) == []


def test_no_learning_fires_on_a_flat_loss_without_vocab_size():
    """Without V: a loss that does not fall fires, a falling one does not."""
    flat = Series([float(i) for i in range(20)], [2.0 + 0.01 * (i % 3) for i in range(20)])
    (finding,) = detect_no_learning(flat)
    assert "does not fall" in finding.message
    assert detect_no_learning(_falling()) == []


def test_overfitting_fires_when_val_rises_while_train_falls():
    """Validation rises 10% after its best point while training keeps falling: overfitting, at the best step."""
    train = _falling(n=50)
    val = Series([0.0, 100.0, 200.0, 300.0, 400.0], [4.0, 2.5, 2.3, 2.4, 2.55])
    (finding,) = detect_overfitting(train, val)
    assert finding.kind == "overfitting" and finding.step == 200.0
    assert "2.3" in finding.message and "2.55" in finding.message


@pytest.mark.parametrize(
    "val_values",
    [
        [4.0, 2.5, 2.3, 2.2, 2.1],  # still improving
        [4.0, 2.5, 2.3, 2.31, 2.32],  # flat within 2%
        [4.0, 2.5, 2.3, 2.2, 2.6],  # one rise right after the best (2.2): too early to call
    ],
)
def test_overfitting_silent_when_val_does_not_rise_for_long(val_values):
    """Improving, flat, or a single evaluation after the best: no overfitting finding."""
    val = Series([0.0, 100.0, 200.0, 300.0, 400.0], val_values)
    assert detect_overfitting(_falling(n=50), val) == []


def test_overfitting_silent_when_train_rises_too():
    """Both losses rising is divergence, not overfitting."""
    rising = Series([float(10 * i) for i in range(50)], [2.0 + 0.02 * i for i in range(50)])
    val = Series([0.0, 100.0, 200.0, 300.0, 400.0], [4.0, 2.5, 2.3, 2.4, 2.55])
    assert detect_overfitting(rising, val) == []


def test_check_run_and_verdict_on_fixtures():
    """The fixtures: the healthy log is OK, the overfitting log warns, the diverged log reports NaN."""
    healthy = read_log(FIXTURES / "trainer_state.json")
    assert check_run(healthy, vocab_size=256) == []
    assert "OK: no overfitting" in verdict(healthy, [], vocab_size=256)
    overfit = read_log(FIXTURES / "overfit.jsonl")
    assert [f.kind for f in check_run(overfit)] == ["overfitting"]
    diverged = read_log(FIXTURES / "diverged.tsv")
    findings = check_run(diverged)
    assert [f.kind for f in findings] == ["nonfinite"]
    assert "WARNING: training loss is nan at step 80" in verdict(diverged, findings)


# ---------------------------------------------------------------------------------------------
# Smoothing, best point, plot


def test_ema_is_debiased_and_skips_nonfinite():
    """The first value is kept as is (debiased), constants stay constant, NaN passes through untouched."""
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = ema([1.0, 3.0, math.nan, 3.0], 0.5)
    assert smoothed[0] == 1.0 and smoothed[1] == pytest.approx((0.5 * 1 * 0.5 + 0.5 * 3) / 0.75)
    assert math.isnan(smoothed[2])
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def test_best_point_skips_nan():
    """The lowest finite value and its step."""
    assert best_point(Series([1.0, 2.0, 3.0], [3.0, math.nan, 2.5])) == (3.0, 2.5)
    assert best_point(Series()) is None


def test_plot_writes_a_png(tmp_path):
    """Two runs, smoothing, log V and a NaN: a PNG file comes out."""
    pytest.importorskip("matplotlib")
    runs = [read_log(FIXTURES / "trainer_state.json"), read_log(FIXTURES / "diverged.tsv")]
    path = plot_runs(runs, tmp_path / "c.png", vocab_size=256, smoothing=0.6, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs([], tmp_path / "d.png")


def test_run_dataclass_defaults_are_independent():
    """Each Run gets its own series (no shared mutable defaults)."""
    a, b = Run("a", "a"), Run("b", "b")
    a.train.steps.append(1.0)
    assert b.train.steps == []


def test_jsonl_and_csv_logs_are_streamed(tmp_path, monkeypatch):
    """JSON Lines and CSV are read line by line (never the whole text at once): a big log's memory is
    its numbers. read_text is only for trainer_state.json."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 5.0 - i / 1000}) + "\n" for i in range(3000)))
    table = tmp_path / "log.csv"
    table.write_text("step,loss\n" + "".join(f"{i},{5.0 - i / 1000}\n" for i in range(3000)))

    def refuse(*args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(Path, "read_text", refuse)
    for path in (log, table):
        run = read_log(path)
        assert len(run.train) == 3000 and run.train.values[-1] == pytest.approx(5.0 - 2999 / 1000)


def test_numbers_too_large_and_deep_nesting_are_format_errors(tmp_path):
    """An integer of 400 digits or JSON nested 100000 deep: one LogFormatError naming the file and line."""
    big = tmp_path / "big.jsonl"
    big.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": ' + "9" * 400 + "}\n")
    with pytest.raises(LogFormatError, match=r"big.jsonl:2: 'loss' is too large"):
        read_log(big)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"step": 0, "loss": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(LogFormatError, match=r"deep.jsonl:1: JSON nested too deeply"):
        read_log(deep)
