"""Tests of the training loop: the start at log 256, the fall, the split, the schedule, early stopping, the log."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from tokenloss.models.bytegpt import ByteGPT, GPTConfig
from tokenloss.training.corpus import MODULES, corpus_fingerprint, default_corpus, stdlib_docstrings
from tokenloss.training.loop import ByteDataset, TrainConfig, learning_rate, next_byte_loss, train

TINY = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
TEXT = (
    "The loss of a language model is the average surprise of the next token. "
    "A model that guesses uniformly over 256 bytes pays log 256 = 5.545 nats per byte. "
) * 40


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny models run fastest that way on a shared CPU (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dataset(text: str = TEXT, block_size: int = 16) -> ByteDataset:
    return ByteDataset.from_text(text, block_size=block_size, val_fraction=0.1)


def _quick(**overrides) -> TrainConfig:
    settings = dict(steps=40, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=10, eval_windows=8, log_interval=5)
    return TrainConfig(**{**settings, **overrides})


def test_short_run_starts_at_log_v_and_falls(tmp_path):
    """A run of seconds: the first logged loss is log 256 (within 0.1; in fact to float rounding) and it falls."""
    result = train(_dataset(), TINY, _quick(), out_dir=tmp_path, progress=False)
    assert abs(result.first_loss - math.log(256)) < 0.1
    assert result.first_loss == pytest.approx(math.log(256), abs=1e-4)
    assert result.history[0]["step"] == 0 and result.history[0]["loss"] == result.first_loss
    assert result.history[0]["val_loss"] == pytest.approx(math.log(256), abs=1e-4)
    assert result.final_train_loss < result.first_loss - 1.5
    assert result.final_val_loss < math.log(256) - 1.5
    assert result.steps_run == 40 and result.tokens == 40 * 8 * 16


def test_log_jsonl_and_checkpoint_are_written(tmp_path):
    """log.jsonl: one object per logged step (step, loss, lr, tokens/s; val_loss if evaluated); best model saved."""
    result = train(_dataset(), TINY, _quick(steps=21), out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records == result.history
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20]
    for record in records:
        assert {"step", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s"} <= set(record)
        assert record["ppl"] == pytest.approx(math.exp(record["loss"]))
    saved = ByteGPT.from_pretrained(tmp_path)
    val_x, val_y = _dataset().val_windows(8)
    with torch.no_grad():
        saved_loss = F.cross_entropy(saved.logits(val_x).reshape(-1, 256), val_y.reshape(-1)).item()
    assert saved_loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_same_seed_same_run_other_seed_other_run():
    """The seed fixes weights and batches: equal seeds give equal losses, another seed different ones."""
    runs = [train(_dataset(), TINY, _quick(steps=12, seed=seed), progress=False) for seed in (3, 3, 4)]
    losses = [[r["loss"] for r in run.history] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_rerun_gives_bit_identical_weight_tensors(tmp_path):
    """What the README promises: on one machine and torch build, with the same seed and thread count, a
    re-run saves bit-identical weight tensors (the file's bytes are not compared: its header order may vary)."""
    from safetensors.torch import load_file

    for name in ("a", "b"):
        train(_dataset(), TINY, _quick(steps=12, seed=5), out_dir=tmp_path / name, progress=False)
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert first.keys() == second.keys() and len(first) > 0
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_early_stopping_after_patience_evaluations():
    """With lr = 0 the validation loss never improves: the run stops after `patience` evaluations past the first."""
    result = train(_dataset(), TINY, _quick(steps=100, lr=0.0, min_lr=0.0, patience=2), progress=False)
    assert result.stopped_early
    assert result.steps_run == 21  # evaluations at steps 0 (best), 10 and 20 (no improvement twice)
    assert result.best_step == 0


def test_best_weights_are_kept():
    """The returned model is the one with the lowest periodic validation loss."""
    dataset = _dataset()
    result = train(dataset, TINY, _quick(steps=30, lr=3e-2), progress=False)
    val_x, val_y = dataset.val_windows(8)
    with torch.no_grad():
        loss = next_byte_loss(result.model, val_x, val_y).item()
    assert loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_next_byte_loss_matches_pytorch():
    """The training loss (fused linear + cross-entropy) equals F.cross_entropy of the model's logits."""
    torch.manual_seed(0)
    model = ByteGPT(TINY)
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    x, y = torch.randint(0, 256, (3, 7)), torch.randint(0, 256, (3, 7))
    expected = F.cross_entropy(model.logits(x).reshape(-1, 256), y.reshape(-1))
    torch.testing.assert_close(next_byte_loss(model, x, y), expected, rtol=2e-5, atol=2e-6)


def test_split_holds_out_the_end_of_the_text():
    """Validation is the last val_fraction of the bytes; windows are inputs and next-byte targets."""
    data = bytes(range(256)) * 4
    dataset = ByteDataset.from_bytes(data, block_size=8, val_fraction=0.25)
    assert len(dataset.train) == 768 and len(dataset.val) == 256
    assert dataset.val[0].item() == data[768]
    x, y = dataset.train_batch(5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    vx, vy = dataset.val_windows(None)
    assert vx.shape == (31, 8) and torch.equal(vx[0], torch.arange(8))


def test_too_short_text_is_refused_with_the_size_needed():
    """A text shorter than one window per split names its source and the bytes needed."""
    with pytest.raises(ValueError, match=r"notes\.txt is too short.*needs at least 170 bytes"):
        ByteDataset.from_bytes(b"x" * 100, block_size=16, val_fraction=0.1, source="notes.txt")


def test_learning_rate_warms_up_then_decays():
    """Linear warmup to lr, cosine down to min_lr at the last step."""
    config = TrainConfig(steps=110, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx(5.5e-4)
    assert learning_rate(110, config) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("steps", 0, ValueError),
        ("val_fraction", 1.0, ValueError),
        ("lr", -1.0, ValueError),
        ("patience", 1.5, TypeError),
    ],
)
def test_train_config_rejects_bad_values(field, value, error):
    """TrainConfig names the bad field."""
    with pytest.raises(error, match=field):
        TrainConfig(**{field: value})


def test_default_corpus_is_deterministic_prose():
    """The default corpus is the same on every call, hundreds of kB of English docstrings."""
    text = default_corpus()
    assert text == stdlib_docstrings(MODULES)
    fingerprint = corpus_fingerprint(text)
    assert fingerprint["bytes"] > 300_000
    assert "Return" in text and "\n\n" in text
    assert corpus_fingerprint(text.encode("utf-8")) == fingerprint


def test_divergence_is_a_clear_error():
    """A learning rate that blows the loss up stops the run with a ValueError naming the step."""
    with pytest.raises(ValueError, match=r"training diverged: the loss is (nan|inf) at step \d+"):
        train(_dataset(), TINY, _quick(steps=60, lr=1e6, warmup_steps=0, min_lr=1e6, grad_clip=0.0), progress=False)
