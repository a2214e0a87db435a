"""tokenloss.evaluation.meter.LossMeter: streaming, merging and all-reducing give the one-pass float64 numbers."""

from __future__ import annotations

import doctest
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenloss.evaluation import meter as meter_module
from tokenloss.evaluation.meter import LossMeter

VOCAB = 23
TEXTS = ["first batch of words", "the second, with ünïcödé", "and a third\n", "last one"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batches(seed=0):
    """Four batches of awkward shapes with large logits, a few ignored positions, and their texts."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for shape in [(3, 7), (1, 11), (2, 5), (4, 1)]:
        logits = torch.randn(*shape, VOCAB, generator=generator) * 6.0
        targets = torch.randint(0, VOCAB, shape, generator=generator)
        targets[0, 0] = -100
        batches.append((logits, targets))
    return batches


def direct_numbers(batches, texts, n_bins=15):
    """The truth, straight from the formulas in float64 over all positions at once."""
    x = torch.cat([logits.reshape(-1, VOCAB) for logits, _ in batches]).double()
    t = torch.cat([targets.reshape(-1) for _, targets in batches])
    keep = t != -100
    x, t = x[keep], t[keep]
    log_p = torch.log_softmax(x, -1)
    nll = -log_p.gather(-1, t[:, None])[:, 0]
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    rank = 1 + (x > x.gather(-1, t[:, None])).sum(-1)  # random logits: no ties
    confidence = p.max(-1).values
    correct = rank == 1
    n = len(t)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = (confidence > lo) & (confidence <= hi)
        if members.any():
            ece += abs(correct[members].double().mean() - confidence[members].mean()).item() * members.sum().item() / n
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    num_words = sum(len(text.split()) for text in texts)
    loss_sum = nll.sum().item()
    return {
        "tokens": n,
        "loss_sum_nats": loss_sum,
        "loss_nats": loss_sum / n,
        "perplexity": math.exp(loss_sum / n),
        "bits_per_token": loss_sum / n / math.log(2),
        "perplexity_base2": 2 ** (loss_sum / n / math.log(2)),
        "bytes": num_bytes,
        "words": num_words,
        "bits_per_byte": loss_sum / num_bytes / math.log(2),
        "byte_perplexity": math.exp(loss_sum / num_bytes),
        "word_perplexity": math.exp(loss_sum / num_words),
        "accuracy": correct.double().mean().item(),
        "top5_accuracy": (rank <= 5).double().mean().item(),
        "entropy_nats": entropy.mean().item(),
        "ece": ece,
        "log_vocab": math.log(VOCAB),
    }


def assert_matches(result, expected, rel=1e-6):
    for key, value in expected.items():
        if isinstance(value, int):
            assert result[key] == value, key
        else:
            assert result[key] == pytest.approx(value, rel=rel, abs=1e-9), key


def fill(meter, batches, texts):
    for (logits, targets), text in zip(batches, texts):
        meter.update(logits, targets)
        meter.count_text(num_bytes=len(text.encode("utf-8")), num_words=len(text.split()))
    return meter


def test_doctests():
    """The docstring example runs."""
    assert doctest.testmod(meter_module).failed == 0


def test_streaming_equals_direct_float64():
    """Batch-by-batch updates give the numbers of one float64 pass over everything."""
    batches = make_batches()
    result = fill(LossMeter(), batches, TEXTS).compute()
    assert_matches(result, direct_numbers(batches, TEXTS))
    assert result["vocab_size"] == VOCAB
    assert sum(result["reliability"]["count"]) == result["tokens"]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_merge_equals_one_meter(split):
    """Two meters over parts of the data, merged, equal one meter over all of it."""
    batches = make_batches()
    left = fill(LossMeter(), batches[:split], TEXTS[:split])
    right = fill(LossMeter(), batches[split:], TEXTS[split:])
    merged = left.merge(right).compute()
    whole = fill(LossMeter(), batches, TEXTS).compute()
    for key in ("tokens", "bytes", "words", "loss_sum_nats", "accuracy", "ece", "entropy_nats", "bits_per_byte"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-12), key
    assert merged["reliability"]["count"] == whole["reliability"]["count"]


def test_top_k_and_bins_are_options():
    """top_k adds top-k accuracies (1 always kept); n_bins sets the number of calibration bins."""
    batches = make_batches()
    result = fill(LossMeter(top_k=(3, 10), n_bins=7), batches, TEXTS).compute()
    assert {"accuracy", "top1_accuracy", "top3_accuracy", "top10_accuracy"} <= set(result)
    assert result["n_bins"] == 7 and len(result["reliability"]["count"]) == 7


def test_no_bytes_or_words_gives_none():
    """Without counted text the per-byte and per-word numbers are None, not a division by zero."""
    logits, targets = make_batches()[0]
    meter = LossMeter()
    meter.update(logits, targets)
    result = meter.compute()
    assert result["bits_per_byte"] is None and result["word_perplexity"] is None


def test_reset_and_repr():
    """reset() empties the sums; repr shows the running numbers."""
    meter = fill(LossMeter(), make_batches(), TEXTS)
    assert "tokens=" in repr(meter)
    meter.reset()
    assert int(meter.tokens) == 0 and float(meter.loss_sum_nats) == 0.0


def test_all_reduce_without_a_process_group_changes_nothing():
    """One process: all_reduce is a no-op, so one evaluation loop runs with and without torchrun."""
    meter = fill(LossMeter(), make_batches(), TEXTS)
    before = meter.compute()
    assert meter.all_reduce() is meter
    assert meter.compute() == before


@pytest.mark.parametrize(
    "action, error, match",
    [
        (lambda m: m.compute(), ValueError, "no token was scored"),
        (lambda m: m.merge(LossMeter(n_bins=3)), ValueError, "meters differ"),
        (lambda m: m.merge("meter"), TypeError, "LossMeter"),
        (lambda m: m.count_text(num_bytes=-1), ValueError, "num_bytes"),
    ],
)
def test_bad_use(action, error, match):
    """Misuse raises a clear error."""
    with pytest.raises(error, match=match):
        action(LossMeter())


def test_vocab_mismatch_is_an_error():
    """Logits of another vocabulary size cannot go into the same meter."""
    meter = LossMeter()
    meter.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="V"):
        meter.update(torch.zeros(2, 6), torch.tensor([0, 1]))


@pytest.mark.parametrize("n_bins, top_k", [(0, (1,)), (5, ()), (5, (0,))])
def test_bad_options(n_bins, top_k):
    """Zero bins, no k, or k = 0 are errors."""
    with pytest.raises(ValueError):
        LossMeter(n_bins=n_bins, top_k=top_k)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # forked from a parent whose OpenMP pool must not be reused
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        batches = make_batches()
        meter = fill(LossMeter(), batches[rank::world_size], TEXTS[rank::world_size])
        meter.all_reduce()
        (out_dir / f"rank{rank}.json").write_text(json.dumps(meter.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_over_two_gloo_processes_equals_single_process(tmp_path):
    """Each of 2 ranks meters half the batches; after all_reduce both hold the one-process numbers."""
    # fork: the children reuse the imported torch instead of importing it again (seconds on a busy box).
    mp.start_processes(_distributed_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    batches = make_batches()
    single = fill(LossMeter(), batches, TEXTS).compute()
    for got in results:
        for key in ("tokens", "bytes", "words", "vocab_size"):
            assert got[key] == single[key], key
        for key in ("loss_sum_nats", "perplexity", "bits_per_byte", "word_perplexity", "accuracy", "ece"):
            assert got[key] == pytest.approx(single[key], rel=1e-12), key
        assert got["reliability"]["count"] == single["reliability"]["count"]
    assert_matches(results[0], direct_numbers(batches, TEXTS))
