"""Tests of tokenloss.evaluation.scoring: sliding windows score each token once, and match a full-context pass."""

from __future__ import annotations

import contextlib
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from tokenloss.evaluation.scoring import TextScores, evaluate, plan_windows, score_text
from tokenloss.models import ByteLM, CausalLM
from tokenloss.models.bytegpt import ByteGPT, GPTConfig

ALPHABET = "abcdefghij "
TEXT = "the quick brown fox jumps over the lazy dog; naïve café ✓ 🙂"


pytestmark = pytest.mark.usefixtures("one_thread")


class BigramLM(CausalLM):
    """A model whose logits at t depend on x_t and x_(t-1) only, never on the position.

    Sliding windows whose first scored token keeps at least two tokens of context must give
    exactly the scores of one pass over the whole text.
    """

    def __init__(self, *, max_length: int, with_bos: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.name = "bigram"
        self.vocab_size = len(ALPHABET) + 1
        self.max_length = max_length
        self.bos_token_id = len(ALPHABET) if with_bos else None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.current = torch.randn(self.vocab_size, self.vocab_size, generator=generator) * 2
        self.previous = torch.randn(self.vocab_size + 1, self.vocab_size, generator=generator) * 2  # last row: none
        self.inputs: list[torch.Tensor] = []

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def token_offsets(self, text):
        return [(i, i + 1) for i in range(len(text))]

    def decode_token(self, token_id):
        return ALPHABET[token_id] if token_id < len(ALPHABET) else "<s>"

    def logits(self, input_ids, *, out=None):
        self.inputs.append(input_ids.clone())
        none = torch.full_like(input_ids[:, :1], self.vocab_size)
        before = torch.cat([none, input_ids[:, :-1]], dim=1)
        return self.current[input_ids] + self.previous[before]  # (B, T, V)


def bigram_text(n: int, seed: int = 1) -> str:
    generator = torch.Generator().manual_seed(seed)
    return "".join(ALPHABET[i] for i in torch.randint(0, len(ALPHABET), (n,), generator=generator).tolist())


def full_pass_log_probs(model: CausalLM, text: str, bos: bool) -> torch.Tensor:
    """log p of each token from one forward pass over the whole text (float64 log-softmax); NaN if unscored."""
    ids = model.encode(text)
    prefix = [model.bos_token_id] if bos else []
    logits = model.logits(torch.tensor([prefix + ids])).double()[0]  # (T, V)
    log_p = torch.log_softmax(logits, -1)
    out = torch.full((len(ids),), math.nan, dtype=torch.float64)
    for i in range(0 if bos else 1, len(ids)):
        out[i] = log_p[i + len(prefix) - 1, ids[i]]
    return out


# ---------------------------------------------------------------------------------------------
# The window plan.


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("max_length", [2, 3, 8])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17])
def test_plan_scores_every_token_once_with_bounded_context(num_tokens, max_length, bos):
    """Every token (but the first without BOS) is scored once; context in [min(i, C - S), min(i, C - 1)]."""
    capacity = max_length - bos
    for stride in range(1, max_length):
        windows = plan_windows(num_tokens, max_length=max_length, stride=stride, bos=bos)
        scored = [i for w in windows for i in range(w.score_from, w.end)]
        assert scored == list(range(0 if bos else 1, num_tokens))
        for w in windows:
            assert w.end - w.begin + bos <= max_length
            assert w.score_from >= w.begin + (not bos)
            assert w.end - w.begin == min(capacity, num_tokens)  # equal lengths: batches need no padding
            for i in range(w.score_from, w.end):
                assert min(i, capacity - stride) <= i - w.begin <= min(i, capacity - 1)
        if num_tokens > capacity:
            assert len(windows) == 1 + math.ceil((num_tokens - capacity) / stride)


@pytest.mark.parametrize(
    "max_length, stride, match",
    [(8, 8, "smaller than max_length"), (8, 9, "smaller than max_length"), (1, 1, "at least 2"), (8, 0, "at least 1")],
)
def test_plan_rejects_bad_windows(max_length, stride, match):
    """A stride of L or more (no context for the first new token), L < 2 or S < 1 are errors."""
    with pytest.raises(ValueError, match=match):
        plan_windows(10, max_length=max_length, stride=stride, bos=False)


# ---------------------------------------------------------------------------------------------
# Scores against a full-context pass.


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_windows_equal_full_pass_when_context_suffices(bos, batch_size):
    """Any stride that leaves two tokens of context reproduces the full pass exactly, text far longer than L."""
    max_length, text = 7, bigram_text(40)
    model = BigramLM(max_length=max_length, with_bos=bos)
    reference = full_pass_log_probs(BigramLM(max_length=10_000, with_bos=bos), text, bos)
    for stride in range(1, max_length - bos - 1):
        scores = score_text(model, text, stride=stride, bos=bos, batch_size=batch_size)
        assert scores.bos == bos and scores.scored.tolist() == [bos or i > 0 for i in range(len(text))]
        assert_close(scores.log_prob.double(), reference, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bos", [False, True])
def test_too_little_context_changes_scores(bos):
    """With one token of context (or BOS only) the first scored token of a window differs: the test can fail."""
    max_length, text = 7, bigram_text(40)
    model = BigramLM(max_length=max_length, with_bos=bos)
    reference = full_pass_log_probs(BigramLM(max_length=10_000, with_bos=bos), text, bos)
    scores = score_text(model, text, stride=max_length - 1, bos=bos)
    assert not torch.allclose(scores.log_prob.double(), reference, equal_nan=True)


@pytest.mark.parametrize("bos", [False, True])
def test_windows_feed_the_right_tokens(bos):
    """The model sees BOS (if any) then ids[begin:end] of each planned window, in batches."""
    text = bigram_text(23)
    model = BigramLM(max_length=6, with_bos=bos)
    score_text(model, text, stride=2, batch_size=2)
    ids = model.encode(text)
    plan = plan_windows(len(ids), max_length=6, stride=2, bos=bos)
    fed = torch.cat(model.inputs)
    prefix = [model.bos_token_id] if bos else []
    assert fed.tolist() == [prefix + ids[w.begin : w.end] for w in plan]
    assert [len(batch) for batch in model.inputs] == [2] * (len(plan) // 2) + [1] * (len(plan) % 2)


def tiny_byte_model(block_size: int = 96, seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    module = ByteGPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    torch.nn.init.normal_(module.lm_head.weight, std=0.5)  # a non-uniform random model
    return ByteLM(module, name="tiny byte GPT")


@pytest.mark.parametrize("stride", [1, 5, 31, 95])
def test_byte_gpt_fitting_text_equals_full_pass(stride):
    """When the text fits the context, every stride gives the scores of one full-context pass."""
    model = tiny_byte_model()
    text = TEXT
    assert len(text.encode()) <= model.max_length
    reference = full_pass_log_probs(model, text, bos=False)
    scores = score_text(model, text, stride=stride)
    assert scores.num_windows == 1
    assert_close(scores.log_prob.double(), reference, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_byte_gpt_long_text_scores_each_byte_once():
    """A text longer than the context: every byte but the first scored once, batch size irrelevant."""
    model = tiny_byte_model(block_size=16)
    text = TEXT * 2
    one = score_text(model, text, stride=5, batch_size=1)
    many = score_text(model, text, stride=5, batch_size=4)
    n = len(text.encode())
    assert len(one) == n and one.num_scored == n - 1
    assert one.context[1:].min() == 1 and one.context.max() == 15 and one.context[16:].min() == 11
    assert_close(one.log_prob, many.log_prob, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(one.rank, many.rank)


def test_text_scores_fields():
    """Offsets, token text, surprisal, ranks, top-k and the first token are consistent with each other."""
    model = tiny_byte_model()
    text = "é a"
    scores = score_text(model, text, top_k=3)
    assert scores.token_ids == list(text.encode())
    assert scores.offsets == [(0, 1), (0, 1), (1, 2), (2, 3)]
    assert scores.token_text == ["<0xC3>", "<0xA9>", " ", "a"]
    assert scores.first_token()["scored"] is False and scores.first_token()["text"] == "<0xC3>"
    assert_close(scores.surprisal_bits[1:], -scores.log_prob[1:] / math.log(2))
    assert scores.top_ids.shape == (4, 3) and (scores.top_ids[0] == -1).all()
    for i in range(1, 4):
        assert scores.rank[i] >= 1
        assert scores.top_probs[i, 0] >= scores.top_probs[i, 1] >= scores.top_probs[i, 2]
        assert scores.top_text[i] == [model.decode_token(t) for t in scores.top_ids[i].tolist()]
        if scores.rank[i] == 1:
            assert scores.top_ids[i, 0] == scores.token_ids[i]
    rows = list(scores.rows())
    assert rows[0]["scored"] is False and rows[0]["log_prob_nats"] is None
    assert rows[3]["probability"] == pytest.approx(math.exp(scores.log_prob[3].item()))
    assert scores.scored_bytes == 4 - 1 and scores.scored_words == 2


@pytest.mark.parametrize(
    "kwargs, text, error, match",
    [
        ({}, "", ValueError, "empty"),
        ({}, "a", ValueError, "single token"),
        ({"stride": 96}, "abc", ValueError, "smaller than max_length"),
        ({"max_length": 97}, "abc", ValueError, "exceeds the model's context"),
        ({"bos": True}, "abc", ValueError, "no BOS"),
        ({"batch_size": 0}, "abc", ValueError, "batch_size"),
        ({}, b"abc", TypeError, "str"),
    ],
)
def test_score_text_bad_input(kwargs, text, error, match):
    """Empty text, a lone token without BOS, bad windows, BOS without one, a bad batch size: clear errors."""
    with pytest.raises(error, match=match):
        score_text(tiny_byte_model(), text, **kwargs)


# ---------------------------------------------------------------------------------------------
# evaluate(): the numbers of the whole text, one process or sharded.


def test_evaluate_matches_direct_float64():
    """evaluate() of a fitting text equals metrics computed directly from a full pass in float64."""
    model = tiny_byte_model()
    text = TEXT
    result = evaluate(model, text).result
    log_p = full_pass_log_probs(model, text, bos=False)[1:]
    loss_sum = -log_p.sum().item()
    n = len(log_p)
    assert result["tokens"] == n == len(text.encode()) - 1
    assert result["loss_nats"] == pytest.approx(loss_sum / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / n), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss_sum / n / math.log(2), rel=1e-5)  # one byte per token
    assert result["bits_per_byte"] == pytest.approx(result["bits_per_token"], rel=1e-12)
    assert result["words"] == len(text[1:].split())
    assert result["bos"] is False and result["first_token"]["text"] == "t"
    assert result["num_windows"] == 1 and result["world_size"] == 1
    assert result["log_vocab"] == pytest.approx(math.log(256))


def test_combine_shards_equals_unsharded():
    """Scores of two shards (windows dealt round-robin) combine into the one-process scores."""
    model = tiny_byte_model(block_size=16)
    text = TEXT
    whole = score_text(model, text, stride=6)
    parts = [score_text(model, text, stride=6, shard=(rank, 2)) for rank in (0, 1)]
    assert not (parts[0].scored & parts[1].scored).any()
    combined = TextScores.combine(parts)
    assert torch.equal(combined.scored, whole.scored)
    assert_close(combined.log_prob, whole.log_prob, equal_nan=True)
    assert combined.top_text == whole.top_text and combined.num_windows == whole.num_windows
    with pytest.raises(ValueError, match="same token"):
        TextScores.combine([parts[0], parts[0]])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _evaluate_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # forked: do not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        evaluation = evaluate(tiny_byte_model(block_size=16), TEXT * 2, stride=6, batch_size=2)
        out = {"result": evaluation.result}
        if rank == 0:
            out["log_prob"] = evaluation.scores.log_prob.tolist()
        else:
            out["scores_is_none"] = evaluation.scores is None
        (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_evaluate_sharded_over_two_gloo_processes_equals_single_process(tmp_path):
    """Under a 2-process gloo group each rank scores half the windows; the numbers equal one process."""
    mp.start_processes(_evaluate_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    single = evaluate(tiny_byte_model(block_size=16), TEXT * 2, stride=6, batch_size=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for got in ranks:
        result = got["result"]
        assert result["world_size"] == 2 and result["num_windows"] == single.result["num_windows"]
        for key in ("tokens", "bytes", "words", "first_token"):
            assert result[key] == single.result[key], key
        for key in ("loss_sum_nats", "perplexity", "bits_per_byte", "word_perplexity", "accuracy", "ece"):
            assert result[key] == pytest.approx(single.result[key], rel=1e-6), key
    assert_close(torch.tensor(ranks[0]["log_prob"]), single.scores.log_prob, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert ranks[1]["scores_is_none"]


# ---------------------------------------------------------------------------------------------
# Streaming: memory bounded by a piece and a batch, not by the text.


@pytest.mark.slow
@pytest.mark.parametrize("with_report", [False, True])
def test_streamed_memory_does_not_grow_with_the_text(tmp_path, with_report):
    """Python memory (tracemalloc peak) of evaluate_stream over a text 4x longer stays within 10% + 64 KiB:
    tokens, offsets and text are dropped once scored, and the report keeps a bounded page."""
    import tracemalloc

    from tokenloss.evaluation.reports import ReportWriter
    from tokenloss.evaluation.scoring import evaluate_stream

    model = ByteLM(ByteGPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=16)))
    peaks = []
    for repeats in (3, 12) if with_report else (30, 120):
        writer = ReportWriter(tmp_path / str(repeats), html_tokens=300, plot=False) if with_report else None
        tracemalloc.start()
        try:
            with writer or contextlib.nullcontext():
                result = evaluate_stream(
                    model, (TEXT * 10 for _ in range(repeats)), max_length=128, stride=120, batch_size=8,
                    piece_chars=1024, sink=writer,
                ).result  # fmt: skip
                if writer:
                    writer.finish(result, vocab_size=256)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert result["tokens"] == len((TEXT * 10).encode()) * repeats - 1
    assert peaks[1] <= 1.1 * peaks[0] + 65536, peaks
