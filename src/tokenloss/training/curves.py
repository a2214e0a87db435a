"""Reading training-loss logs, checking them for common problems, and plotting them.

Three layers, each usable alone:

- **Readers** turn a log file into a :class:`Run` (training and validation loss against step):
  Hugging Face Trainer's ``trainer_state.json`` (its ``log_history``), JSON Lines (one object per
  line, e.g. ``tokenloss train``'s ``log.jsonl``) and CSV/TSV with a header. Columns are detected
  from common names (:data:`STEP_COLUMNS`, :data:`LOSS_COLUMNS`, :data:`VAL_COLUMNS`) or named by
  the caller. A malformed log raises :class:`LogFormatError` whose message starts with
  ``path:line:``.
- **Detectors** are pure functions of the numbers that return :class:`Finding` lists:
  :func:`detect_nonfinite` (NaN/inf), :func:`detect_spikes`, :func:`detect_no_learning` (the loss
  sits near ``log V``, the loss of a uniform guess, or does not fall) and
  :func:`detect_overfitting` (validation loss rises while training loss falls).
- **Plotting** (:func:`plot_runs`, matplotlib imported lazily with the Agg backend): loss against
  step with a perplexity axis, raw points faint under an optional EMA, the ``log V`` baseline and
  the best validation point marked.

Losses are taken to be in nats (what PyTorch and Hugging Face log); perplexity = ``exp(loss)``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenloss.utils.files import atomic_path

STEP_COLUMNS = ("step", "global_step", "steps", "iteration", "iter", "it", "trainer/global_step", "_step")
LOSS_COLUMNS = ("loss", "train_loss", "training_loss", "train/loss", "loss/train", "train_loss_step", "trainloss")
VAL_COLUMNS = (
    "val_loss",
    "eval_loss",
    "valid_loss",
    "validation_loss",
    "val/loss",
    "eval/loss",
    "loss/val",
    "loss/eval",
    "dev_loss",
    "test_loss",
    "valloss",
)
FORMATS = ("auto", "trainer_state", "jsonl", "csv")


class LogFormatError(ValueError):
    """A log that cannot be read; the message names the file and, where known, the line."""


@dataclass
class Series:
    """One curve: ``values[i]`` was logged at ``steps[i]`` (steps ascending as logged; values may be NaN/inf)."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        """The points whose value is finite."""
        pairs = [(s, v) for s, v in zip(self.steps, self.values) if math.isfinite(v)]
        return Series([s for s, _ in pairs], [v for _, v in pairs])


@dataclass
class Run:
    """The curves of one training run.

    Attributes:
        name: the label in plots and verdicts.
        source: where it was read from.
        train: training loss against step.
        val: validation loss against step (empty if the log has none).
        notes: remarks made while reading (e.g. which columns were used).
    """

    name: str
    source: str
    train: Series = field(default_factory=Series)
    val: Series = field(default_factory=Series)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    """A problem a detector saw.

    Attributes:
        kind: ``"nonfinite"``, ``"spike"``, ``"no_learning"`` or ``"overfitting"``.
        message: one sentence for people.
        step: the step it concerns (the first, where several), or None.
        series: ``"train"`` or ``"val"``.
    """

    kind: str
    message: str
    step: float | None = None
    series: str = "train"


# --------------------------------------------------------------------------------------------
# Readers


def read_log(
    path: str | Path,
    *,
    fmt: str = "auto",
    step_col: str | None = None,
    loss_col: str | None = None,
    val_col: str | None = None,
    name: str | None = None,
) -> Run:
    """Reads one training log into a :class:`Run`.

    Args:
        path: a ``trainer_state.json``, ``.jsonl``/``.ndjson``, ``.csv``/``.tsv`` file, or a directory
            holding ``trainer_state.json`` (or ``checkpoint-*/trainer_state.json``, the latest one)
            or ``log.jsonl``.
        fmt: one of :data:`FORMATS`; ``"auto"`` decides from the name and the first character.
        step_col, loss_col, val_col: column names for JSONL/CSV (default: detected, see the module
            docstring). ``val_col`` is optional in the log; ``loss_col`` or ``val_col`` must exist.
        name: the run's label (default: the file's parent directory and name).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a directory holds no known log.
        LogFormatError: the content is malformed (message ``path:line: what is wrong``).
        ValueError: an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = _resolve_log_path(Path(path))
    label = name or (f"{path.parent.name}/{path.name}" if path.parent.name else path.name)
    try:
        if fmt == "auto":
            with path.open(encoding="utf-8") as handle:
                fmt = _guess_format(path, handle.read(64 * 1024))
        if fmt == "trainer_state":  # one JSON document: read whole
            run = _read_trainer_state(path, path.read_text(encoding="utf-8"), label)
        else:  # JSON Lines and CSV are streamed: memory holds the numbers, not the text
            with path.open(encoding="utf-8", newline="") as handle:
                rows = _jsonl_rows(path, handle) if fmt == "jsonl" else _csv_rows(path, handle)
                run = _run_from_rows(path, rows, label, step_col=step_col, loss_col=loss_col, val_col=val_col)
    except UnicodeDecodeError as error:
        raise LogFormatError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    if not len(run.train) and not len(run.val):
        raise LogFormatError(f"{path}: no loss values found")
    return run


def _resolve_log_path(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such log file: {path}")
    if not path.is_dir():
        return path
    for candidate in ("trainer_state.json", "log.jsonl"):
        if (path / candidate).is_file():
            return path / candidate
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*/trainer_state.json")),
        key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0),
    )
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"{path} is a directory without trainer_state.json, checkpoint-*/ or log.jsonl")


def _guess_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json":
        return "trainer_state"
    stripped = text.lstrip()  # the first 64 KiB
    if stripped.startswith("{"):
        first_line = stripped.split("\n", 1)[0].strip()
        return "jsonl" if first_line.endswith("}") else "trainer_state"
    return "csv"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _parse_json(text: str, path: Path, lineno: int | None = None):
    """``json.loads(text)``, or a LogFormatError naming the file and line (``lineno`` for one line of a
    JSON Lines log; the decoder's own line for a whole document)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = lineno if lineno is not None else error.lineno
        raise LogFormatError(f"{path}:{line}: invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        where = f"{path}:{lineno}" if lineno is not None else f"{path}"
        raise LogFormatError(f"{where}: JSON nested too deeply to read") from None


def _read_trainer_state(path: Path, text: str, label: str) -> Run:
    state = _parse_json(text, path)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise LogFormatError(
            f"{path}:1: no 'log_history' list: not a Hugging Face trainer_state.json "
            "(use --format jsonl or csv for other logs)"
        )
    spans = _entry_spans(text, len(state["log_history"]))
    run = Run(name=label, source=str(path))
    for index, entry in enumerate(state["log_history"]):

        def where(key: str | None = None, index: int = index) -> str:
            return _entry_location(path, text, spans, index, key)

        if not isinstance(entry, dict):
            raise LogFormatError(f"{where()}: log_history entry {index} is not an object")
        for key, series in (("loss", run.train), ("eval_loss", run.val)):
            if key in entry and entry[key] is not None:
                if "step" not in entry:
                    raise LogFormatError(f"{where(key)}: log_history entry {index} has {key!r} but no 'step'")
                series.steps.append(_number(entry["step"], "step", where("step")))
                series.values.append(_number(entry[key], key, where(key)))
    run.notes.append("Hugging Face trainer_state.json: train 'loss', validation 'eval_loss'")
    return run


def _entry_spans(text: str, count: int) -> list[tuple[int, int]]:
    """Character span of each ``log_history`` entry, found by decoding the array one element at a time."""
    match = re.search(r'"log_history"\s*:\s*\[', text)
    if match is None:
        return []
    decoder, position, spans = json.JSONDecoder(), match.end(), []
    for _ in range(count):
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return []
        spans.append((position, end))
        position = end
    return spans


def _entry_location(path: Path, text: str, spans: list[tuple[int, int]], index: int, key: str | None) -> str:
    """``path:line`` of entry ``index``'s ``key`` (or of the entry), or ``path: log_history[index]``."""
    if not spans:
        return f"{path}: log_history[{index}]"
    start, end = spans[index]
    if key is not None:
        found = text.find(json.dumps(key), start, end)
        start = found if found >= 0 else start
    return f"{path}:{_line_of(text, start)}"


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line, parsed as it is read."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_json(line, path, lineno)
        if not isinstance(record, dict):
            raise LogFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _csv_rows(path: Path, handle) -> Iterator[tuple[int, dict]]:
    """``(line number, {column: cell})`` of each non-blank CSV/TSV row after the header, as it is read."""
    first = handle.readline()
    while first and not first.strip():
        first = handle.readline()
    if not first:
        raise LogFormatError(f"{path}: empty file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
    reader = csv.reader(itertools.chain([first], handle), delimiter=delimiter)
    header: list[str] | None = None
    try:
        for fields in reader:
            if not any(cell.strip() for cell in fields):
                continue
            if header is None:
                header = [cell.strip() for cell in fields]
                continue
            if len(fields) != len(header):
                raise LogFormatError(
                    f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)}"
                )
            yield reader.line_num, dict(zip(header, fields))
    except csv.Error as error:
        raise LogFormatError(f"{path}:{reader.line_num}: malformed CSV: {error}") from None


def _pick_column(columns: Iterable[str], explicit: str | None, candidates: Sequence[str], role: str, path: Path):
    columns = list(columns)
    if explicit is not None:
        if explicit not in columns:
            raise LogFormatError(f"{path}: no column {explicit!r} for the {role}; columns: {', '.join(columns)}")
        return explicit
    by_key = {_normalise(c): c for c in columns}
    for candidate in candidates:
        if _normalise(candidate) in by_key:
            return by_key[_normalise(candidate)]
    return None


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_UNSEEN = object()


class _Column:
    """The numbers of one candidate column, gathered in one pass: the row each came from, its value,
    and the first cell that was not a number (raised only if this column is the one used)."""

    def __init__(self) -> None:
        self.rows = array("q")
        self.values = array("d")
        self.bad: LogFormatError | None = None

    def add(self, row: int, value: object, key: str, where: str) -> None:
        try:
            number = _number(value, key, where)
        except LogFormatError as error:
            if self.bad is None:
                self.bad = error
            number = math.nan
        self.rows.append(row)
        self.values.append(number)


def _run_from_rows(path, rows, label, *, step_col, loss_col, val_col) -> Run:
    """One pass over ``rows``: keeps the numbers of every column that could be the step, the loss or
    the validation loss (by name), then picks the columns as :func:`read_log` documents."""
    wanted = {_normalise(c) for c in (*STEP_COLUMNS, *LOSS_COLUMNS, *VAL_COLUMNS)}
    explicit = {c for c in (step_col, loss_col, val_col) if c is not None}
    columns: dict[str, _Column | None] = {}  # every column seen, in order; a _Column where it may be used
    linenos = array("q")
    for index, (lineno, row) in enumerate(rows):
        linenos.append(lineno)
        for key, value in row.items():
            column = columns.get(key, _UNSEEN)
            if column is _UNSEEN:
                column = _Column() if key in explicit or _normalise(key) in wanted else None
                columns[key] = column
            if column is None or value is None:
                continue
            kind = type(value)
            if (kind is float or kind is int) and -1e300 < value < 1e300:  # the common case, unchecked
                column.rows.append(index)
                column.values.append(value)
            elif not _missing(value):
                column.add(index, value, key, f"{path}:{lineno}")
    kept = {key: column for key, column in columns.items() if column is not None}
    step_key = _pick_column(columns, step_col, STEP_COLUMNS, "step", path)
    loss_key = _pick_column(columns, loss_col, LOSS_COLUMNS, "training loss", path)
    val_key = _pick_column(columns, val_col, VAL_COLUMNS, "validation loss", path)
    if loss_key is None and val_key is None:
        raise LogFormatError(
            f"{path}: no loss column found among: {', '.join(columns) or '(none)'}; name it with --loss-col/--val-col"
        )
    run = Run(name=label, source=str(path))
    run.notes.append(f"columns: step={step_key or '(row number)'}, loss={loss_key or '-'}, val_loss={val_key or '-'}")
    steps_by_row = None
    if step_key is not None:
        step_column = kept.get(step_key, _Column())
        steps_by_row = array("d", [math.nan]) * len(linenos)
        has_step = bytearray(len(linenos))
        for row, value in zip(step_column.rows, step_column.values):
            steps_by_row[row], has_step[row] = value, 1
    for key, series in ((loss_key, run.train), (val_key, run.val)):
        column = kept.get(key) if key is not None else None
        if column is None:
            continue
        if column.bad is not None:
            raise column.bad
        for row, value in zip(column.rows, column.values):
            if steps_by_row is None:
                step = float(row)
            elif not has_step[row]:
                raise LogFormatError(f"{path}:{linenos[row]}: a {key!r} value but no {step_key!r}")
            else:
                step = steps_by_row[row]
                if math.isnan(step) and step_column.bad is not None:
                    raise step_column.bad
            series.steps.append(step)
            series.values.append(value)
    return run


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: object, key: str, where: str) -> float:
    if isinstance(value, bool):
        raise LogFormatError(f"{where}: {key!r} must be a number, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise LogFormatError(f"{where}: {key!r} is too large for a number: {str(value)[:20]}...") from None
    if isinstance(value, str):
        try:
            return float(value.strip())  # accepts "nan", "inf", "1e-3"
        except ValueError:
            pass
    raise LogFormatError(f"{where}: {key!r} must be a number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Smoothing and summary numbers


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's): ``smoothing`` in ``[0, 1)`` weights the past.

    Non-finite values are passed through as they are and do not enter the average.

    Raises:
        ValueError: ``smoothing`` outside ``[0, 1)``.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        average = smoothing * average + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)
        out.append(average / weight)
    return out


def best_point(series: Series) -> tuple[float, float] | None:
    """``(step, value)`` of the lowest finite value (the first, on ties), or None."""
    finite = series.finite()
    if not len(finite):
        return None
    index = min(range(len(finite)), key=lambda i: finite.values[i])
    return finite.steps[index], finite.values[index]


def _tail_level(values: Sequence[float], fraction: float = 0.1, minimum: int = 3) -> float:
    """Median of the last ``fraction`` of ``values`` (at least ``minimum`` of them): a noise-robust end level."""
    count = max(minimum, int(len(values) * fraction))
    return statistics.median(values[-count:])


def _head_level(values: Sequence[float], fraction: float = 0.1, minimum: int = 3) -> float:
    count = max(minimum, int(len(values) * fraction))
    return statistics.median(values[:count])


# --------------------------------------------------------------------------------------------
# Detectors: pure functions of the numbers


def detect_nonfinite(series: Series, *, label: str = "train") -> list[Finding]:
    """A finding if any value is NaN or infinite, naming the first such step and how many there are."""
    bad = [(s, v) for s, v in zip(series.steps, series.values) if not math.isfinite(v)]
    if not bad:
        return []
    step, value = bad[0]
    what = "validation loss" if label == "val" else "training loss"
    return [
        Finding(
            "nonfinite",
            f"{what} is {value} at step {_fmt_step(step)} ({len(bad)} non-finite point{'s' * (len(bad) > 1)}): "
            "training diverged or overflowed; lower the learning rate, clip gradients, or check the data",
            step,
            label,
        )
    ]


def detect_spikes(
    series: Series,
    *,
    window: int = 10,
    threshold: float = 6.0,
    min_jump: float = 0.25,
    label: str = "train",
    max_findings: int = 5,
) -> list[Finding]:
    """Points that jump far above the recent level: one finding per run of consecutive spike points.

    A finite point ``x`` is a spike when, with ``m`` the median and ``mad`` the median absolute
    deviation of the previous ``window`` finite points (all of them, from the third point on,
    while there are fewer), ``x - m > max(threshold * 1.4826 * mad, min_jump * |m|)``: far outside
    the recent noise *and* at least ``min_jump`` (relative) above it, so steady noise and falling
    losses never fire. Training and validation series are checked alike. At most ``max_findings``
    spikes are listed, then one finding that says there are more.
    """
    finite = series.finite()
    findings: list[Finding] = []
    in_spike = False
    values = finite.values
    for i in range(2, len(values)):
        recent = sorted(values[max(0, i - window) : i])
        half = len(recent) // 2
        level = recent[half] if len(recent) % 2 else (recent[half - 1] + recent[half]) / 2
        jump = values[i] - level
        is_spike = jump > min_jump * abs(level)  # the cheap test first: most points fail it
        if is_spike:
            mad = statistics.median([abs(v - level) for v in recent])
            is_spike = jump > threshold * 1.4826 * mad
        if is_spike and not in_spike and len(findings) == max_findings:
            findings.append(
                Finding(
                    "spike",
                    f"... and more {'validation ' if label == 'val' else ''}spikes after step "
                    f"{_fmt_step(findings[-1].step)} (only the first {max_findings} are listed)",
                    finite.steps[i],
                    label,
                )
            )
            break
        if is_spike and not in_spike:
            what = "validation loss" if label == "val" else "loss"
            findings.append(
                Finding(
                    "spike",
                    f"{what} spikes at step {_fmt_step(finite.steps[i])}: {finite.values[i]:.4g} against a recent "
                    f"level of {level:.4g} (+{100 * jump / max(abs(level), 1e-12):.0f}%); a bad batch or a too "
                    "high learning rate",
                    finite.steps[i],
                    label,
                )
            )
        in_spike = is_spike
    return findings


def detect_no_learning(
    series: Series, *, vocab_size: int | None = None, near: float = 0.1, min_drop: float = 0.02, label: str = "train"
) -> list[Finding]:
    """A finding when the loss ends near ``log V`` (a uniform guess) or hardly falls at all.

    The end level is the median of the last 10% of finite points (at least 3). It fires when
    ``vocab_size`` is given and the end level is above ``(1 - near) * log V``, or when the end level
    is more than ``(1 - min_drop)`` times the start level (median of the first 10%). Needs at least
    3 finite points.
    """
    values = series.finite().values
    if len(values) < 3:
        return []
    end, start = _tail_level(values), _head_level(values)
    what = "validation loss" if label == "val" else "loss"
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        log_v = math.log(vocab_size)
        if end > (1.0 - near) * log_v:
            relation = "above" if end > log_v else "near"
            return [
                Finding(
                    "no_learning",
                    f"{what} ends at {end:.4g}, {relation} log V = {log_v:.4g} (the loss of a uniform guess over "
                    f"{vocab_size} tokens): the model has learned next to nothing",
                    None,
                    label,
                )
            ]
    if end > (1.0 - min_drop) * start:
        return [
            Finding(
                "no_learning",
                f"{what} does not fall: it starts at {start:.4g} and ends at {end:.4g}; check the learning rate, "
                "that gradients reach the weights, and that the labels match the inputs",
                None,
                label,
            )
        ]
    return []


def detect_overfitting(
    train: Series, val: Series, *, min_rise: float = 0.02, min_evals_after: int = 2
) -> list[Finding]:
    """A finding when validation loss rises after its best point while training loss keeps falling.

    Fires when at least ``min_evals_after`` finite validation points follow the best one, the last
    of them is more than ``min_rise`` (relative) above the best, and the training loss near the
    last validation step (median of the up-to-5 training points at or before it) is below the
    training loss near the best step.
    """
    best = best_point(val)
    finite_val, finite_train = val.finite(), train.finite()
    if best is None or not len(finite_train):
        return []
    best_step, best_value = best
    after = [(s, v) for s, v in zip(finite_val.steps, finite_val.values) if s > best_step]
    if len(after) < min_evals_after:
        return []
    last_step, last_value = after[-1]
    if last_value <= best_value * (1.0 + min_rise):
        return []
    train_then, train_now = _train_near(finite_train, best_step), _train_near(finite_train, last_step)
    if train_then is None or train_now is None or not train_now < train_then:
        return []
    return [
        Finding(
            "overfitting",
            f"overfitting: validation loss rose from {best_value:.4g} (best, step {_fmt_step(best_step)}) to "
            f"{last_value:.4g} (step {_fmt_step(last_step)}) while training loss fell from {train_then:.4g} to "
            f"{train_now:.4g}; stop at the best step, add data or regularisation",
            best_step,
            "val",
        )
    ]


def _train_near(train: Series, step: float, count: int = 5) -> float | None:
    before = [v for s, v in zip(train.steps, train.values) if s <= step]
    return statistics.median(before[-count:]) if before else None


def check_run(run: Run, *, vocab_size: int | None = None) -> list[Finding]:
    """Every detector on ``run``: non-finite values and spikes (train and validation), no learning, overfitting."""
    findings: list[Finding] = []
    for label, series in (("train", run.train), ("val", run.val)):
        findings += detect_nonfinite(series, label=label)
    for label, series in (("train", run.train), ("val", run.val)):
        findings += detect_spikes(series, label=label)
    main = run.train if len(run.train.finite()) >= 3 else run.val
    findings += detect_no_learning(main, vocab_size=vocab_size, label="train" if main is run.train else "val")
    findings += detect_overfitting(run.train, run.val)
    return findings


def _fmt_step(step: float) -> str:
    return str(int(step)) if float(step).is_integer() else f"{step:g}"


def verdict(run: Run, findings: Sequence[Finding], *, vocab_size: int | None = None) -> str:
    """A few lines for people: what the run reached, then each finding (or that none was found)."""
    lines = [f"{run.name}:"]
    train = run.train.finite()
    if len(train):
        end = _tail_level(train.values)
        tail = max(3, int(len(train.values) * 0.1))
        lines.append(
            f"  train: {len(run.train)} points, "
            f"steps {_fmt_step(run.train.steps[0])}-{_fmt_step(run.train.steps[-1])}; "
            f"loss {train.values[0]:.4g} first, {train.values[-1]:.4g} last, "
            f"{end:.4g} end level (median of the last {min(tail, len(train.values))} points: steadier than the "
            f"last one; perplexity {_ppl(end)})"
        )
    best = best_point(run.val)
    if best is not None:
        lines.append(
            f"  val: {len(run.val)} points; best {best[1]:.4g} (perplexity {_ppl(best[1])}) "
            f"at step {_fmt_step(best[0])}"
        )
    if vocab_size is not None:
        lines.append(f"  log V = ln {vocab_size} = {math.log(vocab_size):.4g} (uniform guess)")
    if findings:
        lines += [f"  WARNING: {finding.message}" for finding in findings]
    else:
        lines.append("  OK: no overfitting, stalling, NaN/inf or spikes found")
    return "\n".join(lines)


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.4g}" if loss < 700 else "inf"


# --------------------------------------------------------------------------------------------
# Plotting


def plot_runs(
    runs: Sequence[Run],
    path: str | Path,
    *,
    vocab_size: int | None = None,
    smoothing: float = 0.0,
    title: str | None = None,
) -> Path:
    """Writes a PNG of loss against step for ``runs``, with a perplexity axis on the right.

    Per run (one colour): training loss as faint raw points with the EMA line on top
    (``smoothing`` > 0) or as a line (``smoothing`` = 0); validation loss dashed with markers and
    its best point starred and named in the legend. ``vocab_size`` adds the ``log V`` line (in the
    legend too: nothing is written on the lines). Non-finite values
    are left out of the lines and their first step marked by a red vertical line.

    Raises:
        ValueError: no runs, or ``smoothing`` outside ``[0, 1)``.
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    figure, axis = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        prefix = f"{run.name}: " if several else ""
        train = run.train
        if len(train):
            steps, values = np.asarray(train.steps, float), np.asarray(train.values, float)
            shown = np.where(np.isfinite(values), values, np.nan)
            if smoothing > 0:
                axis.plot(steps, shown, color=color, alpha=0.25, linewidth=0.8, marker=".", markersize=2)
                axis.plot(steps, ema(list(shown), smoothing), color=color, linewidth=1.8, label=f"{prefix}train (EMA)")
            else:
                axis.plot(steps, shown, color=color, linewidth=1.4, label=f"{prefix}train")
        if len(run.val):
            steps, values = np.asarray(run.val.steps, float), np.asarray(run.val.values, float)
            shown = np.where(np.isfinite(values), values, np.nan)
            axis.plot(
                steps, shown, color=color, linestyle="--", marker="o", markersize=3.5, label=f"{prefix}validation"
            )
            best = best_point(run.val)
            if best is not None:  # named in the legend: a label on the plot would sit on the lines
                axis.plot(
                    *best,
                    marker="*",
                    markersize=15,
                    color=color,
                    markeredgecolor="black",
                    zorder=5,
                    linestyle="none",
                    label=f"{prefix}best val {best[1]:.3f} (ppl {_ppl(best[1])}) @ step {_fmt_step(best[0])}",
                )
        for series in (run.train, run.val):
            bad = [s for s, v in zip(series.steps, series.values) if not math.isfinite(v)]
            if bad:
                axis.axvline(bad[0], color="red", linewidth=1, alpha=0.7)
                axis.text(
                    bad[0], 0.98, " NaN/inf", color="red", fontsize=8, va="top", transform=axis.get_xaxis_transform()
                )
                break
    if vocab_size is not None:
        log_v = math.log(vocab_size)
        axis.axhline(
            log_v,
            color="grey",
            linestyle=":",
            linewidth=1.2,
            label=f"log V = ln {vocab_size} = {log_v:.3f} (uniform guess)",
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    low, high = axis.get_ylim()
    axis.set_ylim(max(low, 0.0) if low >= -1e-9 else low, high)
    # exp stays monotonic up to float64's limit, so large losses keep their perplexity ticks
    perplexity = axis.secondary_yaxis(
        "right", functions=(lambda x: np.exp(np.clip(x, -700, 700)), lambda y: np.log(np.clip(y, 1e-300, None)))
    )
    low, high = axis.get_ylim()
    decades = (high - low) / math.log(10)
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)  # 1-2-5 ticks over a few decades, powers of ten beyond
    perplexity.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs, numticks=12))
    perplexity.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    perplexity.set_ylabel("perplexity = exp(loss)")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    axis.set_title(title or "loss against step")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the format from the real name: the temporary one ends in .tmp
        figure.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(figure)
    return path
