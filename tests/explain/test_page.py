"""End-to-end tests of the explain page in headless Chromium: every widget, the JS math against tokenloss, phone width.

Needs Debian's ``chromium`` at /usr/bin/chromium (or $TOKENLOSS_CHROMIUM) and Playwright for Python;
skipped otherwise. Screenshots of each widget go to ``test-artifacts/explain/``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from pathlib import Path

import pytest
import torch

import tokenloss
from tokenloss.evaluation.scoring import score_text
from tokenloss.explain.vectors import generate_vectors
from tokenloss.models import load_model

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TOKENLOSS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "explain"
FLOAT32_EPS = 2.0**-23

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page_model(tiny_model):
    """The built-in demo model that the page uses by default; the tiny random one where it is not installed."""
    try:
        return load_model(None)
    except FileNotFoundError:
        return tiny_model


@pytest.fixture(scope="module")
def server(page_model, serve):
    with serve(model=page_model) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Console:
    """Console errors and uncaught exceptions of a page, collected for the test to assert on."""

    def __init__(self, page):
        self.errors = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))


class Tab:
    """One browser context and page, reused by the tests of a module (a fresh context costs seconds)."""

    def __init__(self, browser, server, **context_options):
        self.server = server
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.console = Console(self.page)

    def open(self):
        """The page loaded afresh, with empty local storage and no errors recorded yet."""
        self.page.goto(self.server.url)
        self.page.evaluate("window.localStorage.clear()")
        self.page.reload()
        self.page.wait_for_selector("html[data-ready=true]")
        self.console.errors.clear()
        return self.page


@pytest.fixture(scope="module")
def laptop(browser, server):
    tab = Tab(browser, server, viewport={"width": 1280, "height": 900})
    yield tab
    tab.context.close()


@pytest.fixture(scope="module")
def phone(browser, server):
    tab = Tab(browser, server, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    yield tab
    tab.context.close()


@pytest.fixture
def page(laptop):
    page = laptop.open()
    yield page
    assert laptop.console.errors == []


def number(page, selector: str) -> float:
    """The number shown in an element (the first one in its text)."""
    match = re.search(r"-?\d+(\.\d+)?", page.locator(selector).inner_text())
    assert match, f"no number in {selector}: {page.locator(selector).inner_text()!r}"
    return float(match.group())


def shown_logits(page) -> list[float]:
    return [float(v) for v in page.locator(".logit-track").evaluate_all("els => els.map(e => e.ariaValueNow)")]


def target_index(page) -> int:
    return int(page.locator("input[name=target]:checked").get_attribute("value"))


def expected_loss(page) -> float:
    """tokenloss's loss for the logits and target the page shows."""
    logits = torch.tensor([shown_logits(page)])
    return float(tokenloss.cross_entropy(logits, torch.tensor([target_index(page)])))


def screenshot(page, selector: str, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator(selector).screenshot(path=str(ARTIFACTS / name))


def test_js_math_agrees_with_tokenloss(page):
    """window.tokenlossMath gives tokenloss's numbers on the vectors Python generates (incl. logits of +-1000)."""
    vectors = generate_vectors()
    got = page.evaluate(
        """v => {
            const M = window.tokenlossMath;
            return {
                rows: v.rows.map(r => ({loss: M.crossEntropy(r.logits, r.target), lse: M.logSumExp(r.logits),
                                        softmax: M.softmax(r.logits), gradient: M.gradient(r.logits, r.target)})),
                batches: v.batches.map(b => M.meanCrossEntropy(b.rows, b.targets, b.ignore_index)),
                sentences: v.sentences.map(s => ({losses: s.probs.map(M.lossFromProb),
                                                  mean: M.meanLossFromProbs(s.probs)})),
            };
        }""",
        vectors,
    )
    f64 = torch.float64
    for want, have in zip(vectors["rows"], got["rows"]):
        # tokenloss works in float32: its logsumexp is rounded at the scale of the largest logit.
        atol = 1e-6 + 4 * FLOAT32_EPS * max(1.0, max(abs(z) for z in want["logits"]))
        for key, name in (("loss", "loss"), ("logsumexp", "lse")):
            assert math.isfinite(have[name]), want["name"]
            torch.testing.assert_close(float(have[name]), want[key], rtol=0, atol=atol, msg=f"{want['name']}: {name}")
        torch.testing.assert_close(torch.tensor(have["softmax"], dtype=f64), torch.tensor(want["softmax"], dtype=f64))
        torch.testing.assert_close(
            torch.tensor(have["gradient"], dtype=f64), torch.tensor(want["gradient"], dtype=f64), rtol=0, atol=atol
        )
    for want, have in zip(vectors["batches"], got["batches"]):
        atol = 1e-6 + 4 * FLOAT32_EPS * max(1.0, max(abs(z) for row in want["rows"] for z in row))
        torch.testing.assert_close(float(have), want["mean_loss"], rtol=0, atol=atol, msg=want["name"])
    for want, have in zip(vectors["sentences"], got["sentences"]):
        torch.testing.assert_close(torch.tensor(have["losses"], dtype=f64), torch.tensor(want["losses"], dtype=f64))
        torch.testing.assert_close(float(have["mean"]), want["mean_loss"], rtol=1e-6, atol=1e-6)
    assert len(got["rows"]) == len(vectors["rows"]) >= 20


def test_page_spells_numbers_as_the_terminal_does(page):
    """window.tokenlossMath.formatNumber gives format_number's text on every vector (one formatter everywhere)."""
    cases = generate_vectors()["formats"]
    got = page.evaluate("v => v.map(c => window.tokenlossMath.formatNumber(c.value, c.digits))", cases)
    assert got == [case["text"] for case in cases]


def test_drag_bars_with_the_mouse(page):
    """Dragging the target's bar up lowers the loss, a wrong word's raises it; the numbers are tokenloss's."""
    assert number(page, "#loss-nats") == pytest.approx(expected_loss(page), abs=5e-4)
    target, other = page.locator(".logit-track").nth(0), page.locator(".logit-track").nth(1)
    before = number(page, "#loss-nats")

    box = target.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.1, steps=6)
    page.mouse.up()
    assert shown_logits(page)[0] == pytest.approx(8.0, abs=0.15)  # 10% from the top of a [-10, 10] axis
    lowered = number(page, "#loss-nats")
    assert lowered < before
    assert lowered == pytest.approx(expected_loss(page), abs=5e-4)

    box = other.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.45)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.05, steps=6)
    page.mouse.up()
    assert shown_logits(page)[1] == pytest.approx(9.0, abs=0.15)
    raised = number(page, "#loss-nats")
    assert raised > lowered
    assert raised == pytest.approx(expected_loss(page), abs=5e-4)
    assert number(page, "#ppl") == pytest.approx(math.exp(raised), rel=5e-3)
    screenshot(page, "#logits", "1-logits.png")


def test_keyboard_target_and_gradient(page):
    """Arrow keys move a focused bar by 0.1 (Shift: 1); the gradient bars show p - onehot(target)."""
    bar = page.locator(".logit-track").nth(3)
    start = shown_logits(page)[3]
    bar.focus()
    for _ in range(5):
        page.keyboard.press("ArrowUp")
    assert shown_logits(page)[3] == pytest.approx(start + 0.5)
    page.keyboard.press("Shift+ArrowDown")
    assert shown_logits(page)[3] == pytest.approx(start - 0.5)
    page.keyboard.press("PageUp")
    assert shown_logits(page)[3] == pytest.approx(start + 0.5)

    page.locator("input[name=target]").nth(3).check()
    assert target_index(page) == 3
    assert number(page, "#loss-nats") == pytest.approx(expected_loss(page), abs=5e-4)
    logits = torch.tensor(shown_logits(page), requires_grad=True)
    tokenloss.cross_entropy(logits[None], torch.tensor([3])).backward()
    shown_grad = [float(t) for t in page.locator(".grad-track .bar-value").all_inner_texts()]
    torch.testing.assert_close(torch.tensor(shown_grad), logits.grad, rtol=0, atol=0.006)
    assert shown_grad[3] < 0 and all(g >= 0 for i, g in enumerate(shown_grad) if i != 3)

    page.locator("input.word").nth(3).fill("rug")
    assert '# the right word: "rug"' in page.locator("#code-snippet").inner_text()


def test_touch_sets_a_logit(phone):
    """A tap (touch pointer) near the top of a bar sets its logit near the top of the axis."""
    page = phone.open()
    track = page.locator(".logit-track").nth(2)
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.05)
    assert shown_logits(page)[2] == pytest.approx(9.0, abs=0.2)
    assert number(page, "#loss-nats") == pytest.approx(expected_loss(page), abs=5e-4)
    assert phone.console.errors == []


@pytest.mark.parametrize(("preset", "loss"), [("extreme", 100.0), ("uniform", math.log(6)), ("right", None)])
def test_presets_and_extreme_logits_stay_finite(page, preset, loss):
    """Logits of +-50 give the exact loss (100 nats) with no overflow; all equal gives log V."""
    page.click(f"[data-preset={preset}]")
    shown = number(page, "#loss-nats")
    assert shown == pytest.approx(expected_loss(page), abs=5e-4)
    if loss is not None:
        assert shown == pytest.approx(loss, abs=5e-4)
    p_target = float(torch.softmax(torch.tensor(shown_logits(page), dtype=torch.float64), 0)[target_index(page)])
    assert page.locator("#softmax-line").inner_text().endswith(f" = {p_target:.4f}")
    if preset == "extreme":  # e^-50 / (e^50 + 4 e^0 + ...): the formula shows the big numbers themselves
        assert "p[mat] = e^-50.0 / Σ e^z = 1.93e-22 / 5.18e21 = 0.0000" in page.locator("#softmax-line").inner_text()
    assert "NaN" not in page.locator("#logits").inner_text()
    assert "Infinity" not in page.locator("#code-snippet").inner_text()


@pytest.mark.parametrize("preset", ["extreme", "uniform", "right", "start"])
def test_story_arithmetic_adds_up_with_a_calculator(page, preset):
    """The story's "p = ..., so the loss is -log p = L": -ln of the printed p gives the printed L to its
    3 decimals (p is printed with the digits the loss needs, not rounded to 0.001 or 0.000)."""
    page.click(f"[data-preset={preset}]") if preset != "start" else None
    story = page.locator("#logit-story").inner_text()
    match = re.search(r"p = ([0-9.e−-]+), so the loss is −log \1 = ([0-9.]+) nats", story)
    assert match, story
    printed_p = float(match.group(1).replace("−", "-"))
    if printed_p > 0:
        assert -math.log(printed_p) == pytest.approx(float(match.group(2)), abs=6e-4), story


def test_counts_are_whole_numbers(page):
    """ "1 chance in 20", not "20.00"."""
    page.locator("#p-slider").fill("0.05")
    assert "1 chance in 20." in page.locator("#curve-story").inner_text()


def test_probability_slider_and_handle(page):
    """The slider and the handle on the curve give -ln p in nats, bits and perplexity 1/p."""
    slider = page.locator("#p-slider")
    for p, nats, bits, ppl in [(0.5, 0.693, 1.0, 2.0), (0.9, 0.105, 0.152, 1.11), (0.05, 2.996, 4.322, 20.0)]:
        slider.fill(str(p))
        assert number(page, "#c-p") == p
        assert number(page, "#c-nats") == pytest.approx(nats, abs=5e-4)
        assert number(page, "#c-bits") == pytest.approx(bits, abs=5e-4)
        assert number(page, "#c-ppl") == pytest.approx(ppl, abs=5e-3)
    curve = page.locator("#curve").bounding_box()
    # The plot runs from x = 56 to 620 of a 640-wide view box: aim at p = 0.25.
    x = curve["x"] + curve["width"] * (56 + 0.25 * 564) / 640
    page.mouse.move(x, curve["y"] + curve["height"] / 2)
    page.mouse.down()
    page.mouse.up()
    p = number(page, "#c-p")
    assert p == pytest.approx(0.25, abs=0.01)
    assert number(page, "#c-nats") == pytest.approx(-math.log(p), abs=5e-4)
    assert float(slider.input_value()) == p
    page.locator("#curve-handle").focus()
    page.keyboard.press("ArrowRight")
    assert number(page, "#c-p") == pytest.approx(p + 0.01)
    screenshot(page, "#probability", "2-probability.png")


def test_worked_sentence(page):
    """The Quick brown fox: 3.91, 1.90, 0.92, 0.51, average 1.81; editing a probability moves the average."""
    assert page.locator(".worked-loss .loss-value").all_inner_texts() == ["3.91", "1.90", "0.92", "0.51"]
    assert page.locator("#worked-mean").inner_text() == "1.8091"  # 1.81 to the course's two decimals
    # the perplexity is e to the number shown, so a calculator agrees: e^1.8091 = 6.10 (e^1.81 would be 6.11)
    assert number(page, "#worked-ppl") == pytest.approx(math.exp(number(page, "#worked-mean")), abs=0.005)
    page.locator(".worked input").nth(0).fill("0.5")
    assert number(page, "#worked-mean") == pytest.approx((0.693 + 1.897 + 0.916 + 0.511) / 4, abs=0.006)


def test_typed_sentence_is_scored_by_the_model(page, page_model):
    """A typed sentence comes back token by token; the shown numbers are score_text's."""
    text = "Cats sit on mats."
    page.fill("#sentence-input", text)
    page.click("#sentence-score")
    page.wait_for_selector("#sentence-result:not([hidden])")
    expected = score_text(page_model, text, top_k=5)
    losses = -expected.log_prob[expected.scored].double()
    assert page.locator("#sentence-tokens .tok").count() == len(text)
    assert page.locator("#sentence-tokens .tok.unscored").count() == 1
    assert number(page, "#sentence-count") == len(text) - 1
    assert number(page, "#sentence-mean") == pytest.approx(float(losses.mean()), abs=5e-4)
    assert number(page, "#sentence-bits") == pytest.approx(float(losses.mean()) / math.log(2), abs=5e-4)
    assert page.locator("#model-label").inner_text() == page_model.name

    page.locator("#sentence-tokens .tok").nth(5).hover()
    detail = page.locator("#token-detail").inner_text()
    p = math.exp(float(expected.log_prob[5]))
    assert f"p = {p:.4f}" in detail
    assert f"rank {int(expected.rank[5])}" in detail
    assert f"loss = {-float(expected.log_prob[5]):.3f} nats" in detail
    assert page.locator("#token-detail .alt").count() == 5
    screenshot(page, "#sentence", "3-sentence.png")

    page.locator("#sentence-input").press("Enter")  # Enter scores again; same text, same numbers
    assert number(page, "#sentence-mean") == pytest.approx(float(losses.mean()), abs=5e-4)


def test_too_long_sentence_gets_a_clear_message(page):
    """Text over the server's limit is refused on the page with the limit named (maxlength stops typing it)."""
    assert page.locator("#sentence-input").get_attribute("maxlength") == "1000"
    page.evaluate("document.getElementById('sentence-input').value = 'a'.repeat(1001)")
    page.click("#sentence-score")
    assert page.locator("#sentence-error").inner_text() == "The text is 1001 characters long; the limit is 1000."


def test_exercise_and_quiz_answers_persist_across_reload(page):
    """Answers are checked, kept in localStorage, shown again after a reload, and can be forgotten."""
    page.fill("#ex-05", "0.693")
    page.fill("#ex-09", "1.0")
    page.click("#ex-check")
    feedback = page.locator("#ex-feedback").inner_text()
    assert "P = 0.5: 0.693 ✓" in feedback and "P = 0.9: 1.0 is not it" in feedback
    page.fill("#ex-09", "0.105")
    page.click("#ex-check")
    assert "P = 0.9: 0.105 ✓" in page.locator("#ex-feedback").inner_text()
    page.locator("#q-uniform label.option").nth(2).click()  # 5.545: right
    page.locator("#q-bits label.option").nth(0).click()  # 3.32: wrong
    assert page.locator("#quiz-score").inner_text() == "1 of 5 right (2 answered)."
    screenshot(page, "#traps", "4-traps.png")

    page.reload()
    page.wait_for_selector("html[data-ready=true]")
    assert page.locator("#ex-05").input_value() == "0.693"
    assert page.locator("#ex-09").input_value() == "0.105"
    assert page.locator("#q-uniform input[value='2']").is_checked()
    assert page.locator("#q-bits input[value='0']").is_checked()
    assert "right" in page.locator("#q-uniform").get_attribute("class")
    assert "wrong" in page.locator("#q-bits").get_attribute("class")
    assert "the answer is “10”" in page.locator("#q-bits .why").inner_text()
    assert page.locator("#quiz-score").inner_text() == "1 of 5 right (2 answered)."

    page.click("#quiz-reset")
    page.reload()
    page.wait_for_selector("html[data-ready=true]")
    assert page.locator("#quiz input:checked").count() == 0
    assert page.locator("#ex-05").input_value() == ""


def test_traps_show_live_numbers(page):
    """Softmax twice is pulled towards log V; padding dilutes the mean; e**loss vs 2**loss."""
    page.click("[data-preset=right]")
    right, doubled = number(page, "#trap-right"), number(page, "#trap-double")
    assert right == pytest.approx(expected_loss(page), abs=5e-4)
    probs = torch.softmax(torch.tensor([shown_logits(page)]), dim=-1)
    doubled_want = float(torch.nn.functional.cross_entropy(probs, torch.tensor([target_index(page)])))
    assert doubled == pytest.approx(doubled_want, abs=5e-4)
    assert right < doubled < math.log(6)
    assert number(page, "#trap-pad-wrong") == pytest.approx((2.3 + 1.9 + 2.7 + 5 * 0.01) / 8, abs=0.006)
    assert number(page, "#trap-pad-right") == 2.30
    page.fill("#trap-loss", "2")
    assert number(page, "#trap-ppl-e") == pytest.approx(math.e**2, abs=0.006)
    assert number(page, "#trap-ppl-2") == 4.0
    page.fill("#trap-v", "256")
    assert number(page, "#trap-logv-big") == pytest.approx(5.545, abs=5e-4)


def test_code_snippet_runs_and_prints_the_shown_numbers(page):
    """The PyTorch snippet, run as it is shown, prints the loss, perplexity and mean the page shows."""
    page.locator(".logit-track").nth(0).focus()
    page.keyboard.press("Shift+ArrowUp")
    code = page.locator("#code-snippet").inner_text()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), {})  # noqa: S102 - our own page's snippet
    printed = out.getvalue().splitlines()
    loss = number(page, "#loss-nats")
    assert float(printed[0]) == pytest.approx(loss, abs=5e-4)
    assert float(printed[1]) == pytest.approx(math.exp(loss), rel=1e-3)
    assert float(printed[5]) == pytest.approx(loss, abs=5e-4)  # tokenloss, after the two tensor prints
    assert f"# {float(printed[0]):.4f} nats" in code
    assert printed[-1].startswith("tensor(1.8091")
    screenshot(page, "#code", "5-code.png")


@pytest.mark.parametrize("tab_name", ["phone", "laptop"])
def test_layout_fits_the_width(request, tab_name):
    """At phone width (390 px) and on a laptop nothing overflows sideways; a full-page screenshot is kept."""
    tab = request.getfixturevalue(tab_name)
    page = tab.open()
    page.click("#sentence-score")
    page.wait_for_selector("#sentence-result:not([hidden])")
    width = page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    wide = page.evaluate(
        "[...document.querySelectorAll('main *')].filter(e => e.getBoundingClientRect().right > "
        "document.documentElement.clientWidth + 1 && !e.closest('pre')).map(e => e.tagName + '.' + e.className)"
    )
    assert wide == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{tab_name}.png"), full_page=True)
    assert tab.console.errors == []


def test_phone_keeps_the_loss_in_view_while_a_bar_is_dragged(phone):
    """390 px: dragging a bar (which puts the big readout off screen) leaves a compact loss readout in
    view that shows the same number."""
    page = phone.open()
    track = page.locator(".logit-track").nth(1)
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(x, box["y"] + box["height"] * 0.2, steps=5)
    readout = page.locator("#sticky-readout").bounding_box()
    viewport = page.viewport_size
    assert readout is not None and 0 <= readout["y"] and readout["y"] + readout["height"] <= viewport["height"]
    big = page.locator(".big-readout").bounding_box()
    assert big["y"] > viewport["height"]  # the big readout is below the screen: the compact one is what shows
    assert page.locator("#sticky-loss").inner_text() == page.locator("#loss-nats").inner_text()
    page.mouse.up()
    assert phone.console.errors == []


def test_phone_code_lines_never_need_sideways_scrolling(phone):
    """390 px: the code snippet wraps (its comments carry the lesson); no line is cut off."""
    page = phone.open()
    overflow = page.evaluate(
        "(() => { const pre = document.querySelector('#code-snippet').closest('pre') "
        "|| document.querySelector('#code-snippet'); return pre.scrollWidth - pre.clientWidth; })()"
    )
    assert overflow <= 0


def test_phone_shows_target_labels_and_readable_chart_text(phone):
    """390 px: each radio keeps its "target" label, and the -log p chart's text renders at 9 px or more."""
    page = phone.open()
    labels = page.locator(".target-pick span")
    assert labels.count() >= 2 and all(labels.nth(i).is_visible() for i in range(labels.count()))
    page.locator("#curve").scroll_into_view_if_needed()
    heights = page.evaluate(
        "[...document.querySelectorAll('#curve text')].filter(t => t.getBoundingClientRect().height > 0)"
        ".map(t => t.getBoundingClientRect().height)"
    )
    assert heights and min(heights) >= 9, heights


def test_knob_math_agrees_with_tokenloss(page):
    """Label smoothing (and its floor), focal loss, temperature (loss, entropy) and the EMA in math.js
    give tokenloss's numbers on the Python vectors."""
    knobs = generate_vectors()["knobs"]
    got = page.evaluate(
        """cases => cases.map(c => {
            const M = window.tokenlossMath, V = c.logits.length;
            return {
                smoothing: c.smoothing.map(
                    s => [M.smoothedLoss(c.logits, c.target, s.eps), M.smoothingFloor(V, s.eps)]),
                focal: c.focal.map(f => M.focalLoss(c.logits, c.target, f.gamma)),
                temperature: c.temperature.map(t => {
                    const r = M.temperatureStats(c.logits, c.target, t.t); return [r.loss, r.entropy]; }),
            };
        })""",
        knobs,
    )
    assert len(got) == len(knobs) >= 5
    for want, have in zip(knobs, got):
        atol = 1e-5 + 4 * FLOAT32_EPS * max(1.0, max(abs(z) for z in want["logits"]))
        for case, (loss, floor) in zip(want["smoothing"], have["smoothing"]):
            assert loss == pytest.approx(case["loss"], abs=atol) and floor == pytest.approx(case["floor"], abs=1e-12)
        for case, loss in zip(want["focal"], have["focal"]):
            assert loss == pytest.approx(case["loss"], abs=atol)
        for case, (loss, entropy) in zip(want["temperature"], have["temperature"]):
            assert loss == pytest.approx(case["loss"], abs=atol) and entropy == pytest.approx(case["entropy"], abs=atol)
    values = [3.0, 2.0, float("nan"), 4.0]
    ema = page.evaluate("v => window.tokenlossMath.ema(v.map(x => x === null ? NaN : x), 0.5)", [3.0, 2.0, None, 4.0])
    from tokenloss.training.curves import ema as python_ema

    assert ema == pytest.approx(python_ema(values, 0.5), nan_ok=True)


def test_knobs_show_tokenloss_numbers_for_the_learners_logits(page):
    """Each slider drives its numbers from part 1's logits, equal to tokenloss with that option."""
    logits = torch.tensor([shown_logits(page)])
    target = torch.tensor([target_index(page)])
    page.locator("#eps").fill("0.3")
    assert number(page, "#eps-loss") == pytest.approx(
        float(tokenloss.cross_entropy(logits, target, label_smoothing=0.3)), abs=5e-4
    )
    floor_logits = torch.log(
        torch.full((1, logits.shape[1]), 0.3 / logits.shape[1])
        + 0.7 * torch.nn.functional.one_hot(target, logits.shape[1])
    )
    floor = float(tokenloss.cross_entropy(floor_logits, target, label_smoothing=0.3))  # the loss at p = q
    assert number(page, "#eps-floor") == pytest.approx(floor, abs=5e-4)
    assert number(page, "#eps-floor") <= number(page, "#eps-loss")
    page.locator("#gamma").fill("3")
    assert number(page, "#gamma-loss") == pytest.approx(
        float(tokenloss.cross_entropy(logits, target, focal_gamma=3.0)), abs=5e-4
    )
    page.locator("#temp").fill("2.5")
    logp, entropy = tokenloss.token_logprobs(logits, target, temperature=2.5)
    assert number(page, "#temp-loss") == pytest.approx(-float(logp), abs=5e-4)
    assert number(page, "#temp-entropy") == pytest.approx(float(entropy), abs=5e-4)
    assert "label_smoothing=0.3" in page.locator("#knob-smoothing pre").inner_text()


def test_curves_say_where_to_stop_and_which_jump_is_a_spike(page):
    """The overfitting chart names the lowest validation step and says stop there, and overfitting after;
    the noisy chart names the spike; the page says why 1/p and exp(loss) are one perplexity."""
    story = page.locator("#stop-story").inner_text()
    best = int(re.search(r"lowest at step (\d+)", story).group(1))
    assert "Still learning" in story
    page.locator("#stop").fill(str(best))
    assert "Stop here" in page.locator("#stop-story").inner_text()
    page.locator("#stop").fill(str(best + 15))
    assert "Overfitting" in page.locator("#stop-story").inner_text()
    noise = page.locator("#noise-story").inner_text()
    assert "At step 85 it jumps" in noise and "a spike" in noise
    end = noise.split("ends at ")[1]
    page.locator("#beta").fill("0.5")
    assert page.locator("#noise-story").inner_text().split("ends at ")[1] != end
    assert "geometric mean" in page.locator("#ppl-same").inner_text()
