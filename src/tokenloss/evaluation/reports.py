"""Writes what an evaluation found: per-token CSV/JSONL, a reliability-diagram PNG, a self-contained HTML report.

The HTML report shows the text with each token coloured by its surprisal (white: 0 bits, dark red:
``log2 V`` bits or more, the surprisal of a uniform guess); hovering a token shows its numbers and
the model's top guesses. It also lists the most surprising tokens, the summary numbers and the
reliability diagram (embedded as a PNG data URI when matplotlib is installed). It needs no network
and no scripts: one file to open in a browser or attach to a report. All text is HTML-escaped.

matplotlib (``pip install 'tokenloss[plot]'``) is imported only when a PNG is drawn, and draws
through its Agg canvas directly (no pyplot, no change to the user's backend).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
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


def write_tokens_csv(scores: TextScores, path: str | Path) -> Path:
    """Writes one CSV row per token (columns :data:`CSV_COLUMNS`; top guesses as ``token=p|...``)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in scores.rows():
            top = "|".join(f"{display_token(t['token'])}={t['p']:.6g}" for t in row["top"])
            values = {**row, "token": display_token(row["token"]), "top_tokens": top}
            writer.writerow(["" if values[c] is None else values[c] for c in CSV_COLUMNS])
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
    order = sorted(range(len(scores)), key=lambda i: (scores.offsets[i][0], i))
    segments: list[list] = []
    for i in order:
        start, end = scores.offsets[i]
        if segments and start < segments[-1][1]:
            segments[-1][1] = max(segments[-1][1], end)
            segments[-1][2].append(i)
        else:
            segments.append([start, end, [i]])
    return [(s, e, tokens) for s, e, tokens in segments]


def _token_tooltip(scores: TextScores, row: dict) -> str:
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
    """The HTML report as a string (see the module doc); every piece of text is escaped.

    Args:
        scores: per-token scores of the whole text.
        result: the evaluation's numbers (:attr:`tokenloss.evaluation.scoring.Evaluation.result`).
        most_surprising: how many of the most surprising tokens to list.
        reliability_png_bytes: a PNG to embed (None: no picture).
        title: the page title.
    """
    esc = html.escape
    rows = list(scores.rows())
    scale = math.log2(max(scores.vocab_size, 2))
    parts = []
    for start, end, tokens in _segments(scores):
        parts.append((start, end, tokens))
    body: list[str] = []
    cursor = 0
    for start, end, tokens in parts:
        if start > cursor:
            body.append(esc(scores.text[cursor:start]))
        start = max(start, cursor)
        piece = scores.text[start:end]
        scored = [rows[i] for i in tokens if rows[i]["scored"]]
        tip = "\n".join(_token_tooltip(scores, rows[i]) for i in tokens)
        if scored:
            bits = sum(r["surprisal_bits"] for r in scored)
            style = f"background:{_colour(bits, scale)}"
            if bits > 0.72 * scale:
                style += ";color:#fff"
            body.append(f'<span class="tok" style="{style}" title="{esc(tip)}">{esc(piece)}</span>')
        else:
            body.append(f'<span class="tok unscored" title="{esc(tip)}">{esc(piece)}</span>')
        cursor = max(cursor, end)
    if cursor < len(scores.text):
        body.append(esc(scores.text[cursor:]))

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

    ranked = sorted((r for r in rows if r["scored"]), key=lambda r: -r["surprisal_bits"])[:most_surprising]
    surprising = []
    for place, row in enumerate(ranked, 1):
        before = scores.text[max(0, row["start"] - 30) : row["start"]]
        after = scores.text[row["end"] : row["end"] + 10]
        context = (
            f"{esc(display_token(before))}<b>{esc(display_token(scores.text[row['start'] : row['end']]))}</b>"
            f"{esc(display_token(after))}"
        )
        guess = row["top"][0] if row["top"] else None
        guess_text = f"{display_token(guess['token'])!r} ({guess['p']:.3f})" if guess else ""
        surprising.append(
            f'<tr><td class="num">{place}</td><td>{esc(repr(display_token(row["token"])))}</td>'
            f'<td class="num">{row["surprisal_bits"]:.2f}</td><td class="num">{row["probability"]:.2e}</td>'
            f'<td class="num">{row["rank"]}</td><td>{esc(guess_text)}</td><td class="ctx">{context}</td></tr>'
        )

    first = result.get("first_token") or scores.first_token()
    bos_note = (
        f"BOS token (id {scores.bos_token_id}) before every window: the first token is scored too."
        if scores.bos
        else f"No BOS: the first token {display_token(first.get('text', ''))!r} has no context and is not scored."
    )
    settings = (
        f"model {result.get('model', scores.model_name)}; {len(scores)} tokens; windows of {scores.max_length}, "
        f"stride {scores.stride}, {result.get('windows', scores.num_windows)} windows. {bos_note}"
    )
    picture = ""
    if reliability_png_bytes:
        data = base64.b64encode(reliability_png_bytes).decode("ascii")
        picture = f'<h2>Calibration</h2><img alt="reliability diagram" src="data:image/png;base64,{data}">'

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}: {esc(str(result.get("model", scores.model_name)))}</h1>
<p class="note">{esc(settings)}</p>
<h2>Summary</h2>
<table><tr><th>metric</th><th>value</th><th>normalised by / note</th></tr>{summary}</table>
<h2>The text, coloured by surprisal</h2>
<p class="note">0 bits <span class="legend"></span> {scale:.1f} bits (log2 V, a uniform guess) or more.
Hover over a token for its probability, rank, entropy and the model's top guesses.
Tokens that share characters (a byte-level tokenizer splitting one character) are shown together,
with their surprisals added.</p>
<div class="text">{"".join(body)}</div>
<h2>The {len(ranked)} most surprising tokens</h2>
<table><tr><th>#</th><th>token</th><th>bits</th><th>p</th><th>rank</th><th>top guess</th><th>context</th></tr>
{"".join(surprising)}</table>
{picture}
</body></html>
"""


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
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"--out {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    written = {
        "csv": write_tokens_csv(scores, directory / "tokens.csv"),
        "jsonl": write_tokens_jsonl(scores, directory / "tokens.jsonl"),
    }
    summary_path = directory / "summary.json"
    write_text_atomically(summary_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    written["summary"] = summary_path
    png = None
    if plot:
        try:
            png = reliability_png(result["reliability"])
        except ImportError:
            png = None
        if png is not None:
            written["png"] = directory / "reliability.png"
            with atomic_path(written["png"]) as tmp:
                tmp.write_bytes(png)
    html_path = directory / "report.html"
    write_text_atomically(html_path, render_html(scores, result, reliability_png_bytes=png))
    written["html"] = html_path
    return written
