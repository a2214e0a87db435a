"""Writes what an evaluation found: per-token CSV/JSONL, a reliability-diagram PNG, a self-contained HTML report.

The HTML report shows the text with each token coloured by its surprisal (white: 0 bits, dark red:
``log2 V`` bits or more, the surprisal of a uniform guess); hovering a token shows its numbers and
the model's top guesses. It also lists the most surprising tokens, the summary numbers and the
reliability diagram (embedded as a PNG data URI when matplotlib is installed). It needs no network
and no scripts: one file to open in a browser or attach to a report. All text is HTML-escaped.

:class:`ReportWriter` writes them as the rows of a streamed run arrive
(:func:`tokenloss.evaluation.scoring.evaluate_stream`): the token files row by row, the coloured
text for the first :data:`HTML_TOKENS` tokens (a page of a large text would not open), the most
surprising tokens from all of them. Every file goes to a
temporary name and is renamed into place at the end: a run that fails or is interrupted leaves the
directory as it was. :func:`write_report` does the same for the scores of a whole text.

matplotlib (``pip install 'tokenloss[plot]'``) is imported only when a PNG is drawn, and draws
through its Agg canvas directly (no pyplot, no change to the user's backend).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import heapq
import html
import io
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenloss.evaluation.formatting import format_number
from tokenloss.evaluation.scoring import TextScores
from tokenloss.models import display_token
from tokenloss.utils.files import atomic_path, write_text_atomically

CSV_COLUMNS = (
    "index",
    "start",
    "end",
    "token_id",
    "token",
    "scored",
    "log_prob_nats",
    "surprisal_bits",
    "probability",
    "rank",
    "entropy_nats",
    "context_tokens",
    "top_tokens",
)
HTML_TOKENS = 20_000  # tokens shown coloured in report.html; the token files hold every one


def _csv_row(row: dict) -> list:
    top = "|".join(f"{display_token(t['token'])}={t['p']:.6g}" for t in row["top"])
    values = {**row, "token": display_token(row["token"]), "top_tokens": top}
    return ["" if values[c] is None else values[c] for c in CSV_COLUMNS]


def write_tokens_csv(scores: TextScores, path: str | Path) -> Path:
    """Writes one CSV row per token (columns :data:`CSV_COLUMNS`; top guesses as ``token=p|...``)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(row) for row in scores.rows())
    return path


def write_tokens_jsonl(scores: TextScores, path: str | Path) -> Path:
    """Writes one JSON object per token (:meth:`TextScores.rows`), one per line."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in scores.rows():
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def reliability_png(reliability: dict, *, title: str = "Reliability diagram") -> bytes:
    """A PNG of a reliability diagram: accuracy per confidence bin against the diagonal, counts below.

    Args:
        reliability: :meth:`tokenloss.evaluation.metrics.ReliabilityDiagram.to_dict` (``result["reliability"]``).

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the reliability diagram needs matplotlib: pip install 'tokenloss[plot]'") from None

    edges = reliability["edges"]
    width = edges[1] - edges[0]
    lefts = edges[:-1]
    accuracy = [a if a is not None else 0.0 for a in reliability["accuracy"]]
    confidence = [c if c is not None else 0.0 for c in reliability["confidence"]]
    counts = reliability["count"]
    figure = Figure(figsize=(5.0, 6.0), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lefts, accuracy, width=width, align="edge", color="#3b82f6", edgecolor="#1e3a8a", label="accuracy")
    gaps = [c - a if n else 0.0 for a, c, n in zip(accuracy, confidence, counts)]
    # Hatched, not filled: a translucent fill over the blue bars would make a colour the legend does not name.
    top.bar(
        lefts,
        gaps,
        bottom=accuracy,
        width=width,
        align="edge",
        fill=False,
        hatch="///",
        edgecolor="#dc2626",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="#374151", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy of top-1 guess")
    ece = reliability.get("ece")
    top.set_title(f"{title}\nECE = {ece:.4f}" if ece is not None else title)
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(lefts, counts, width=width, align="edge", color="#9ca3af", edgecolor="#4b5563")
    if any(counts):
        bottom.set_yscale("log")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("tokens")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_reliability_png(reliability: dict, path: str | Path, **kwargs) -> Path:
    """Writes :func:`reliability_png` to ``path``."""
    path = Path(path)
    path.write_bytes(reliability_png(reliability, **kwargs))
    return path


# --------------------------------------------------------------------------------------------
# HTML.


def _colour(bits: float, scale: float) -> str:
    share = 0.0 if math.isnan(bits) else max(0.0, min(1.0, bits / scale))
    lightness = 97 - 52 * share
    return f"hsl(0, 85%, {lightness:.1f}%)"


def _segments(scores: TextScores) -> list[tuple[int, int, list[int]]]:
    """Character spans to colour, each with the tokens it shows; tokens sharing characters merge."""
    return _segments_of(scores.offsets)


def _segments_of(offsets: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    order = sorted(range(len(offsets)), key=lambda i: (offsets[i][0], i))
    segments: list[list] = []
    for i in order:
        start, end = offsets[i]
        if segments and start < segments[-1][1]:
            segments[-1][1] = max(segments[-1][1], end)
            segments[-1][2].append(i)
        else:
            segments.append([start, end, [i]])
    return [(s, e, tokens) for s, e, tokens in segments]


def _token_tooltip(row: dict) -> str:
    token = display_token(row["token"])
    if not row["scored"]:
        return f"{token!r}: not scored (the first token has no context; a BOS token would give it one)"
    top = ", ".join(f"{display_token(t['token'])!r} {t['p']:.3f}" for t in row["top"])
    return (
        f"{token!r}  p = {row['probability']:.4g}  log p = {row['log_prob_nats']:.3f} nats"
        f"  surprisal = {row['surprisal_bits']:.2f} bits  rank {row['rank']}"
        f"  entropy = {row['entropy_nats']:.2f} nats  context {row['context_tokens']} tokens"
        f"\ntop guesses: {top}"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #111827; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7;
        border: 1px solid #e5e7eb; padding: 1rem; border-radius: 6px; }
.tok { border-radius: 2px; cursor: help; }
.tok:hover { outline: 2px solid #1f2937; }
.unscored { background: #e5e7eb; text-decoration: underline dotted; }
table { border-collapse: collapse; } td, th { padding: 0.2rem 0.8rem; text-align: left; }
th { border-bottom: 1px solid #9ca3af; } tr:nth-child(even) td { background: #f9fafb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend { display: inline-block; width: 16rem; height: 0.8rem; vertical-align: middle;
          background: linear-gradient(to right, hsl(0,85%,97%), hsl(0,85%,45%)); }
.ctx { font-family: ui-monospace, monospace; color: #4b5563; } .ctx b { color: #111827; }
.note { color: #4b5563; font-size: 0.9rem; }
"""


def render_html(
    scores: TextScores,
    result: dict,
    *,
    most_surprising: int = 20,
    reliability_png_bytes: bytes | None = None,
    title: str = "tokenloss eval",
) -> str:
    """The HTML report of a whole text's scores as a string (see the module doc); every piece of text is escaped.

    Args:
        scores: per-token scores of the whole text.
        result: the evaluation's numbers (:attr:`tokenloss.evaluation.scoring.Evaluation.result`).
        most_surprising: how many of the most surprising tokens to list.
        reliability_png_bytes: a PNG to embed (None: no picture).
        title: the page title.
    """
    rows = list(scores.rows())
    ranked = sorted((r for r in rows if r["scored"]), key=lambda r: -r["surprisal_bits"])[:most_surprising]
    surprising = [(row, _snippet(scores.text, row)) for row in ranked]
    return _render(
        rows,
        scores.text,
        result,
        surprising,
        vocab_size=scores.vocab_size,
        total_tokens=len(rows),
        reliability_png_bytes=reliability_png_bytes,
        title=title,
    )


def _snippet(text: str | Callable[[int, int], str], row: dict) -> tuple[str, str, str]:
    """30 characters before a token, the token's characters, 10 after."""
    get = text if callable(text) else (lambda a, b: text[max(0, a) : b])
    start, end = row["start"], row["end"]
    return get(max(0, start - 30), start), get(start, end), get(end, end + 10)


def _render(
    rows: list[dict],
    text: str,
    result: dict,
    surprising: list[tuple[dict, tuple[str, str, str]]],
    *,
    vocab_size: int,
    total_tokens: int,
    reliability_png_bytes: bytes | None,
    title: str,
) -> str:
    """The page: ``rows`` (the first tokens, maybe all) coloured over ``text`` (the characters they
    cover, from the text's start), the summary, the ``surprising`` rows with their snippets."""
    esc = html.escape
    scale = math.log2(max(vocab_size, 2))
    body: list[str] = []
    cursor = 0
    for start, end, tokens in _segments_of([(r["start"], r["end"]) for r in rows]):
        if start > cursor:
            body.append(esc(text[cursor:start]))
        start = max(start, cursor)
        piece = text[start:end]
        scored = [rows[i] for i in tokens if rows[i]["scored"]]
        tip = "\n".join(_token_tooltip(rows[i]) for i in tokens)
        if scored:
            bits = sum(r["surprisal_bits"] for r in scored)
            style = f"background:{_colour(bits, scale)}"
            if bits > 0.72 * scale:
                style += ";color:#fff"
            body.append(f'<span class="tok" style="{style}" title="{esc(tip)}">{esc(piece)}</span>')
        else:
            body.append(f'<span class="tok unscored" title="{esc(tip)}">{esc(piece)}</span>')
        cursor = max(cursor, end)
    if cursor < len(text):
        body.append(esc(text[cursor:]))

    summary_rows = [
        ("tokens scored", result.get("tokens"), ""),
        ("loss", result.get("loss_nats"), "nats per token"),
        ("perplexity", result.get("perplexity"), "per token: exp(loss) = 2 ** bits"),
        ("bits per token", result.get("bits_per_token"), "loss / ln 2"),
        ("bits per byte", result.get("bits_per_byte"), f"per UTF-8 byte ({result.get('bytes')} bytes)"),
        ("byte perplexity", result.get("byte_perplexity"), "per byte: 2 ** bits per byte"),
        ("word perplexity", result.get("word_perplexity"), f"per word ({result.get('words')} words, lm-eval count)"),
        ("accuracy", result.get("accuracy"), "top-1"),
        ("top-5 accuracy", result.get("top5_accuracy"), ""),
        ("mean entropy", result.get("entropy_nats"), "nats, of the predictions"),
        ("ECE", result.get("ece"), f"{result.get('n_bins')} equal-width bins"),
        ("log V", result.get("log_vocab"), f"loss of a uniform guess over V = {result.get('vocab_size')}"),
    ]
    summary = "".join(
        f'<tr><td>{esc(name)}</td><td class="num">{esc(format_number(value))}</td><td>{esc(note)}</td></tr>'
        for name, value, note in summary_rows
    )

    listed = []
    for place, (row, (before, own, after)) in enumerate(surprising, 1):
        context = f"{esc(display_token(before))}<b>{esc(display_token(own))}</b>{esc(display_token(after))}"
        guess = row["top"][0] if row["top"] else None
        guess_text = f"{display_token(guess['token'])!r} ({guess['p']:.3f})" if guess else ""
        listed.append(
            f'<tr><td class="num">{place}</td><td>{esc(repr(display_token(row["token"])))}</td>'
            f'<td class="num">{row["surprisal_bits"]:.2f}</td><td class="num">{row["probability"]:.2e}</td>'
            f'<td class="num">{row["rank"]}</td><td>{esc(guess_text)}</td><td class="ctx">{context}</td></tr>'
        )

    first = result.get("first_token") or {}
    if first.get("scored"):
        bos_note = f"The first token is {first.get('why', 'scored')} (prefix token id {result.get('prefix_token_id')})."
    else:
        bos_note = f"No BOS: the first token {display_token(first.get('text', ''))!r} has no context and is not scored."
    settings = (
        f"model {result.get('model')}; {total_tokens} tokens; {result.get('windows')} windows of "
        f"{result.get('max_length')}, stride {result.get('stride')}, {result.get('num_windows')} windows. {bos_note}"
    )
    shown = ""
    if len(rows) < total_tokens:
        shown = f" The first {len(rows)} of the {total_tokens} tokens are shown; tokens.csv holds every one."
    picture = ""
    if reliability_png_bytes:
        data = base64.b64encode(reliability_png_bytes).decode("ascii")
        picture = f'<h2>Calibration</h2><img alt="reliability diagram" src="data:image/png;base64,{data}">'

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}: {esc(str(result.get("model")))}</h1>
<p class="note">{esc(settings)}</p>
<h2>Summary</h2>
<table><tr><th>metric</th><th>value</th><th>normalised by / note</th></tr>{summary}</table>
<h2>The text, coloured by surprisal</h2>
<p class="note">0 bits <span class="legend"></span> {scale:.1f} bits (log2 V, a uniform guess) or more.
Hover over a token for its probability, rank, entropy and the model's top guesses.
Tokens that share characters (a byte-level tokenizer splitting one character) are shown together,
with their surprisals added.{esc(shown)}</p>
<div class="text">{"".join(body)}</div>
<h2>The {len(listed)} most surprising tokens</h2>
<table><tr><th>#</th><th>token</th><th>bits</th><th>p</th><th>rank</th><th>top guess</th><th>context</th></tr>
{"".join(listed)}</table>
{picture}
</body></html>
"""


class ReportWriter:
    """Writes ``tokens.csv``, ``tokens.jsonl``, ``summary.json``, ``reliability.png`` and ``report.html``
    into a directory as a run's rows arrive; a sink for :func:`tokenloss.evaluation.scoring.evaluate_stream`.

    Use it as a context manager: :meth:`finish` renames every file into place; leaving the block
    without :meth:`finish` (an error, Ctrl-C) removes the temporary files and leaves the directory
    as it was.

    Args:
        directory: created if missing.
        html_tokens: tokens shown coloured in the page, the first ones (default :data:`HTML_TOKENS`).
        most_surprising: how many of the most surprising tokens the page lists.
        plot: draw the PNG (needs matplotlib; skipped with no error when it is missing).

    Raises:
        FileExistsError: ``directory`` exists and is not a directory.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        html_tokens: int | None = None,
        most_surprising: int = 20,
        plot: bool = True,
    ) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"--out {str(self.directory)!r} exists and is not a directory")
        self.html_tokens = HTML_TOKENS if html_tokens is None else html_tokens
        self.most_surprising, self.plot = most_surprising, plot
        self._stack = contextlib.ExitStack()
        self._html_rows: list[dict] = []
        self._html_text: list[str] = []
        self._html_end = 0
        self._heap: list[tuple[float, int, dict, tuple[str, str, str]]] = []
        self.tokens = 0
        self.vocab_size = 2
        self.finished = False

    def __enter__(self) -> ReportWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        csv_tmp = self._stack.enter_context(atomic_path(self.directory / "tokens.csv"))
        jsonl_tmp = self._stack.enter_context(atomic_path(self.directory / "tokens.jsonl"))
        csv_handle = self._stack.enter_context(csv_tmp.open("w", newline="", encoding="utf-8"))
        self._jsonl = self._stack.enter_context(jsonl_tmp.open("w", encoding="utf-8"))
        self._csv = csv.writer(csv_handle)
        self._csv.writerow(CSV_COLUMNS)
        return self

    def __exit__(self, *exc_info) -> bool:
        if not self.finished:  # an error or an interrupt: the temporary files go, nothing is renamed
            error = exc_info if exc_info[0] is not None else (RuntimeError, RuntimeError("not finished"), None)
            self._stack.__exit__(*error)
        return False

    def __call__(self, rows: Iterable[dict], text: Callable[[int, int], str]) -> None:
        """Adds rows (in token order, every token once) and reads their characters from ``text(start, end)``."""
        for row in rows:
            self._csv.writerow(_csv_row(row))
            self._jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.tokens += 1
            if len(self._html_rows) < self.html_tokens:
                if row["end"] > self._html_end:
                    self._html_text.append(text(self._html_end, row["end"]))
                    self._html_end = row["end"]
                self._html_rows.append(row)
            if row["scored"]:
                item = (row["surprisal_bits"], -row["index"], row, _snippet(text, row))
                if len(self._heap) < self.most_surprising:
                    heapq.heappush(self._heap, item)
                elif item[:2] > self._heap[0][:2]:
                    heapq.heapreplace(self._heap, item)

    def finish(self, result: dict, *, vocab_size: int) -> dict[str, Path]:
        """Writes the summary, the PNG and the page, and renames every file into place; returns the paths by kind."""
        written = {"csv": self.directory / "tokens.csv", "jsonl": self.directory / "tokens.jsonl"}
        summary = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
        png = None
        if self.plot:
            try:
                png = reliability_png(result["reliability"])
            except ImportError:
                png = None
        surprising = [(row, snippet) for _, _, row, snippet in sorted(self._heap, key=lambda x: x[:2], reverse=True)]
        page = _render(
            self._html_rows,
            "".join(self._html_text),
            result,
            surprising,
            vocab_size=vocab_size,
            total_tokens=self.tokens,
            reliability_png_bytes=png,
            title="tokenloss eval",
        )
        self.finished = True
        self._stack.close()  # renames the token files into place
        written["summary"] = write_text_atomically(self.directory / "summary.json", summary)
        if png is not None:
            written["png"] = self.directory / "reliability.png"
            with atomic_path(written["png"]) as tmp:
                tmp.write_bytes(png)
        written["html"] = write_text_atomically(self.directory / "report.html", page)
        return written


def write_report(scores: TextScores, result: dict, directory: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Writes ``tokens.csv``, ``tokens.jsonl``, ``summary.json``, ``reliability.png`` and ``report.html``.

    Args:
        scores: per-token scores of the whole text.
        result: the evaluation's numbers.
        directory: created if missing.
        plot: draw the PNG (needs matplotlib; skipped with no error when it is missing).

    Returns:
        The paths written, by kind.

    Raises:
        FileExistsError: ``directory`` exists and is not a directory.
    """
    with ReportWriter(directory, html_tokens=max(HTML_TOKENS, len(scores)), plot=plot) as writer:
        writer(scores.rows(), lambda start, end: scores.text[max(0, start) : end])
        return writer.finish(result, vocab_size=scores.vocab_size)
