/* The page's arithmetic of cross-entropy, stable and plain: window.tokenlossMath (tested against tokenloss). */
(function (root) {
  "use strict";

  var LN2 = Math.LN2;

  function checkRow(logits) {
    if (!Array.isArray(logits) || logits.length === 0) {
      throw new TypeError("logits must be a non-empty array of numbers");
    }
  }

  function checkTarget(logits, target) {
    if (!Number.isInteger(target) || target < 0 || target >= logits.length) {
      throw new RangeError("target must be an index in [0, " + logits.length + "), got " + target);
    }
  }

  /** log(sum_j exp(z_j)), shifted by the largest logit so that exp never overflows (z = +-1000 is fine). */
  function logSumExp(logits) {
    checkRow(logits);
    var m = -Infinity;
    for (var i = 0; i < logits.length; i++) if (logits[i] > m) m = logits[i];
    if (!isFinite(m)) return m; // all -inf (or a +inf): nothing sensible to shift by
    var s = 0;
    for (var j = 0; j < logits.length; j++) s += Math.exp(logits[j] - m);
    return m + Math.log(s);
  }

  /** log softmax(z)_j = z_j - logsumexp(z): never takes the log of an underflowed probability. */
  function logSoftmax(logits) {
    var lse = logSumExp(logits);
    return logits.map(function (z) { return z - lse; });
  }

  /** softmax(z)_j = exp(z_j - logsumexp(z)): each in [0, 1], summing to 1. */
  function softmax(logits) {
    return logSoftmax(logits).map(Math.exp);
  }

  /** Cross-entropy of one position: -log softmax(z)[t] = logsumexp(z) - z_t, in nats. */
  function crossEntropy(logits, target) {
    checkTarget(logits, target);
    return logSumExp(logits) - logits[target];
  }

  /** Gradient of crossEntropy(z, t) with respect to z: softmax(z) - onehot(t). */
  function gradient(logits, target) {
    checkTarget(logits, target);
    return softmax(logits).map(function (p, j) { return j === target ? p - 1 : p; });
  }

  /**
   * Mean cross-entropy over rows, skipping rows whose target equals ignoreIndex (default -100),
   * like F.cross_entropy(logits, targets, ignore_index=-100). Returns 0 when no row counts.
   */
  function meanCrossEntropy(rows, targets, ignoreIndex) {
    if (ignoreIndex === undefined) ignoreIndex = -100;
    if (rows.length !== targets.length) throw new RangeError("rows and targets differ in length");
    var total = 0, count = 0;
    for (var i = 0; i < rows.length; i++) {
      if (targets[i] === ignoreIndex) continue;
      total += crossEntropy(rows[i], targets[i]);
      count += 1;
    }
    return count === 0 ? 0 : total / count;
  }

  /** The loss when the right token got probability p: -log p (p = 0 gives +Infinity). */
  function lossFromProb(p) {
    if (!(p >= 0 && p <= 1)) throw new RangeError("p must be in [0, 1], got " + p);
    return -Math.log(p);
  }

  /** Average of -log p over the tokens of a sentence, in nats. */
  function meanLossFromProbs(probs) {
    if (probs.length === 0) throw new RangeError("probs must not be empty");
    var s = 0;
    for (var i = 0; i < probs.length; i++) s += lossFromProb(probs[i]);
    return s / probs.length;
  }

  function natsToBits(nats) { return nats / LN2; }
  function bitsToNats(bits) { return bits * LN2; }
  /** Perplexity from a loss in nats: exp(loss) (= 2 ** loss in bits). */
  function perplexity(lossNats) { return Math.exp(lossNats); }

  /** Label smoothing's target: (1 - eps) on the target word plus eps / V on every word. */
  function smoothedTarget(vocabSize, target, eps) {
    var q = [];
    for (var j = 0; j < vocabSize; j++) q.push(eps / vocabSize + (j === target ? 1 - eps : 0));
    return q;
  }

  /** Cross-entropy against the smoothed target: (1 - eps) * (-log p_t) + eps * mean_j(-log p_j) (PyTorch's). */
  function smoothedLoss(logits, target, eps) {
    checkTarget(logits, target);
    var logP = logSoftmax(logits), mean = 0;
    for (var j = 0; j < logP.length; j++) mean -= logP[j] / logP.length;
    return (1 - eps) * -logP[target] + eps * mean;
  }

  /** The lowest loss label smoothing allows: the entropy of the smoothed target (reached at p = q). */
  function smoothingFloor(vocabSize, eps) {
    var q = smoothedTarget(vocabSize, 0, eps), h = 0;
    for (var j = 0; j < q.length; j++) if (q[j] > 0) h -= q[j] * Math.log(q[j]);
    return h;
  }

  /** Focal loss: (1 - p_t) ** gamma * (-log p_t); easy tokens (p_t near 1) count little. */
  function focalLoss(logits, target, gamma) {
    var nll = crossEntropy(logits, target);
    var oneMinusP = -Math.expm1(-nll);
    return (gamma === 0 ? 1 : Math.pow(oneMinusP, gamma)) * nll;
  }

  /** softmax(z / T), the loss -log p_t and the entropy -sum p log p of the tempered distribution. */
  function temperatureStats(logits, target, temperature) {
    if (!(temperature > 0)) throw new RangeError("temperature must be > 0, got " + temperature);
    var z = logits.map(function (x) { return x / temperature; });
    var logP = logSoftmax(z), entropy = 0;
    for (var j = 0; j < logP.length; j++) if (logP[j] > -Infinity) entropy -= Math.exp(logP[j]) * logP[j];
    return { p: logP.map(Math.exp), loss: -logP[target], entropy: entropy };
  }

  /** Exponential moving average with bias correction, as tokenloss curve draws it (NaN points skipped). */
  function ema(values, smoothing) {
    var out = [], level = 0, weight = 0;
    for (var i = 0; i < values.length; i++) {
      if (values[i] === values[i]) {
        level = smoothing * level + (1 - smoothing) * values[i];
        weight = smoothing * weight + (1 - smoothing);
      }
      out.push(values[i] === values[i] && weight > 0 ? level / weight : NaN);  // NaN where the point is
    }
    return out;
  }

  /**
   * A number with d decimals, spelled as tokenloss.evaluation.formatting.format_number spells it in the
   * terminal and the HTML report: fixed point below 1e6 ("14.02"), scientific from there ("5.90e+06"),
   * "inf", "-inf", "nan", never "-0.00".
   */
  function formatNumber(x, d) {
    if (x !== x) return "nan";
    if (x === Infinity) return "inf";
    if (x === -Infinity) return "-inf";
    if (Math.abs(x) < 1e6) {
      var s = x.toFixed(d);
      return Number(s) === 0 && s.charAt(0) === "-" ? s.slice(1) : s;
    }
    var parts = x.toExponential(d).split("e");
    var exponent = parts[1];
    var sign = exponent.charAt(0);
    var digits = exponent.slice(1);
    return parts[0] + "e" + sign + (digits.length < 2 ? "0" + digits : digits);
  }

  var api = {
    logSumExp: logSumExp,
    logSoftmax: logSoftmax,
    softmax: softmax,
    crossEntropy: crossEntropy,
    gradient: gradient,
    meanCrossEntropy: meanCrossEntropy,
    lossFromProb: lossFromProb,
    meanLossFromProbs: meanLossFromProbs,
    natsToBits: natsToBits,
    bitsToNats: bitsToNats,
    perplexity: perplexity,
    formatNumber: formatNumber,
    smoothedTarget: smoothedTarget,
    smoothedLoss: smoothedLoss,
    smoothingFloor: smoothingFloor,
    focalLoss: focalLoss,
    temperatureStats: temperatureStats,
    ema: ema,
  };
  root.tokenlossMath = Object.freeze(api);
})(typeof window !== "undefined" ? window : globalThis);
