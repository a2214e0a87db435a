"""tokenloss.ops.cross_entropy: the chunk rule, what the autograd Function keeps, and where its gradient goes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tokenloss.ops.cross_entropy import CHUNK_ELEMENTS, cross_entropy_rows, plain_chunk_rows
from tokenloss.options import LossOptions
from tokenloss.reference import reference_cross_entropy


def test_plain_chunk_rows():
    """About CHUNK_ELEMENTS elements per chunk, at least one row, or the chunk_size asked for."""
    assert plain_chunk_rows(32000) == CHUNK_ELEMENTS // 32000
    assert plain_chunk_rows(4 * CHUNK_ELEMENTS) == 1
    assert plain_chunk_rows(32000, chunk_size=7) == 7


def rows_inputs(n_rows=10, vocab_size=9, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n_rows, vocab_size, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)
    counted = torch.ones(n_rows, dtype=torch.bool)
    counted[::3] = False
    weights = counted.float()
    return logits, torch.where(counted, targets, 0), weights, counted


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_rows_equal_the_reference(chunk_size, tolerances):
    """Per-row losses (0 where a row does not count) equal the reference's "none" result, for any chunking."""
    logits, targets, weights, counted = rows_inputs()
    options = LossOptions(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, focal_gamma=1.0)
    rows = cross_entropy_rows(logits, targets, weights, counted, replace(options, chunk_size=chunk_size))
    expected = reference_cross_entropy(
        logits,
        torch.where(counted, targets, -100),
        reduction="none",
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=5.0,
        focal_gamma=1.0,
    )
    assert rows.dtype == torch.float32 and rows.shape == (10,)
    torch.testing.assert_close(rows.double(), expected, **tolerances[torch.float32])


def test_keeps_no_second_n_by_v_tensor():
    """The forward pass saves the logits (which autograd holds anyway) and only (N,) vectors besides."""
    logits, targets, weights, counted = rows_inputs(n_rows=12, vocab_size=50)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy_rows(logits, targets, weights, counted, LossOptions(label_smoothing=0.1, softcap=3.0))
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert all(t.ndim <= 1 for t in saved if t is not big[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_returns_the_logits_storage(dtype):
    """inplace_backward=True: the gradient handed to autograd is the logits' own storage, with the normal values."""
    logits, targets, weights, counted = rows_inputs(dtype=dtype)
    expected_leaf = logits.clone().requires_grad_()
    cross_entropy_rows(expected_leaf, targets, weights, counted, LossOptions()).sum().backward()

    leaf = logits.clone().requires_grad_()
    non_leaf = leaf * 1
    seen = []
    non_leaf.register_hook(seen.append)
    cross_entropy_rows(non_leaf, targets, weights, counted, LossOptions(), inplace_backward=True).sum().backward()
    assert seen[0].data_ptr() == non_leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=0, atol=0)


def test_ignored_rows_with_nan_get_zero_gradient():
    """NaN logits in rows that do not count (padding) give exactly zero gradient rows, not NaN."""
    logits, targets, weights, counted = rows_inputs()
    logits[~counted] = float("nan")
    logits.requires_grad_()
    cross_entropy_rows(logits, targets, weights, counted, LossOptions()).sum().backward()
    assert (logits.grad[~counted] == 0).all()
    assert torch.isfinite(logits.grad).all()
