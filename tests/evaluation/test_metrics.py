"""Tests of tokenloss.evaluation.metrics: normalisations, per-token statistics, accuracy, entropy, calibration."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.evaluation import metrics
from tokenloss.evaluation.meter import summarize
from tokenloss.reference import reference_cross_entropy

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_logits(shape, dtype, scale=3.0, seed=0):
    """Normal logits times ``scale``, drawn in float64 and rounded once to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def test_doctests():
    """The examples in the docstrings run and print what they say."""
    assert doctest.testmod(metrics).failed == 0


@pytest.mark.parametrize(
    "nats, perplexity",
    [(-math.log(0.5), 2.0), (math.log(10.0), 10.0), (math.log(5), 5.0), (math.log(256), 256.0), (0.0, 1.0)],
)
def test_perplexity_is_exp_of_nats_and_two_to_the_bits(nats, perplexity):
    """perplexity = exp(nats) = 2 ** bits, for floats and tensors."""
    assert metrics.perplexity(nats) == pytest.approx(perplexity, rel=1e-12)
    bits = metrics.bits_per_token(nats)
    assert bits == pytest.approx(nats / math.log(2), rel=1e-12)
    assert metrics.perplexity_base2(bits) == pytest.approx(perplexity, rel=1e-12)
    as_tensor = metrics.perplexity(torch.tensor(nats, dtype=torch.float64))
    assert_close(as_tensor, torch.tensor(perplexity, dtype=torch.float64))


def test_reference_numbers():
    """The course numbers: 3.32 bits is a perplexity of 10; log 256 nats is 8 bits."""
    assert metrics.perplexity_base2(3.32) == pytest.approx(10.0, abs=0.02)
    assert metrics.bits_per_token(math.log(256)) == pytest.approx(8.0)
    assert metrics.bits_per_token(5.545) == pytest.approx(8.0, abs=1e-3)


def test_byte_and_word_normalisations_follow_lm_eval():
    """bits per byte = sum / bytes / ln 2; byte ppl = exp(sum / bytes) = 2 ** bpb; word ppl = exp(sum / words)."""
    text = "Naïve café, seven words?  no:\tseven words."
    loss_sum = 123.456
    num_bytes, num_words = metrics.count_bytes(text), metrics.count_words(text)
    assert num_bytes == len(text.encode("utf-8")) == len(text) + 2
    assert num_words == 7
    bpb = metrics.bits_per_byte(loss_sum, num_bytes)
    assert bpb == pytest.approx(loss_sum / num_bytes / math.log(2), rel=1e-12)
    assert metrics.byte_perplexity(loss_sum, num_bytes) == pytest.approx(2**bpb, rel=1e-12)
    assert metrics.word_perplexity(loss_sum, num_words) == pytest.approx(math.exp(loss_sum / 7), rel=1e-12)


@pytest.mark.parametrize(
    "text, words",
    [("one", 1), ("two words", 2), (" leading", 2), ("trailing\n", 2), ("a\n\n b\tc", 3), ("", 1)],
)
def test_count_words_is_lm_eval_split(text, words):
    """Words are len(re.split(r"\\s+", text)), empty pieces at the ends included, as the harness counts."""
    assert metrics.count_words(text) == words


@pytest.mark.parametrize("name", ["bits_per_byte", "byte_perplexity", "word_perplexity"])
@pytest.mark.parametrize("count", [0, -3])
def test_normalisations_reject_non_positive_counts(name, count):
    """Dividing by zero bytes or words is an error naming the count."""
    with pytest.raises(ValueError, match="must be positive"):
        getattr(metrics, name)(1.0, count)


def reference_statistics(logits, targets):
    """float64 truth: log p, entropy, rank (ties by index), top-1 probability."""
    x = logits.double().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    log_p = torch.log_softmax(x, -1)
    p = log_p.exp()
    entropy = -(torch.where(p > 0, p * log_p, torch.zeros_like(p))).sum(-1)
    ranks = []
    for row, target in zip(x.tolist(), t.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks.append(order.index(target) + 1)
    return log_p.gather(-1, t[:, None])[:, 0], entropy, torch.tensor(ranks), p.max(-1).values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, scale", [((3, 7, 11), 3.0), ((5, 1), 1.0), ((2, 4, 37), 40.0)])
@pytest.mark.parametrize("top_k", [0, 3])
def test_token_statistics_match_float64(dtype, shape, scale, top_k, make_logits, tolerances):
    """log p, entropy, rank, confidence and top-k equal a float64 computation on the same (cast) logits;
    top_k=0 (a summary) gives the same numbers and no alternatives."""
    logits = make_logits(*shape, dtype=dtype, scale=scale)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    stats = metrics.token_statistics(logits, targets, top_k=top_k)
    log_p, entropy, rank, confidence = reference_statistics(logits, targets)
    tol = tolerances[torch.float32]  # the statistics are computed in float32 whatever the input dtype
    assert_close(stats.log_prob.double(), log_p, **tol)
    reference = -reference_cross_entropy(logits, targets, reduction="none").reshape(-1)
    assert_close(stats.log_prob.double(), reference, **tol)
    assert_close(stats.entropy.double(), entropy, **tol)
    assert torch.equal(stats.rank, rank)
    assert_close(stats.confidence.double(), confidence, **tol)
    k = min(top_k, shape[-1])
    top = torch.softmax(logits.double().reshape(-1, shape[-1]), -1).topk(k, -1)
    assert_close(stats.top_probs.double(), top.values, **tol)
    assert stats.top_ids.shape == (targets.numel(), k)
    assert stats.vocab_size == shape[-1]


@pytest.mark.parametrize("block_rows, block_columns", [(1, 1), (2, 3), (4, 5), (128, 4096)])
@pytest.mark.parametrize("top_k", [0, 1, 7])
def test_token_statistics_blocks_combine_exactly(block_rows, block_columns, top_k, monkeypatch):
    """The statistics of rows cut into blocks of rows and columns equal the float64 whole-row ones: with
    ties across blocks, a block of only -inf logits, top-k spread over blocks, and k wider than a block."""
    monkeypatch.setattr(metrics, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(metrics, "_BLOCK_COLUMNS", block_columns)
    logits = random_logits((9, 13), torch.float32, 4.0)
    logits[0] = 0.0  # every class ties with the target
    logits[1, :6] = -math.inf  # whole blocks of -inf (for widths up to 5)
    logits[2, [1, 6, 11]] = logits[2, 3].item()  # ties with the target in other blocks
    targets = torch.tensor([4, 8, 3, 0, 12, 5, 6, 7, 2])
    stats = metrics.token_statistics(logits, targets, top_k=top_k)
    log_p, _, rank, confidence = reference_statistics(logits, targets)
    p64 = torch.softmax(logits.double(), -1)
    entropy = -torch.where(p64 > 0, p64 * p64.log(), 0.0).sum(-1)
    tol = {"rtol": 2e-5, "atol": 2e-6}
    assert_close(stats.log_prob.double(), log_p, **tol)
    assert_close(stats.entropy.double(), entropy, **tol)
    assert_close(stats.confidence.double(), confidence, **tol)
    assert torch.equal(stats.rank, rank)
    top = p64.topk(top_k, -1)
    assert_close(stats.top_probs.double(), top.values, **tol)
    assert torch.equal(p64.gather(-1, stats.top_ids), top.values)  # the ids name those probabilities


def test_token_statistics_log_prob_is_the_library_loss():
    """The log-probability is bit for bit -tl.cross_entropy(reduction="none"), and -inf logits are handled."""
    logits = random_logits((4, 9), torch.float32, 5.0)
    logits[:, 3] = -math.inf
    targets = torch.tensor([0, 1, 2, 8])
    stats = metrics.token_statistics(logits, targets)
    assert torch.equal(stats.log_prob, -tl.cross_entropy(logits, targets, reduction="none"))
    log_p = torch.log_softmax(logits.double(), -1)
    entropy = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1)  # 0 log 0 = 0
    assert_close(stats.entropy.double(), entropy, rtol=2e-5, atol=2e-6)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    assert_close(stats.log_prob.double(), expected, rtol=2e-5, atol=2e-6)


def test_token_statistics_drops_ignore_index():
    """Rows whose target is ignore_index are left out."""
    logits = random_logits((2, 5, 7), torch.float32)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    stats = metrics.token_statistics(logits, targets)
    keep = targets.reshape(-1) != -100
    expected = metrics.token_statistics(logits.reshape(-1, 7)[keep], targets.reshape(-1)[keep])
    assert len(stats) == 8
    assert torch.equal(stats.log_prob, expected.log_prob)


@pytest.mark.parametrize(
    "logits, targets, error, match",
    [
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), TypeError, "floating"),
        (torch.zeros(3, 4), torch.zeros(3), TypeError, "integer"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(3, 4), torch.tensor([0, 1, 4]), ValueError, "4"),
    ],
)
def test_token_statistics_bad_input(logits, targets, error, match):
    """Wrong dtypes, shapes or out-of-range targets raise a clear error."""
    with pytest.raises(error, match=match):
        metrics.token_statistics(logits, targets)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_accuracy_matches_direct_topk(k):
    """Top-k accuracy is the fraction of targets among the k largest logits (distinct logits)."""
    logits = random_logits((6, 13, 9), torch.float32)
    targets = torch.randint(0, 9, (6, 13), generator=torch.Generator().manual_seed(2))
    hits = (logits.topk(k, -1).indices == targets[..., None]).any(-1)
    assert_close(metrics.accuracy(logits, targets, k=k), hits.double().mean())


def test_accuracy_breaks_ties_like_argmax():
    """Uniform logits are a hit only for class 0, as argmax picks; they are not "always right"."""
    targets = torch.tensor([0, 1, 2, 3])
    assert metrics.accuracy(torch.zeros(4, 5), targets).item() == 0.25
    assert metrics.accuracy(torch.zeros(4, 5), targets, k=2).item() == 0.5
    with pytest.raises(ValueError, match="k must be"):
        metrics.accuracy(torch.zeros(4, 5), targets, k=0)


@pytest.mark.parametrize("vocab", [1, 5, 256])
def test_mean_entropy_of_uniform_is_log_v(vocab):
    """Uniform predictions have entropy log V (1.609 for V = 5, 5.545 for V = 256)."""
    assert_close(metrics.mean_entropy(torch.zeros(3, 4, vocab)), torch.tensor(math.log(vocab), dtype=torch.float64))


def direct_ece(confidence, correct, n_bins):
    """A loop over bins, in float64: the textbook formula."""
    n = len(confidence)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_textbook_loop(n_bins):
    """ECE with equal-width, right-closed bins equals the direct loop."""
    generator = torch.Generator().manual_seed(3)
    confidence = torch.rand(200, generator=generator, dtype=torch.float64)
    confidence[:5] = torch.tensor([0.0, 1.0, 0.1, 0.2, 0.5], dtype=torch.float64)
    correct = torch.rand(200, generator=generator) < confidence.float()
    ece = metrics.expected_calibration_error(confidence, correct, n_bins=n_bins)
    expected = direct_ece(confidence.tolist(), correct.tolist(), n_bins)
    assert ece == pytest.approx(expected, abs=1e-12)


def test_reliability_diagram_bins():
    """Each bin holds its count, mean confidence and accuracy; empty bins are NaN; edge values go left."""
    confidence = torch.tensor([0.1, 0.5, 0.55, 1.0])
    correct = torch.tensor([False, True, False, True])
    diagram = metrics.reliability_diagram(confidence, correct, n_bins=2)
    assert diagram.edges == [0.0, 0.5, 1.0]
    assert diagram.count == [2, 2]
    assert diagram.confidence == pytest.approx([0.3, 0.775])
    assert diagram.accuracy == pytest.approx([0.5, 0.5])
    assert diagram.ece == pytest.approx((2 * abs(0.5 - 0.3) + 2 * abs(0.5 - 0.775)) / 4)
    empty = metrics.reliability_diagram(torch.tensor([0.9]), torch.tensor([True]), n_bins=4)
    assert math.isnan(empty.accuracy[0]) and empty.to_dict()["accuracy"][0] is None


def test_reliability_diagram_bad_input():
    """Probabilities outside [0, 1], mismatched shapes and zero bins are errors."""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.reliability_diagram(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.reliability_diagram(torch.tensor([0.5, 0.5]), torch.tensor([True]))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.reliability_diagram(torch.tensor([0.5]), torch.tensor([True]), n_bins=0)


def test_summarize_matches_float64():
    """summarize() of a batch equals the numbers computed directly in float64."""
    logits = random_logits((4, 6, 17), torch.float32, 4.0)
    targets = torch.randint(0, 17, (4, 6), generator=torch.Generator().manual_seed(4))
    text = "twenty four tokens of text"
    result = summarize(logits, targets, text=text)
    log_p, entropy, rank, confidence = reference_statistics(logits, targets)
    loss_sum = -log_p.sum().item()
    assert result["tokens"] == 24
    assert result["loss_nats"] == pytest.approx(loss_sum / 24, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / 24), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(loss_sum / len(text) / math.log(2), rel=1e-6)
    assert result["word_perplexity"] == pytest.approx(math.exp(loss_sum / 5), rel=1e-6)
    assert result["accuracy"] == pytest.approx((rank == 1).double().mean().item())
    assert result["top5_accuracy"] == pytest.approx((rank <= 5).double().mean().item())
    assert result["entropy_nats"] == pytest.approx(entropy.mean().item(), rel=1e-6)
    ece = direct_ece(confidence.tolist(), (rank == 1).tolist(), 15)
    assert result["ece"] == pytest.approx(ece, abs=1e-6)
    assert result["log_vocab"] == pytest.approx(math.log(17))


def test_import_stays_light():
    """None of the evaluation modules imports matplotlib or transformers at import time."""
    code = (
        "import sys; from tokenloss.evaluation import metrics; assert metrics.perplexity(0.0) == 1.0; "
        "import tokenloss.evaluation.meter, tokenloss.evaluation.scoring, tokenloss.evaluation.reports; "
        "import tokenloss.models; "
        "heavy = {'matplotlib', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
