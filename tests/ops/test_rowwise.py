"""tokenloss.ops.rowwise: per-row statistics, coefficients and the chunk gradient against float64 autograd."""

from __future__ import annotations

import math

import pytest
import torch

from tokenloss.ops.rowwise import (
    capped,
    check_finite_rows,
    chunk_gradient,
    chunk_statistics,
    loss_and_coefficients,
    scale_coefficients,
)
from tokenloss.options import LossOptions
from tokenloss.reference import reference_cross_entropy

OPTIONS = {
    "plain": LossOptions(),
    "smoothing": LossOptions(label_smoothing=0.2),
    "softcap": LossOptions(softcap=2.5),
    "z_loss": LossOptions(z_loss=0.05),
    "focal": LossOptions(focal_gamma=2.0),
    "focal_below_one": LossOptions(focal_gamma=0.3),
    "everything": LossOptions(label_smoothing=0.1, softcap=3.0, z_loss=0.01, focal_gamma=1.5),
}


def reference_kwargs(options: LossOptions) -> dict:
    return {
        "label_smoothing": options.label_smoothing,
        "z_loss": options.z_loss,
        "softcap": options.softcap,
        "focal_gamma": options.focal_gamma,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunk_statistics(dtype, softcap, make_logits, make_targets, tolerances):
    """lse, target logit and logit sum of the capped logits (the last two relative to the row maximum),
    in float32, against float64."""
    logits = make_logits(9, 13, dtype=dtype, scale=6.0)
    targets = make_targets((9,), 13)
    stats = chunk_statistics(logits, targets, LossOptions(softcap=softcap, label_smoothing=0.1))
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    assert stats.lse.dtype == torch.float32
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(z, -1), **tolerances[torch.float32])
    row_max = z.amax(-1)
    torch.testing.assert_close(stats.shift.double(), row_max, **tolerances[torch.float32])
    target = z[torch.arange(9), targets] - row_max
    torch.testing.assert_close(stats.target_logit.double(), target, **tolerances[torch.float32])
    torch.testing.assert_close(stats.logit_sum.double(), (z - row_max[:, None]).sum(-1), **tolerances[torch.float32])
    assert chunk_statistics(logits, targets, LossOptions()).logit_sum is None  # only computed for smoothing


@pytest.mark.parametrize("name", OPTIONS)
def test_loss_and_gradient_equal_autograd_of_the_reference(name, make_logits, make_targets, tolerances):
    """loss_and_coefficients + chunk_gradient give the reference's per-row loss and its autograd gradient."""
    options = OPTIONS[name]
    logits = make_logits(8, 6, dtype=torch.float64, scale=3.0).requires_grad_()
    targets = make_targets((8,), 6)
    weights = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = reference_cross_entropy(
        logits, targets, reduction="none", token_weights=weights, **reference_kwargs(options)
    )
    upstream = torch.linspace(-1, 2, 8, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(expected, logits, upstream)

    logits = logits.detach()
    stats = chunk_statistics(logits, targets, options)
    loss, alpha, beta, delta = loss_and_coefficients(stats, weights, 6, options)
    alpha, beta, delta = scale_coefficients(alpha, beta, delta, upstream * weights)
    grad = chunk_gradient(logits, targets, stats.shift, stats.log_sum, alpha, beta, delta, options)
    torch.testing.assert_close(loss, expected.detach(), **tolerances[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **tolerances[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunk_gradient_into_out_and_into_the_logits(dtype, softcap, make_logits, make_targets):
    """out= (a separate buffer, or the logits themselves) holds exactly the fresh gradient, cast to its dtype."""
    options = LossOptions(softcap=softcap, label_smoothing=0.1)
    logits = make_logits(5, 7, dtype=dtype)
    targets = make_targets((5,), 7)
    stats = chunk_statistics(logits, targets, options)
    coefficients = [torch.rand(5, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2, 3)]
    fresh = chunk_gradient(logits, targets, stats.shift, stats.log_sum, *coefficients, options)
    assert fresh.dtype == torch.float32

    out = torch.empty(5, 7, dtype=dtype)
    assert chunk_gradient(logits, targets, stats.shift, stats.log_sum, *coefficients, options, out=out) is out
    torch.testing.assert_close(out, fresh.to(dtype), rtol=0, atol=0)

    aliased = logits.clone()
    chunk_gradient(aliased, targets, stats.shift, stats.log_sum, *coefficients, options, out=aliased)
    torch.testing.assert_close(aliased, fresh.to(dtype), rtol=0, atol=0)


def test_target_outside_the_chunk_subtracts_no_onehot(make_logits):
    """target_in_chunk=False (vocabulary-parallel shards): the gradient is alpha * softmax only."""
    logits = make_logits(3, 4)
    lse = torch.logsumexp(logits, -1)
    ones = torch.ones(3)
    grad = chunk_gradient(
        logits,
        torch.zeros(3, dtype=torch.long),
        lse,
        ones * 0,
        ones,
        ones,
        ones * 0,
        LossOptions(),
        target_in_chunk=ones == 0,
    )
    torch.testing.assert_close(grad, torch.softmax(logits, -1))


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.0])
def test_focal_coefficients_stay_finite_when_the_target_is_certain(gamma):
    """p_target = 1 (V = 1 or a dominant logit): loss 0 and finite coefficients, also for gamma < 1."""
    options = LossOptions(focal_gamma=gamma)
    logits = torch.tensor([[0.0], [50.0]])  # two rows of V = 1 ...
    stats = chunk_statistics(logits, torch.zeros(2, dtype=torch.long), options)
    loss, alpha, beta, delta = loss_and_coefficients(stats, torch.ones(2), 1, options)
    for value in (loss, alpha, beta, delta):
        assert torch.isfinite(value).all()
    assert (loss == 0).all()
    peaked = torch.tensor([[200.0, 0.0, -5.0]])  # ... and p_target = 1 - 1e-87
    stats = chunk_statistics(peaked, torch.zeros(1, dtype=torch.long), options)
    assert all(torch.isfinite(v).all() for v in loss_and_coefficients(stats, torch.ones(1), 3, options))


def test_scale_coefficients_gives_exact_zeros_where_the_scale_is_zero():
    """A zero row scale zeroes the coefficients even when they are NaN or infinite (ignored rows)."""
    alpha = torch.tensor([math.nan, 2.0, math.inf])
    scaled = scale_coefficients(alpha, alpha.clone(), alpha.clone(), torch.tensor([0.0, 3.0, 0.0]))
    for value in scaled:
        torch.testing.assert_close(value, torch.tensor([0.0, 6.0, 0.0]))


def test_check_finite_rows():
    """A non-finite counted row is an error naming the input; a non-finite ignored row is only reported back."""
    lse = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    with pytest.raises(
        ValueError, match=r"^logits contain NaN or infinite values in 1 counted row\(s\) \(first: row 2"
    ):
        check_finite_rows(lse, torch.tensor([True, False, True, False]), "logits")
    assert check_finite_rows(lse, torch.tensor([True, False, False, False]), "logits") is True
    assert check_finite_rows(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), "logits") is False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_capped(dtype):
    """capped() is c * tanh(x / c) in the accumulation dtype (float64 stays float64), or a plain cast."""
    x = torch.tensor([-100.0, -1.0, 0.0, 3.0], dtype=dtype)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    assert capped(x, None).dtype == accumulation
    torch.testing.assert_close(capped(x, 5.0), 5.0 * torch.tanh(x.to(accumulation) / 5.0))
