"""tl.cross_entropy with probability targets (soft labels, a teacher's distribution): PyTorch's semantics, exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import tokenloss as tl

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-4),
}


def _inputs(shape=(3, 4, 13), dtype=torch.float64, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    probs = torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2, dim=-1)
    probs[0, 0] = 0.0
    probs[0, 0, 3] = 1.0  # a one-hot row among soft ones
    return logits, probs


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_equals_pytorch_probability_targets(dtype, reduction, label_smoothing, chunk_size):
    """Value and gradient equal F.cross_entropy(logits, probs) computed in float64 on the same inputs."""
    logits, probs = _inputs(dtype=dtype)
    x = logits.clone().requires_grad_()
    got = tl.cross_entropy(
        x, probs.to(dtype), reduction=reduction, label_smoothing=label_smoothing, chunk_size=chunk_size
    )
    x64 = logits.double().requires_grad_()
    want = F.cross_entropy(
        x64.movedim(-1, 1),
        probs.to(dtype).double().movedim(-1, 1),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    assert_close(got.double(), want, **TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32])
    upstream = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (got * upstream.to(got.dtype)).sum().backward()
    (want * upstream).sum().backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad.double(), x64.grad, **TOLERANCES[dtype])


def test_one_hot_probabilities_equal_class_indices():
    logits, _ = _inputs()
    targets = torch.randint(0, 13, (3, 4), generator=torch.Generator().manual_seed(2))
    one_hot = F.one_hot(targets, 13).double()
    for options in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-2, "softcap": 5.0}, {"shift": True}):
        assert_close(tl.cross_entropy(logits, one_hot, **options), tl.cross_entropy(logits, targets, **options))


def test_mask_shift_weights_and_num_items_as_for_class_indices():
    """mask, shift (the distribution of position t + 1), token weights and num_items mean what they
    mean for class indices; checked against a float64 sum written out."""
    logits, probs = _inputs()
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) < 0.7
    weights = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = tl.cross_entropy(logits, probs, shift=True, mask=mask, token_weights=weights, reduction="none")
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    per_token = -(probs[:, 1:] * log_p).sum(-1) * weights[:, 1:]
    want = torch.where(mask[:, 1:], per_token, torch.zeros_like(per_token))
    assert_close(got, want)
    mean = tl.cross_entropy(logits, probs, shift=True, mask=mask, token_weights=weights, num_items=5.0)
    assert_close(mean, want.sum() / 5.0)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda x, q: (x, q[..., :-1]), ValueError, "probability targets must have the shape of logits"),
        (lambda x, q: (x, q * 1.1), ValueError, "must sum to 1"),
        (lambda x, q: (x, q - q.max()), ValueError, "must be finite and >= 0"),
    ],
    ids=["shape", "sum", "negative"],
)
def test_bad_distributions_are_named(change, error, match):
    logits, probs = _inputs()
    with pytest.raises(error, match=match):
        tl.cross_entropy(*change(logits, probs))


def test_unchecked_rows_and_options_that_do_not_apply():
    logits, probs = _inputs()
    unnormalised = probs * 2
    assert_close(tl.cross_entropy(logits, unnormalised, check_inputs=False), 2 * tl.cross_entropy(logits, probs))
    for kwargs, match in (
        ({"focal_gamma": 2.0}, "focal_gamma needs class-index targets"),
        ({"ignore_index": 0}, "ignore_index does not apply"),
        ({"inplace_backward": True}, "inplace_backward=True is for class-index targets"),
    ):
        with pytest.raises(ValueError, match=match):
            tl.cross_entropy(logits, probs, **kwargs)


def test_nan_logits_in_a_counted_row_raise():
    logits, probs = _inputs()
    logits[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        tl.cross_entropy(logits, probs)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(tl.cross_entropy(logits, probs, mask=mask))
