"""Properties of tl.cross_entropy that hold for any input (hypothesis): shift invariance, log V, non-negativity."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloss as tl

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, max_rows=5, max_vocab=9):
    """(logits (N, V) float32 with a large scale, targets (N,) with some ignored, seed)."""
    n_rows = draw(st.integers(1, max_rows))
    vocab_size = draw(st.integers(1, max_vocab))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, vocab_size, generator=gen, dtype=torch.float64).mul_(scale)
    targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)
    targets[torch.rand(n_rows, generator=gen) < 0.2] = -100
    return logits, targets, gen


options_without_shift_dependence = st.fixed_dictionaries(
    {
        "label_smoothing": st.sampled_from([0.0, 0.1, 0.9]),
        "focal_gamma": st.sampled_from([0.0, 0.5, 2.0]),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
    }
)


@SETTINGS
@given(batch=batches(), options=options_without_shift_dependence, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_adding_a_constant_to_a_row_changes_nothing(batch, options, dtype):
    """softmax(x + c) = softmax(x): per-row constants leave the loss and the gradient unchanged."""
    logits, targets, gen = batch
    shifts = torch.randn(logits.shape[0], 1, generator=gen, dtype=torch.float64).mul_(50).round_()
    tolerance = {"rtol": 1e-7, "atol": 1e-9}
    if dtype == torch.float32:
        # Dyadic logits (multiples of 2**-10 below 2**12) plus integer shifts are exact in float32, so
        # both calls see exactly shifted inputs. The loss is then exact up to ulp(logsumexp) ~ 1e-5:
        # enough for the cross-entropy, not for (1 - p) ** gamma with gamma < 1 at p ~ 1 - 1e-6,
        # whose float32 value is ill-conditioned (float64 checks that case above).
        logits = (logits.clamp(-4000, 4000) * 1024).round_() / 1024
        options = {**options, "focal_gamma": 0.0 if options["focal_gamma"] < 1 else options["focal_gamma"]}
        tolerance = {"rtol": 1e-4, "atol": 1e-4}
    results = []
    for x in (logits, logits + shifts):
        x = x.to(dtype).requires_grad_()
        loss = tl.cross_entropy(x, targets, **options)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], **tolerance)
    torch.testing.assert_close(results[1][1], results[0][1], **tolerance)


@SETTINGS
@given(
    vocab_size=st.integers(1, 70000),
    value=st.one_of(st.just(0.0), st.floats(-1e4, 1e4)),
    label_smoothing=st.sampled_from([0.0, 0.3]),
)
def test_uniform_logits_give_log_vocab(vocab_size, value, label_smoothing):
    """Equal logits (any value) give log V for every position; float32(log V) to 1 ulp when they are 0."""
    logits = torch.full((2, vocab_size), value)
    losses = tl.cross_entropy(
        logits, torch.tensor([0, vocab_size - 1]), reduction="none", label_smoothing=label_smoothing
    )
    expected = torch.tensor(math.log(vocab_size), dtype=torch.float32)
    if value == 0.0:  # the sum of V ones is exact; only float32's log rounds (to within 1 ulp)
        assert (losses - expected).abs().max().item() <= torch.finfo(torch.float32).eps * expected.item(), losses
    else:  # lse = value + log V is rounded at the magnitude of value
        tolerance = 4 * torch.finfo(torch.float32).eps * max(abs(value), math.log(max(vocab_size, 2)))
        assert (losses - expected).abs().max().item() <= tolerance


@SETTINGS
@given(
    batch=batches(max_vocab=30),
    label_smoothing=st.sampled_from([0.0, 0.2, 1.0]),
    focal_gamma=st.sampled_from([0.0, 0.5, 3.0]),
    z_loss=st.sampled_from([0.0, 1e-4]),
    softcap=st.sampled_from([None, 1.0, 30.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_loss_is_never_negative(batch, label_smoothing, focal_gamma, z_loss, softcap, dtype):
    """Every per-position loss is >= 0 (a probability is at most 1), whatever the options and the dtype."""
    logits, targets, _ = batch
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    losses = tl.cross_entropy(
        logits.to(dtype),
        targets,
        reduction="none",
        label_smoothing=label_smoothing,
        focal_gamma=focal_gamma,
        z_loss=z_loss,
        softcap=softcap,
    )
    assert (losses >= 0).all(), losses
