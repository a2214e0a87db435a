"""tokenloss.reference, the specification: it equals PyTorch where PyTorch has the option, and the formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenloss.reference import reference_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_equals_pytorch(reduction, label_smoothing, make_logits, make_targets, tolerances):
    """With PyTorch's options only, the reference equals F.cross_entropy in float64 (ignore_index included)."""
    logits = make_logits(3, 7, 11, dtype=torch.float64, scale=5.0)
    targets = make_targets((3, 7), 11, ignore_every=3)
    ours = reference_cross_entropy(logits, targets, reduction=reduction, label_smoothing=label_smoothing)
    theirs = F.cross_entropy(logits.movedim(-1, 1), targets, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, **tolerances[torch.float64])


def test_formulas_by_hand():
    """One row written out: softcap, smoothing, focal factor, z-loss and weight as the module docstring says."""
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    cap, eps, gamma, zl, weight = 2.0, 0.1, 1.5, 0.01, 3.0
    z = [cap * math.tanh(v / cap) for v in x[0].tolist()]
    lse = math.log(sum(math.exp(v) for v in z))
    log_p = [v - lse for v in z]
    ce = (1 - eps) * -log_p[2] + eps * sum(-v for v in log_p) / 3
    expected = weight * ((1 - math.exp(log_p[2])) ** gamma * ce + zl * lse**2)
    got = reference_cross_entropy(
        x,
        torch.tensor([2]),
        softcap=cap,
        label_smoothing=eps,
        focal_gamma=gamma,
        z_loss=zl,
        token_weights=torch.tensor([weight], dtype=torch.float64),
        reduction="sum",
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mask_shift_and_num_items():
    """A position counts when target != ignore_index and mask is True, after the shift; num_items divides the sum."""
    logits = torch.zeros(1, 4, 5, dtype=torch.float64)  # every position costs log 5
    targets = torch.tensor([[1, 2, -100, 3]])
    mask = torch.tensor([[False, True, True, False]])
    per_token = reference_cross_entropy(logits, targets, shift=True, mask=mask, reduction="none")
    torch.testing.assert_close(per_token, torch.tensor([[math.log(5), 0.0, 0.0]], dtype=torch.float64))
    mean = reference_cross_entropy(logits, targets, shift=True, mask=mask)
    assert mean.item() == pytest.approx(math.log(5))  # one position counts
    assert reference_cross_entropy(logits, targets, num_items=4).item() == pytest.approx(3 * math.log(5) / 4)


def test_nothing_counts_is_zero():
    """When no position counts, the mean is 0 (the denominator is clamped to 1)."""
    logits = torch.randn(2, 3, dtype=torch.float64)
    assert reference_cross_entropy(logits, torch.tensor([-100, -100])).item() == 0.0


@pytest.mark.parametrize(("p", "expected"), [(0.7, 0.357), (0.95, 0.051), (0.05, 2.996), (0.9, 0.105), (0.99, 0.01)])
def test_worked_numbers(p, expected):
    """The course material's -log p values."""
    logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64)
    assert round(reference_cross_entropy(logits, torch.tensor([0])).item(), 3) == expected
