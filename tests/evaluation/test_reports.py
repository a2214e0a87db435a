"""tokenloss.evaluation.reports: per-token CSV/JSONL, the reliability PNG, and the self-contained, escaped HTML."""

from __future__ import annotations

import csv
import html.parser
import json
import math

import pytest
import torch

from tokenloss.evaluation import reports
from tokenloss.evaluation.scoring import evaluate
from tokenloss.models import ByteLM
from tokenloss.models.bytegpt import ByteGPT, GPTConfig

# Markup, quotes, a comma, a newline, multi-byte characters: everything a report must escape or keep.
NASTY = 'Tom & "Jerry" <script>alert(1)</script>, it\'s\nnaïve 🙂 <b>bold</b>'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluation():
    torch.manual_seed(0)
    module = ByteGPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.nn.init.normal_(module.lm_head.weight, std=0.5)
    return evaluate(ByteLM(module, name="tiny <model>"), NASTY, stride=8)


def test_csv_has_one_row_per_token(evaluation, tmp_path):
    """tokens.csv: a header and one row per token, whose numbers are the scores; quotes and newlines survive."""
    scores = evaluation.scores
    path = reports.write_tokens_csv(scores, tmp_path / "tokens.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(reports.CSV_COLUMNS)
    assert len(rows) == len(scores) == len(NASTY.encode())
    assert rows[0]["scored"] == "False" and rows[0]["log_prob_nats"] == ""
    for row, log_prob, rank in zip(rows[1:], scores.log_prob[1:].tolist(), scores.rank[1:].tolist()):
        assert float(row["log_prob_nats"]) == pytest.approx(log_prob, rel=1e-6)
        assert float(row["surprisal_bits"]) == pytest.approx(-log_prob / math.log(2), rel=1e-6)
        assert int(row["rank"]) == rank
    assert [row["token"] for row in rows[:5]] == ["T", "o", "m", " ", "&"]
    assert rows[NASTY.index("\n")]["token"] == "\\n"  # control characters are shown escaped
    assert rows[NASTY.index('"')]["token"] == '"'


def test_jsonl_round_trips(evaluation, tmp_path):
    """tokens.jsonl: one JSON object per token with the top guesses."""
    scores = evaluation.scores
    path = reports.write_tokens_jsonl(scores, tmp_path / "tokens.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(scores)
    assert rows[2]["token"] == "m" and rows[2]["scored"] is True
    assert len(rows[2]["top"]) == 5 and rows[2]["top"][0]["p"] >= rows[2]["top"][1]["p"]
    assert rows[2]["entropy_nats"] == pytest.approx(scores.entropy[2].item(), rel=1e-6)


class _Checker(html.parser.HTMLParser):
    """Collects tags and checks that every opened span/table/div closes."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_escaped_self_contained_and_well_formed(evaluation):
    """No raw markup from the text, no external resources, balanced tags; the text reads back intact."""
    page = reports.render_html(evaluation.scores, evaluation.result, reliability_png_bytes=b"\x89PNG fake")
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    tags = [tag for tag, _ in checker.tags]
    assert "script" not in tags and "b" in tags  # the only <b> tags are the report's own (context marks)
    spans = [attrs for tag, attrs in checker.tags if tag == "span" and "tok" in attrs.get("class", "")]
    # the text panel holds every character: multi-byte characters are one span of their bytes
    panel = page.split('<div class="text">', 1)[1].split("</div>", 1)[0]
    inner = _Checker()
    inner.feed(panel)
    assert "".join(inner.text) == NASTY
    assert len(spans) == len(NASTY)
    assert "unscored" in spans[0]["class"] and "not scored" in spans[0]["title"]
    assert "surprisal" in spans[1]["title"] and "top guesses" in spans[1]["title"]
    image = [attrs for tag, attrs in checker.tags if tag == "img"]
    assert image and image[0]["src"].startswith("data:image/png;base64,")


def test_html_lists_the_most_surprising_tokens_in_order(evaluation):
    """The "most surprising" table holds the tokens of largest surprisal, largest first."""
    scores = evaluation.scores
    page = reports.render_html(scores, evaluation.result, most_surprising=5)
    table = page.split("most surprising tokens</h2>", 1)[1]
    listed = [float(cell.split("</td>")[0]) for cell in table.split('<td class="num">')[2::4][:5]]
    expected = sorted(scores.surprisal_bits[scores.scored].tolist(), reverse=True)[:5]
    assert listed == pytest.approx([round(x, 2) for x in expected], abs=0.006)


def test_multibyte_tokens_merge_into_one_segment(evaluation):
    """Byte tokens of one character share a span: one segment, surprisal added, each byte in the tooltip."""
    scores = evaluation.scores
    segments = reports._segments(scores)
    emoji = NASTY.index("🙂")
    segment = [s for s in segments if s[0] == emoji][0]
    assert segment[1] == emoji + 1 and len(segment[2]) == 4


def test_reliability_png(evaluation, tmp_path):
    """The reliability diagram is a PNG image (matplotlib, Agg canvas)."""
    pytest.importorskip("matplotlib")
    path = reports.write_reliability_png(evaluation.result["reliability"], tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_writes_every_file(evaluation, tmp_path):
    """write_report creates the directory and the five files; a file in the way is an error."""
    pytest.importorskip("matplotlib")
    written = reports.write_report(evaluation.scores, evaluation.result, tmp_path / "new" / "dir")
    assert {path.name for path in written.values()} == {
        "tokens.csv",
        "tokens.jsonl",
        "summary.json",
        "reliability.png",
        "report.html",
    }
    assert json.loads(written["summary"].read_text())["tokens"] == evaluation.result["tokens"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        reports.write_report(evaluation.scores, evaluation.result, blocker)
