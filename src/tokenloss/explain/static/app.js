/* The explain page's widgets: draggable logits, the -log p curve, sentences, traps and quiz, the code. Math: math.js. */
(function () {
  "use strict";

  var M = window.tokenlossMath;
  var AXIS = 10;          // the logit chart shows z in [-AXIS, AXIS]
  var LOGIT_LIMIT = 50;   // keys and presets go up to +-50 (the arithmetic is stable far beyond)
  var MIN_WORDS = 2;
  var MAX_WORDS = 8;
  var STORE_KEY = "tokenloss.explain.v1";
  var SVG_NS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------- helpers

  function byId(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setAttrs(node, attrs) {
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.setAttribute("class", attrs[k]);
      else node.setAttribute(k, attrs[k]);
    });
  }

  function setText(id, text) { byId(id).textContent = text; }

  /** A number with d decimals; "inf" for an infinite one. */
  function fmt(x, d) {
    if (x === Infinity) return "∞";
    if (x === -Infinity) return "-∞";
    if (x !== x) return "–";
    var s = x.toFixed(d);
    return s === "-" + (0).toFixed(d) ? (0).toFixed(d) : s;
  }

  /** Perplexity with 2 decimals, spelled as the terminal and the HTML report spell numbers. */
  function fmtPpl(x) {
    return M.formatNumber(x, 2);
  }

  /**
   * A probability with the digits its loss needs: 4 significant digits (so that a learner's
   * calculator gives -log p to the 3 decimals shown), powers of ten below 1e-4.
   */
  function fmtProb(p) {
    if (p === 0 || p === 1) return String(p);
    if (p < 1e-4) return p.toExponential(3).replace("e-", "e−");
    return p.toPrecision(4);
  }

  /** A count such as "1 chance in 20": a whole number from 10 on, one decimal below. */
  function fmtCount(x) {
    if (!isFinite(x)) return "∞";
    return x >= 10 ? Math.round(x).toLocaleString("en-US") : x.toFixed(1);
  }

  /** A positive number for a formula: 3 significant digits, powers of ten when large or small. */
  function fmtExp(x) {
    if (x >= 1e5 || x < 1e-3) return x.toExponential(2).replace("e+", "e");
    return x.toPrecision(3);
  }

  function fmtPct(p) {
    if (p >= 0.9995 && p < 1) return ">99.9%";
    if (p > 0 && p < 0.0005) return "<0.1%";
    return (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%";
  }

  function clamp(x, lo, hi) { return Math.min(hi, Math.max(lo, x)); }
  function round1(x) { return Math.round(x * 10) / 10; }

  /** A token or word made visible: spaces and line breaks as symbols. */
  function visible(text) {
    return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  function loadStore() {
    try {
      var raw = window.localStorage.getItem(STORE_KEY);
      var data = raw ? JSON.parse(raw) : {};
      return data && typeof data === "object" ? data : {};
    } catch (e) {
      return {};
    }
  }

  function saveStore(data) {
    try { window.localStorage.setItem(STORE_KEY, JSON.stringify(data)); } catch (e) { /* private mode: no memory */ }
  }

  var store = loadStore();

  // ---------------------------------------------------------------- part 1: drag the logits

  var START = {
    words: ["mat", "sofa", "roof", "moon", "dog", "banana"],
    logits: [2.5, 1.5, 0.5, -0.5, -1.0, -2.5],
    target: 0,
  };
  var EXTRA_WORDS = ["chair", "bed", "floor", "rug"];

  var lab = {
    words: START.words.slice(),
    logits: START.logits.slice(),
    target: START.target,
    cols: [],      // per word: {track, bar, value, word, radio, probBar, probValue, gradBar, gradValue}
  };

  function wordName(i) { return lab.words[i] && lab.words[i].trim() ? lab.words[i].trim() : "word " + (i + 1); }

  function setLogit(i, value) {
    lab.logits[i] = clamp(round1(value), -LOGIT_LIMIT, LOGIT_LIMIT);
    update();
  }

  function logitFromPointer(track, event) {
    var rect = track.getBoundingClientRect();
    var frac = clamp((event.clientY - rect.top) / rect.height, 0, 1);
    return AXIS * (1 - 2 * frac);
  }

  function buildLogitColumns() {
    var logitCols = byId("logit-cols"), wordCols = byId("word-cols");
    var probCols = byId("prob-cols"), gradCols = byId("grad-cols");
    [logitCols, wordCols, probCols, gradCols].forEach(function (c) {
      c.textContent = "";
      c.style.setProperty("--n", lab.words.length);
    });
    lab.cols = lab.words.map(function (_, i) {
      var col = {};
      col.bar = el("div", { class: "bar" });
      col.value = el("div", { class: "bar-value" });
      col.track = el("div", {
        class: "track logit-track",
        tabindex: "0",
        role: "slider",
        "aria-valuemin": String(-LOGIT_LIMIT),
        "aria-valuemax": String(LOGIT_LIMIT),
        "data-index": String(i),
      }, [el("div", { class: "zero" }), col.bar, col.value]);
      attachDrag(col.track, i);
      logitCols.appendChild(col.track);

      col.word = el("input", {
        type: "text", class: "word", value: lab.words[i], maxlength: "16",
        "aria-label": "Word " + (i + 1), spellcheck: "false", autocomplete: "off",
      });
      col.word.addEventListener("input", function () { lab.words[i] = col.word.value; update(); });
      col.radio = el("input", { type: "radio", name: "target", value: String(i), "aria-label": "Target word " + (i + 1) });
      col.radio.addEventListener("change", function () { if (col.radio.checked) { lab.target = i; update(); } });
      wordCols.appendChild(el("div", { class: "word-cell" }, [
        col.word, el("label", { class: "target-pick" }, [col.radio, el("span", { text: "target" })]),
      ]));

      col.probBar = el("div", { class: "bar" });
      col.probValue = el("div", { class: "bar-value" });
      probCols.appendChild(el("div", { class: "track prob-track" }, [col.probBar, col.probValue]));

      col.gradBar = el("div", { class: "bar" });
      col.gradValue = el("div", { class: "bar-value" });
      gradCols.appendChild(el("div", { class: "track grad-track" }, [el("div", { class: "zero" }), col.gradBar, col.gradValue]));
      return col;
    });
    byId("add-word").disabled = lab.words.length >= MAX_WORDS;
    byId("remove-word").disabled = lab.words.length <= MIN_WORDS;
  }

  function attachDrag(track, i) {
    var dragging = false;
    track.addEventListener("pointerdown", function (e) {
      if (e.button !== undefined && e.button !== 0) return;
      dragging = true;
      track.setPointerCapture(e.pointerId);
      track.focus({ preventScroll: true });
      track.classList.add("dragging");
      setLogit(i, logitFromPointer(track, e));
      e.preventDefault();
    });
    track.addEventListener("pointermove", function (e) {
      if (dragging) setLogit(i, logitFromPointer(track, e));
    });
    function stop(e) {
      if (!dragging) return;
      dragging = false;
      track.classList.remove("dragging");
      if (track.hasPointerCapture(e.pointerId)) track.releasePointerCapture(e.pointerId);
    }
    track.addEventListener("pointerup", stop);
    track.addEventListener("pointercancel", stop);
    track.addEventListener("keydown", function (e) {
      var step = e.shiftKey ? 1 : 0.1;
      var delta = { ArrowUp: step, ArrowRight: step, ArrowDown: -step, ArrowLeft: -step, PageUp: 1, PageDown: -1 }[e.key];
      if (e.key === "Home") delta = LOGIT_LIMIT - lab.logits[i];
      if (e.key === "End") delta = -LOGIT_LIMIT - lab.logits[i];
      if (e.key === "0") delta = -lab.logits[i];
      if (delta === undefined) return;
      e.preventDefault();
      setLogit(i, lab.logits[i] + delta);
    });
  }

  /** Place a bar in a track whose zero line sits at `zero` (fraction from the bottom), for a value in [lo, hi]. */
  function placeBar(bar, label, value, lo, hi, zero, text) {
    var span = hi - lo;
    var v = clamp(value, lo, hi);
    var bottom = zero + Math.min(0, v) / span;
    var height = Math.abs(v) / span;
    bar.style.bottom = (100 * bottom) + "%";
    bar.style.height = (100 * height) + "%";
    bar.classList.toggle("negative", value < 0);
    bar.classList.toggle("clipped", value > hi || value < lo);
    label.textContent = text;
    if (value >= 0) {
      label.style.bottom = (100 * (zero + height)) + "%";
      label.style.top = "";
      label.classList.remove("below");
    } else {
      label.style.top = (100 * (1 - bottom)) + "%";
      label.style.bottom = "";
      label.classList.add("below");
    }
  }

  function labState() {
    var p = M.softmax(lab.logits);
    var loss = M.crossEntropy(lab.logits, lab.target);
    var grad = M.gradient(lab.logits, lab.target);
    var logV = Math.log(lab.logits.length);
    return { p: p, loss: loss, grad: grad, logV: logV };
  }

  function update() {
    var s = labState();
    var top = 0;
    s.p.forEach(function (pi, i) { if (pi > s.p[top]) top = i; });
    lab.cols.forEach(function (col, i) {
      var isTarget = i === lab.target;
      var z = lab.logits[i];
      placeBar(col.bar, col.value, z, -AXIS, AXIS, 0.5, fmt(z, 1));
      col.track.classList.toggle("is-target", isTarget);
      col.track.setAttribute("aria-valuenow", String(z));
      col.track.setAttribute("aria-valuetext", wordName(i) + ": logit " + fmt(z, 1) + ", probability " + fmtPct(s.p[i]));
      col.track.setAttribute("aria-label", "Logit of " + wordName(i));
      col.radio.checked = isTarget;
      col.word.parentNode.classList.toggle("is-target", isTarget);
      placeBar(col.probBar, col.probValue, s.p[i], 0, 1, 0, fmtPct(s.p[i]));
      col.probBar.parentNode.classList.toggle("is-target", isTarget);
      var g = s.grad[i];
      placeBar(col.gradBar, col.gradValue, g, -1, 1, 0.5, (g > 0 ? "+" : "") + fmt(g, 2));
      col.gradBar.parentNode.classList.toggle("is-target", isTarget);
    });

    var name = wordName(lab.target);
    var bits = M.natsToBits(s.loss);
    setText("loss-nats", fmt(s.loss, 3));
    setText("loss-bits", fmt(bits, 3));
    setText("ppl", fmtPpl(M.perplexity(s.loss)));
    setText("ppl-2", fmtPpl(M.perplexity(s.loss)));
    setText("p-target", fmt(s.p[lab.target], 4) + " (" + fmtPct(s.p[lab.target]) + ")");
    setText("logv", "log " + lab.logits.length + " = " + fmt(s.logV, 3));
    setText("sticky-loss", fmt(s.loss, 3));
    setText("sticky-logv", fmt(s.logV, 3));

    var gaugeMax = Math.max(6, Math.ceil(s.logV * 2));
    byId("gauge-fill").style.width = (100 * clamp(s.loss / gaugeMax, 0, 1)) + "%";
    byId("gauge-fill").classList.toggle("over", s.loss > s.logV);
    byId("gauge-logv").style.left = (100 * s.logV / gaugeMax) + "%";
    setText("gauge-logv-label", "log V = " + fmt(s.logV, 2));
    setText("gauge-max", s.loss > gaugeMax ? fmt(s.loss, 1) + " →" : String(gaugeMax));

    var story = "The model gives “" + name + "” p = " + fmtProb(s.p[lab.target]) + ", so the loss is −log " +
      fmtProb(s.p[lab.target]) + " = " + fmt(s.loss, 3) + " nats. ";
    if (top === lab.target && s.p[top] > 0.9) story += "Sure and right: the loss is close to 0.";
    else if (s.loss > s.logV + 1e-9) story += "Worse than an even guess (log V): the model bets on “" + wordName(top) + "”, the wrong word.";
    else if (Math.abs(s.loss - s.logV) < 0.05) story += "About the loss of an even guess: the model has no idea yet.";
    else if (top === lab.target) story += "Its favourite is right. Raise “" + name + "” or lower the others to shrink the loss.";
    else story += "It prefers “" + wordName(top) + "”. Lower that bar, or raise “" + name + "”.";
    setText("logit-story", story);
    var num = Math.exp(lab.logits[lab.target]);
    var den = lab.logits.reduce(function (acc, z) { return acc + Math.exp(z); }, 0);  // |z| <= 50: no overflow
    setText("softmax-line", "p[" + name + "] = e^" + fmt(lab.logits[lab.target], 1) + " / Σ e^z = " +
      fmtExp(num) + " / " + fmtExp(den) + " = " + fmt(s.p[lab.target], 4));

    updateTrapSoftmax(s);
    updateCode(s);
    updateKnobs();
  }

  function applyPreset(name) {
    var n = lab.words.length, t = lab.target;
    if (name === "start") {
      lab.words = START.words.slice(); lab.logits = START.logits.slice(); lab.target = START.target;
      buildLogitColumns();
    } else if (name === "uniform") {
      lab.logits = lab.logits.map(function () { return 0; });
    } else if (name === "right") {
      lab.logits = lab.logits.map(function (_, i) { return i === t ? 6 : -1; });
    } else if (name === "wrong") {
      lab.logits = lab.logits.map(function (_, i) { return i === (t + 1) % n ? 6 : (i === t ? -3 : -1); });
    } else if (name === "extreme") {
      lab.logits = lab.logits.map(function (_, i) { return i === t ? -50 : (i === (t + 1) % n ? 50 : 0); });
    }
    update();
  }

  function initLogits() {
    buildLogitColumns();
    document.querySelectorAll("[data-preset]").forEach(function (b) {
      b.addEventListener("click", function () { applyPreset(b.getAttribute("data-preset")); });
    });
    byId("add-word").addEventListener("click", function () {
      if (lab.words.length >= MAX_WORDS) return;
      lab.words.push(EXTRA_WORDS[(lab.words.length - START.words.length + EXTRA_WORDS.length) % EXTRA_WORDS.length]);
      lab.logits.push(0);
      buildLogitColumns();
      update();
    });
    byId("remove-word").addEventListener("click", function () {
      if (lab.words.length <= MIN_WORDS) return;
      lab.words.pop(); lab.logits.pop();
      if (lab.target >= lab.words.length) lab.target = 0;
      buildLogitColumns();
      update();
    });
    update();
  }

  // ---------------------------------------------------------------- part 2: the -log p curve

  var CURVE = { x0: 56, x1: 620, y0: 320, y1: 24, yMax: 7, pMin: 0.001 };
  var curve = { p: 0.5 };

  function cx(p) { return CURVE.x0 + p * (CURVE.x1 - CURVE.x0); }
  function cy(loss) { return CURVE.y0 - Math.min(loss, CURVE.yMax) / CURVE.yMax * (CURVE.y0 - CURVE.y1); }

  function buildCurve() {
    var root = byId("curve");
    var grid = svg("g", { class: "grid" });
    for (var k = 0; k <= CURVE.yMax; k++) {
      grid.appendChild(svg("line", { x1: CURVE.x0, x2: CURVE.x1, y1: cy(k), y2: cy(k) }));
      grid.appendChild(svg("text", { x: CURVE.x0 - 10, y: cy(k) + 4, class: "tick y" }, String(k)));
    }
    for (var q = 0; q <= 10; q += 2) {
      grid.appendChild(svg("line", { x1: cx(q / 10), x2: cx(q / 10), y1: CURVE.y0, y2: CURVE.y1, class: "v" }));
      grid.appendChild(svg("text", { x: cx(q / 10), y: CURVE.y0 + 20, class: "tick x" }, (q / 10).toFixed(1)));
    }
    root.appendChild(grid);
    root.appendChild(svg("text", { x: CURVE.x1, y: CURVE.y0 + 38, class: "axis-label end" }, "p = probability of the right word"));
    root.appendChild(svg("text", { x: 14, y: CURVE.y1 - 8, class: "axis-label" }, "loss (nats)"));

    var d = [];
    for (var i = 0; i <= 400; i++) {
      var p = CURVE.pMin * Math.pow(1 / CURVE.pMin, i / 400); // dense near 0, where the curve bends
      d.push((i ? "L" : "M") + cx(p).toFixed(2) + " " + cy(M.lossFromProb(p)).toFixed(2));
    }
    root.appendChild(svg("path", { d: d.join(" "), class: "curve-line" }));

    // Reference points, each labelled where the curve leaves room: right of the steep part, below the flat part.
    [[0.01, "4.61", 9, 4, "start"], [0.05, "3.00", 9, 4, "start"], [0.5, "0.693", 8, 24, "start"], [0.9, "0.105", -6, -12, "end"]]
      .forEach(function (m) {
        var x = cx(m[0]), y = cy(M.lossFromProb(m[0]));
        var g = svg("g", { class: "marker p" + String(m[0]).replace(".", "") });
        g.appendChild(svg("circle", { cx: x, cy: y, r: 3.5 }));
        g.appendChild(svg("text", { x: x + m[2], y: y + m[3], "text-anchor": m[4] }, "p=" + m[0] + " → " + m[1]));
        root.appendChild(g);
      });

    root.appendChild(svg("line", { id: "curve-hguide", class: "guide" }));
    root.appendChild(svg("line", { id: "curve-vguide", class: "guide" }));
    var handle = svg("circle", { id: "curve-handle", class: "handle", r: 11, tabindex: "0", role: "slider",
      "aria-label": "Probability of the right word", "aria-valuemin": "0.001", "aria-valuemax": "1" });
    root.appendChild(handle);
    root.appendChild(svg("text", { id: "curve-handle-label", class: "handle-label", x: CURVE.x1 - 8, y: CURVE.y1 + 26, "text-anchor": "end" }));

    var dragging = false;
    function fromPointer(e) {
      var pt = root.createSVGPoint();
      pt.x = e.clientX; pt.y = e.clientY;
      var local = pt.matrixTransform(root.getScreenCTM().inverse());
      setProbability((local.x - CURVE.x0) / (CURVE.x1 - CURVE.x0));
    }
    root.addEventListener("pointerdown", function (e) {
      dragging = true;
      root.setPointerCapture(e.pointerId);
      fromPointer(e);
      e.preventDefault();
    });
    root.addEventListener("pointermove", function (e) { if (dragging) fromPointer(e); });
    root.addEventListener("pointerup", function () { dragging = false; });
    root.addEventListener("pointercancel", function () { dragging = false; });
    handle.addEventListener("keydown", function (e) {
      var step = e.shiftKey ? 0.1 : 0.01;
      var delta = { ArrowRight: step, ArrowUp: step, ArrowLeft: -step, ArrowDown: -step }[e.key];
      if (delta === undefined) return;
      e.preventDefault();
      setProbability(curve.p + delta);
    });
    byId("p-slider").addEventListener("input", function (e) { setProbability(parseFloat(e.target.value)); });
  }

  function setProbability(p) {
    curve.p = clamp(Math.round(p * 1000) / 1000, CURVE.pMin, 1);
    var loss = M.lossFromProb(curve.p);
    var x = cx(curve.p), y = cy(loss);
    var handle = byId("curve-handle");
    handle.setAttribute("cx", x); handle.setAttribute("cy", y);
    handle.setAttribute("aria-valuenow", String(curve.p));
    setAttrs(byId("curve-hguide"), { x1: CURVE.x0, x2: x, y1: y, y2: y });
    setAttrs(byId("curve-vguide"), { x1: x, x2: x, y1: y, y2: CURVE.y0 });
    byId("curve-handle-label").textContent = "p = " + fmt(curve.p, 3) + "  →  loss " + fmt(loss, 3) + " nats";

    var slider = byId("p-slider");
    if (parseFloat(slider.value) !== curve.p) slider.value = String(curve.p);
    var bits = M.natsToBits(loss), ppl = M.perplexity(loss);
    setText("c-p", fmt(curve.p, 3));
    setText("c-nats", fmt(loss, 3));
    setText("c-bits", fmt(bits, 3));
    setText("c-ppl", fmtPpl(ppl));
    var story;
    if (curve.p === 1) story = "Certain and right: no surprise at all, loss 0.";
    else if (curve.p >= 0.9) story = "Almost sure and right: the curve is flat here, the loss is tiny.";
    else if (curve.p >= 0.3) story = "A fair bet: as unsure as a fair pick among " + fmtCount(ppl) + " words.";
    else if (curve.p >= 0.05) story = "An outsider: the model gave this word about 1 chance in " + fmtCount(ppl) + ".";
    else story = "Shocked: the model all but ruled this word out. The wall: halve p again and the loss grows by another " + fmt(Math.LN2, 3) + ".";
    setText("curve-story", story);
  }

  // ---------------------------------------------------------------- part 3: sentences

  var worked = { words: ["The", "quick", "brown", "fox"], probs: [0.02, 0.15, 0.40, 0.60], inputs: [], losses: [] };

  function buildWorked() {
    var root = byId("worked");
    worked.words.forEach(function (w, i) {
      var input = el("input", { type: "number", min: "0.001", max: "1", step: "0.01", value: String(worked.probs[i]),
        "aria-label": "Probability of " + w });
      input.addEventListener("input", function () {
        var v = parseFloat(input.value);
        if (v > 0 && v <= 1) { worked.probs[i] = v; updateWorked(); }
      });
      var bar = el("div", { class: "loss-bar" });
      var loss = el("div", { class: "loss-value" });
      worked.inputs.push({ input: input, bar: bar, loss: loss });
      root.appendChild(el("div", { class: "worked-token" }, [
        el("div", { class: "worked-word", text: w }),
        el("label", { class: "worked-p" }, ["p = ", input]),
        el("div", { class: "loss-track" }, [bar]),
        el("div", { class: "worked-loss" }, ["−log p = ", loss]),
      ]));
    });
    updateWorked();
  }

  function updateWorked() {
    var losses = worked.probs.map(M.lossFromProb);
    worked.losses = losses;
    worked.inputs.forEach(function (w, i) {
      w.loss.textContent = fmt(losses[i], 2);
      w.bar.style.height = (100 * clamp(losses[i] / 7, 0, 1)) + "%";
      w.bar.style.background = surprisalColour(M.natsToBits(losses[i]));
    });
    var mean = M.meanLossFromProbs(worked.probs);
    setText("worked-sum", "(" + losses.map(function (l) { return fmt(l, 2); }).join(" + ") + ") / " + losses.length);
    setText("worked-mean", fmt(mean, 4));  // the digits exp() is taken of: e^1.8091 = 6.10, where e^1.81 = 6.11
    setText("worked-ppl", fmtPpl(M.perplexity(mean)));
    if (lab.cols.length) updateCode(labState());
  }

  /** Colour of a token by its surprisal in bits: pale green (expected) through amber to red (>= 10 bits). */
  function surprisalColour(bits) {
    var t = clamp(bits / 10, 0, 1);
    var hue = 140 - 140 * t;          // 140 green -> 0 red
    var light = 88 - 28 * t;          // paler when expected
    return "hsl(" + hue.toFixed(0) + ", 75%, " + light.toFixed(0) + "%)";
  }

  var sentence = { maxChars: 1000, busy: false, tokens: [], pinned: null };

  function showSentenceError(message) {
    var box = byId("sentence-error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function scoreSentence() {
    var text = byId("sentence-input").value;
    if (!text.trim()) { showSentenceError("Type a sentence first."); return; }
    if (text.length > sentence.maxChars) {
      showSentenceError("The text is " + text.length + " characters long; the limit is " + sentence.maxChars + ".");
      return;
    }
    if (sentence.busy) return;
    sentence.busy = true;
    var button = byId("sentence-score");
    button.disabled = true;
    button.textContent = "Scoring…";
    showSentenceError("");
    fetch("/api/score", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: text }) })
      .then(function (r) {
        return r.json().then(function (data) {
          if (!r.ok) throw new Error(data && data.error ? data.error : "the server answered " + r.status);
          return data;
        }, function () { throw new Error("the server answered " + r.status); });
      })
      .then(showScores)
      .catch(function (err) { showSentenceError("Could not score the sentence: " + err.message); })
      .then(function () {
        sentence.busy = false;
        button.disabled = false;
        button.textContent = "Score it";
      });
  }

  function showScores(data) {
    var root = byId("sentence-tokens");
    root.textContent = "";
    sentence.tokens = data.tokens;
    sentence.pinned = null;
    data.tokens.forEach(function (t, i) {
      var span = el("span", { class: "tok", tabindex: "0", "data-index": String(i) });
      span.textContent = t.text.replace(/ /g, " ").replace(/\n/g, "↵");
      if (t.scored) {
        span.style.background = surprisalColour(t.loss_bits);
        span.setAttribute("aria-label", visible(t.text) + ": p " + fmt(t.p, 4) + ", loss " + fmt(t.loss_nats, 2) + " nats");
      } else {
        span.classList.add("unscored");
        span.setAttribute("aria-label", visible(t.text) + ": not scored");
      }
      span.addEventListener("mouseenter", function () { if (sentence.pinned === null) showToken(i); });
      span.addEventListener("focus", function () { showToken(i); });
      span.addEventListener("click", function () {
        sentence.pinned = sentence.pinned === i ? null : i;
        root.querySelectorAll(".tok.pinned").forEach(function (n) { n.classList.remove("pinned"); });
        if (sentence.pinned !== null) span.classList.add("pinned");
        showToken(i);
      });
      root.appendChild(span);
      if (t.text.indexOf("\n") >= 0) root.appendChild(el("br"));
    });
    setText("sentence-count", String(data.n_scored));
    setText("sentence-mean", data.mean_loss_nats === null ? "–" : fmt(data.mean_loss_nats, 3));
    setText("sentence-bits", data.mean_loss_bits === null ? "–" : fmt(data.mean_loss_bits, 3));
    setText("sentence-ppl", data.perplexity === null ? "–" : fmtPpl(data.perplexity));
    setText("model-label", data.model);
    var first = -1;
    data.tokens.forEach(function (t, i) { if (first < 0 && t.scored) first = i; });
    byId("sentence-result").hidden = false;
    byId("token-detail").textContent = first < 0 ? "No token could be scored." : "Point at a token.";
  }

  function showToken(i) {
    var t = sentence.tokens[i];
    var box = byId("token-detail");
    document.querySelectorAll("#sentence-tokens .tok.shown").forEach(function (n) { n.classList.remove("shown"); });
    byId("sentence-tokens").querySelector(".tok[data-index='" + i + "']").classList.add("shown");
    box.textContent = "";
    var head = el("div", { class: "detail-head" }, [el("span", { class: "detail-tok", text: "“" + visible(t.text) + "”" })]);
    box.appendChild(head);
    if (!t.scored) {
      head.appendChild(el("span", { text: " not scored: the model had nothing before it to predict it from." }));
      return;
    }
    box.setAttribute("data-index", String(i));
    head.appendChild(el("span", { class: "detail-nums", text:
      " p = " + fmt(t.p, 4) + " · loss = " + fmt(t.loss_nats, 3) + " nats (" + fmt(t.loss_bits, 2) + " bits) · rank " + t.rank }));
    var list = el("ol", { class: "alts" });
    t.top.forEach(function (a) {
      var li = el("li", { class: a.text === t.text ? "alt is-actual" : "alt" }, [
        el("span", { class: "alt-tok", text: "“" + visible(a.text) + "”" }),
        el("span", { class: "alt-bar" }, [el("span", { class: "alt-fill" })]),
        el("span", { class: "alt-p", text: fmtPct(a.p) }),
      ]);
      li.querySelector(".alt-fill").style.width = (100 * a.p) + "%";
      list.appendChild(li);
    });
    box.appendChild(el("div", { class: "small", text: "The model’s top guesses here:" }));
    box.appendChild(list);
  }

  function initSentence() {
    buildWorked();
    var input = byId("sentence-input");
    byId("sentence-form").addEventListener("submit", function (e) { e.preventDefault(); scoreSentence(); });
    input.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); scoreSentence(); }
    });
    fetch("/api/info")
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (info) {
        if (!info) return;
        sentence.maxChars = info.max_text_chars;
        input.setAttribute("maxlength", String(info.max_text_chars));
        setText("model-label", info.model);
      })
      .catch(function () { /* the page still works without the server's details */ });
  }

  // ---------------------------------------------------------------- part 4: traps, exercise, quiz

  function updateTrapSoftmax(s) {
    var doubled = M.crossEntropy(s.p, lab.target);  // softmax applied to probabilities: the mistake
    setText("trap-right", fmt(s.loss, 3));
    setText("trap-double", fmt(doubled, 3));
    setText("trap-logv", fmt(s.logV, 3));
  }

  function updateTrapPerplexity() {
    var nats = parseFloat(byId("trap-loss").value);
    var ok = nats >= 0 && nats <= 50;
    var bits = M.natsToBits(nats);
    setText("trap-ppl-e", ok ? fmtPpl(M.perplexity(nats)) : "–");
    setText("trap-ppl-2", ok ? fmtPpl(Math.pow(2, nats)) : "–");
    setText("trap-bits", ok ? fmt(bits, 3) : "–");
    setText("trap-ppl-bits", ok ? fmtPpl(Math.pow(2, bits)) : "–");
  }

  function updateTrapLogV() {
    var v = parseInt(byId("trap-v").value, 10);
    setText("trap-logv-big", v >= 1 ? fmt(Math.log(v), 3) : "–");
  }

  function initTraps() {
    var real = [2.3, 1.9, 2.7], pads = [0.01, 0.01, 0.01, 0.01, 0.01];
    var mean = function (xs) { return xs.reduce(function (a, b) { return a + b; }, 0) / xs.length; };
    setText("trap-pad-wrong", fmt(mean(real.concat(pads)), 2));
    setText("trap-pad-right", fmt(mean(real), 2));
    byId("trap-loss").addEventListener("input", updateTrapPerplexity);
    byId("trap-v").addEventListener("input", updateTrapLogV);
    updateTrapPerplexity();
    updateTrapLogV();
  }

  var EXERCISE = [{ id: "ex-05", p: 0.5 }, { id: "ex-09", p: 0.9 }];

  function checkExercise(save) {
    var lines = [];
    var answers = {};
    var allRight = true;
    EXERCISE.forEach(function (q) {
      var raw = byId(q.id).value.trim().replace(",", ".");
      answers[q.id] = byId(q.id).value;
      var want = M.lossFromProb(q.p);
      var got = parseFloat(raw);
      var right = raw !== "" && Math.abs(got - want) <= 0.0051;
      byId(q.id).classList.toggle("right", right);
      byId(q.id).classList.toggle("wrong", raw !== "" && !right);
      allRight = allRight && right;
      if (raw === "") lines.push("P = " + q.p + ": no answer yet.");
      else if (right) lines.push("P = " + q.p + ": " + raw + " ✓");
      else if (Math.abs(got - M.natsToBits(want)) <= 0.0051) lines.push("P = " + q.p + ": " + raw + " is in bits (log base 2); PyTorch uses the natural log.");
      else lines.push("P = " + q.p + ": " + raw + " is not it. Hint: −ln " + q.p + ".");
    });
    var box = byId("ex-feedback");
    if (allRight) lines.push("Right: a 50/50 guess costs 0.693 nats (1 bit); being 90% sure costs only 0.105.");
    box.textContent = lines.join("\n");
    box.className = "feedback " + (allRight ? "right" : "wrong");
    if (save) { store.exercise = answers; saveStore(store); }
  }

  var QUIZ = [
    { id: "q-uniform", q: "A byte-level model (V = 256) that knows nothing gives every byte the same probability. What is its loss?",
      options: ["0", "1", "5.545 (= log 256)", "256"], answer: 2,
      why: "Each byte gets p = 1/256, and −log(1/256) = log 256 = 5.545 nats. That is log V, the dashed line of part 1." },
    { id: "q-raise-wrong", q: "You raise the logit of a wrong word and leave the rest alone. The loss…",
      options: ["goes up", "goes down", "stays the same"], answer: 0,
      why: "The wrong word takes probability from all words, the target included, so p[target] falls and −log p[target] rises. Its gradient is positive." },
    { id: "q-bits", q: "A loss of 3.32 bits per token is a perplexity of about…",
      options: ["3.32", "10", "27.7", "0.1"], answer: 1,
      why: "Perplexity = 2^bits = 2^3.32 ≈ 10 (= e^nats with 3.32 bits = 2.30 nats): as unsure as a fair pick among 10 tokens." },
    { id: "q-input", q: "What should you pass to F.cross_entropy?",
      options: ["Probabilities, after softmax", "Raw logits", "Log-probabilities, then take the mean yourself"], answer: 1,
      why: "F.cross_entropy applies log-softmax itself, stably; probabilities would be softmaxed twice." },
    { id: "q-grad", q: "The gradient of the loss with respect to the target’s own logit is…",
      options: ["p[target] − 1: negative, so training raises it", "p[target]: positive, so training lowers it", "always 0"], answer: 0,
      why: "∂loss/∂z = p − onehot(target): the target gets p − 1 < 0, the other words get their p > 0." },
  ];

  function buildQuiz() {
    var root = byId("quiz");
    store.quiz = store.quiz || {};
    QUIZ.forEach(function (item, n) {
      var fs = el("fieldset", { class: "question", id: item.id });
      fs.appendChild(el("legend", { text: (n + 1) + ". " + item.q }));
      item.options.forEach(function (opt, k) {
        var radio = el("input", { type: "radio", name: item.id, value: String(k) });
        radio.addEventListener("change", function () {
          store.quiz[item.id] = k;
          saveStore(store);
          showQuizAnswer(item);
        });
        fs.appendChild(el("label", { class: "option" }, [radio, el("span", { text: opt })]));
      });
      fs.appendChild(el("p", { class: "why", hidden: "" }));
      root.appendChild(fs);
      showQuizAnswer(item);
    });
    byId("quiz-reset").addEventListener("click", function () {
      store.quiz = {};
      store.exercise = {};
      saveStore(store);
      document.querySelectorAll("#quiz input[type=radio]").forEach(function (r) { r.checked = false; });
      EXERCISE.forEach(function (q) { byId(q.id).value = ""; byId(q.id).className = ""; });
      byId("ex-feedback").textContent = "";
      QUIZ.forEach(showQuizAnswer);
    });
  }

  function showQuizAnswer(item) {
    var fs = byId(item.id);
    var chosen = store.quiz[item.id];
    var why = fs.querySelector(".why");
    fs.classList.remove("right", "wrong");
    if (chosen === undefined) {
      why.hidden = true;
    } else {
      fs.querySelector("input[value='" + chosen + "']").checked = true;
      var right = chosen === item.answer;
      fs.classList.add(right ? "right" : "wrong");
      why.textContent = (right ? "Right. " : "Not quite: the answer is “" + item.options[item.answer] + "”. ") + item.why;
      why.hidden = false;
    }
    var done = QUIZ.filter(function (q) { return store.quiz[q.id] !== undefined; });
    var good = done.filter(function (q) { return store.quiz[q.id] === q.answer; });
    setText("quiz-score", done.length ? good.length + " of " + QUIZ.length + " right (" + done.length + " answered)." : "");
  }

  function initChecks() {
    byId("exercise").addEventListener("submit", function (e) { e.preventDefault(); checkExercise(true); });
    byId("ex-show").addEventListener("click", function () {
      byId("ex-feedback").textContent = "−ln 0.5 = 0.693 nats (= 1 bit) and −ln 0.9 = 0.105 nats. Being 90% sure and right costs 6.6 times less than a coin flip.";
      byId("ex-feedback").className = "feedback";
    });
    var saved = store.exercise || {};
    EXERCISE.forEach(function (q) { if (saved[q.id]) byId(q.id).value = saved[q.id]; });
    if (EXERCISE.some(function (q) { return saved[q.id]; })) checkExercise(false);
    buildQuiz();
  }

  // ---------------------------------------------------------------- part 5: the code

  function pyFloat(x) { var s = fmt(x, 1); return s.indexOf(".") < 0 ? s + ".0" : s; }
  function pyList(xs, d) { return "[" + xs.map(function (x) { return fmt(x, d); }).join(", ") + "]"; }

  function updateCode(s) {
    var words = lab.words.map(function (_, i) { return JSON.stringify(wordName(i)); });
    var t = lab.target;
    var lines = [
      ["import torch", ""],
      ["import torch.nn.functional as F", ""],
      ["import tokenloss as tl", ""],
      ["", ""],
      ["", "# Part 1: one next-word guess over V = " + lab.logits.length + " words."],
      ["words = [" + words.join(", ") + "]", ""],
      ["logits = torch.tensor([[" + lab.logits.map(pyFloat).join(", ") + "]], requires_grad=True)", "  # (1, V): one position"],
      ["target = torch.tensor([" + t + "])", "  # the right word: " + words[t]],
      ["", ""],
      ["loss = F.cross_entropy(logits, target)", "  # softmax, then -log p[target], in one stable step"],
      ["print(loss.item())", "  # " + fmt(s.loss, 4) + " nats"],
      ["print(torch.exp(loss).item())", "  # perplexity " + fmtPpl(M.perplexity(s.loss))],
      ["print(torch.softmax(logits, dim=-1))", "  # p: " + pyList(s.p, 4)],
      ["loss.backward()", ""],
      ["print(logits.grad)", "  # p - onehot(target): " + pyList(s.grad, 4)],
      ["", ""],
      ["print(tl.cross_entropy(logits, target).item())", "  # tokenloss: the same " + fmt(s.loss, 4)],
      ["", ""],
      ["", "# Part 3: a sentence is the average over its tokens."],
      ["p = torch.tensor(" + pyList(worked.probs, 2) + ")", "  # p of each right token"],
      ["print(-torch.log(p))", "  # " + pyList(worked.losses, 4)],
      ["print(-torch.log(p).mean())", "  # " + fmt(M.meanLossFromProbs(worked.probs), 4) + " nats per token"],
    ];
    // Line the comments up in one column, except after lines too long for it.
    var column = 0;
    lines.forEach(function (line) { if (line[0] && line[1] && line[0].length <= 48) column = Math.max(column, line[0].length); });
    var code = byId("code-snippet");
    code.textContent = "";
    lines.forEach(function (line, i) {
      if (i) code.appendChild(document.createTextNode("\n"));
      var text = line[0];
      if (text && line[1]) text += " ".repeat(Math.max(0, column - text.length)) + "  ";
      if (text) code.appendChild(document.createTextNode(text));
      if (line[1]) code.appendChild(el("span", { class: "comment", text: line[1].replace(/^ +/, "") }));
    });
  }

  function initCode() {
    var button = byId("copy-code");
    button.addEventListener("click", function () {
      var text = byId("code-snippet").textContent;
      var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
      var fallback = function () {
        var range = document.createRange();
        range.selectNodeContents(byId("code-snippet"));
        var sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
      else fallback();
    });
  }

  // ---------------------------------------------------------------- part 6: knobs and curves

  function sliderValue(id) { return parseFloat(byId(id).value); }

  function fmtDist(values) {
    return "[" + values.map(function (v) { return fmt(v, 3); }).join(", ") + "]";
  }

  function updateKnobs() {
    if (!byId("knob-smoothing")) return;
    var eps = sliderValue("eps"), gamma = sliderValue("gamma"), t = sliderValue("temp");
    var V = lab.logits.length, plain = M.crossEntropy(lab.logits, lab.target);
    setText("eps-value", fmt(eps, 2));
    setText("eps-code", String(eps));
    setText("eps-target", fmtDist(M.smoothedTarget(V, lab.target, eps)));
    setText("eps-loss", fmt(M.smoothedLoss(lab.logits, lab.target, eps), 3));
    setText("eps-plain", fmt(plain, 3));
    setText("eps-floor", fmt(M.smoothingFloor(V, eps), 3));

    setText("gamma-value", fmt(gamma, 1));
    setText("gamma-code", fmt(gamma, 1));
    setText("gamma-p", fmtProb(Math.exp(-plain)));
    setText("gamma-loss", fmt(M.focalLoss(lab.logits, lab.target, gamma), 3));
    setText("gamma-plain", fmt(plain, 3));
    setText("gamma-easy", fmtPct(Math.pow(0.1, gamma)));
    setText("gamma-hard", fmtPct(Math.pow(0.9, gamma)));

    var stats = M.temperatureStats(lab.logits, lab.target, t);
    setText("temp-value", fmt(t, 2));
    setText("temp-code", fmt(t, 2));
    setText("temp-p", fmtDist(stats.p));
    setText("temp-loss", fmt(stats.loss, 3));
    setText("temp-entropy", fmt(stats.entropy, 3));
    setText("temp-logv", fmt(Math.log(V), 3));
  }

  // Two made-up runs, the same on every visit: a run that overfits, and a noisy one with a spike.
  var OVERFIT = (function () {
    var train = [], val = [];
    for (var i = 0; i <= 60; i++) {
      train.push(1.2 + 3.2 * Math.exp(-i / 9));
      val.push(1.55 + 3.0 * Math.exp(-i / 8) + 0.0009 * i * i);
    }
    return { train: train, val: val };
  })();
  var NOISY = (function () {
    var values = [], seed = 7;
    for (var i = 0; i < 120; i++) {
      seed = (seed * 16807) % 2147483647;  // a fixed pseudo-random zig-zag
      var noise = (seed / 2147483647 - 0.5) * 0.5;
      values.push(2.2 + 2.5 * Math.exp(-i / 25) + noise);
    }
    values[85] += 2.2;  // the spike
    return { values: values, spike: 85 };
  })();

  function chartPath(values, lo, hi) {
    return values.map(function (v, i) {
      var x = 10 + 300 * i / (values.length - 1), y = 140 - 125 * (v - lo) / (hi - lo);
      return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    }).join(" ");
  }

  function argmin(values) {
    var best = 0;
    values.forEach(function (v, i) { if (v < values[best]) best = i; });
    return best;
  }

  function drawOverfit() {
    var chart = byId("overfit-chart"), stop = sliderValue("stop"), lo = 1, hi = 5;
    var best = argmin(OVERFIT.val);
    chart.textContent = "";
    chart.appendChild(svg("path", { class: "train", d: chartPath(OVERFIT.train, lo, hi) }));
    chart.appendChild(svg("path", { class: "val", d: chartPath(OVERFIT.val, lo, hi) }));
    var bx = 10 + 300 * best / 60, by = 140 - 125 * (OVERFIT.val[best] - lo) / (hi - lo);
    chart.appendChild(svg("circle", { class: "best", cx: bx, cy: by, r: 4 }));
    var sx = 10 + 300 * stop / 60;
    chart.appendChild(svg("line", { class: "stop", x1: sx, x2: sx, y1: 10, y2: 140 }));
    chart.appendChild(svg("text", { x: 100, y: 22 }, "— train - - validation"));
    setText("stop-value", String(stop));
    var story = "Step " + stop + ": training loss " + fmt(OVERFIT.train[stop], 3) + ", validation " +
      fmt(OVERFIT.val[stop], 3) + ". Validation is lowest at step " + best + " (" + fmt(OVERFIT.val[best], 3) + "). ";
    if (stop < best) story += "Still learning: both fall. Keep training.";
    else if (stop === best) story += "Stop here: the best weights.";
    else story += "Overfitting: training still falls but validation has risen by " +
      fmt(OVERFIT.val[stop] - OVERFIT.val[best], 3) + " since step " + best + ". Go back to step " + best + ".";
    setText("stop-story", story);
  }

  function drawNoise() {
    var chart = byId("noise-chart"), beta = sliderValue("beta"), lo = 1.5, hi = 5.5;
    var trend = M.ema(NOISY.values, beta);
    chart.textContent = "";
    chart.appendChild(svg("path", { class: "raw", d: chartPath(NOISY.values, lo, hi) }));
    chart.appendChild(svg("path", { class: "trend", d: chartPath(trend, lo, hi) }));
    var i = NOISY.spike, sx = 10 + 300 * i / (NOISY.values.length - 1);
    var sy = 140 - 125 * (NOISY.values[i] - lo) / (hi - lo);
    chart.appendChild(svg("circle", { class: "spike", cx: sx, cy: sy, r: 6 }));
    setText("beta-value", fmt(beta, 2));
    setText("beta-code", fmt(beta, 2));
    var before = NOISY.values.slice(i - 10, i).slice().sort(function (a, b) { return a - b; });
    var level = (before[4] + before[5]) / 2;
    setText("noise-story", "Up to step " + i + " the loss zig-zags by about ±0.25: normal. At step " + i + " it jumps to " +
      fmt(NOISY.values[i], 2) + ", " + fmt(100 * (NOISY.values[i] / level - 1), 0) + "% above the recent level of " +
      fmt(level, 2) + ": a spike, worth a look (tokenloss curve flags it). The moving average with β = " +
      fmt(beta, 2) + " ends at " + fmt(trend[trend.length - 1], 3) + ".");
  }

  function initKnobs() {
    if (!byId("knob-smoothing")) return;
    ["eps", "gamma", "temp"].forEach(function (id) { byId(id).addEventListener("input", updateKnobs); });
    byId("stop").addEventListener("input", drawOverfit);
    byId("beta").addEventListener("input", drawNoise);
    updateKnobs();
    drawOverfit();
    drawNoise();
  }

  // ---------------------------------------------------------------- start

  function init() {
    initSentence();   // before part 1: its code snippet reads the worked example
    initLogits();
    buildCurve();
    setProbability(curve.p);
    initTraps();
    initChecks();
    initCode();
    initKnobs();
    document.documentElement.setAttribute("data-ready", "true");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
