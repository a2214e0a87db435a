"""Tests of tokenloss.ops.autocast: under torch.autocast the fused head-and-loss functions multiply in the
autocast dtype, as an nn.Linear head would, and give float32 gradients to float32 parameters."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl


def _inputs(seed: int = 0, n: int = 12, d: int = 16, v: int = 40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = (torch.randn(v, d, generator=gen) * 0.5).requires_grad_()
    bias = torch.randn(v, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, bias, targets


FUNCTIONS = {
    "linear_cross_entropy": lambda h, w, b, t: tl.linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1),
    "linear_token_logprobs": lambda h, w, b, t: sum(
        x.sum() for x in tl.linear_token_logprobs(h, w, t, bias=b, temperature=0.7)
    ),
    "linear_distillation_loss": lambda h, w, b, t: tl.linear_distillation_loss(
        h, w, h.detach() * 0.5, w.detach().flip(0), student_bias=b, targets=t, hard_weight=0.3
    ),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_under_autocast_equals_the_explicit_bf16_call(name: str) -> None:
    """float32 inputs under torch.autocast(bfloat16): the same loss as passing bf16 copies, and float32 gradients
    equal to the bf16 copies' gradients (the casts are differentiable, as nn.Linear's under autocast)."""
    function = FUNCTIONS[name]
    hidden, weight, bias, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = function(hidden, weight, bias, targets)
    loss.backward()
    assert all(t.grad.dtype == torch.float32 for t in (hidden, weight, bias))

    copies = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    expected = function(*copies, targets)
    expected.backward()
    assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip((hidden, weight, bias), copies):
        assert_close(got.grad, want.grad.float(), rtol=0, atol=0)


def test_without_autocast_nothing_changes() -> None:
    hidden, weight, bias, targets = _inputs(1)
    plain = tl.linear_cross_entropy(hidden, weight, targets, bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert_close(tl.linear_cross_entropy(hidden, weight, targets, bias=bias), plain, rtol=0, atol=0)
    assert plain.dtype == torch.float32


def test_float64_is_not_cast_as_autocast_leaves_it() -> None:
    hidden, weight, bias, targets = (t.double() if t.is_floating_point() else t for t in _inputs(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tl.linear_cross_entropy(hidden, weight, targets, bias=bias)
    assert loss.dtype == torch.float64


def test_mixed_dtypes_are_accepted_under_autocast_as_by_nn_linear() -> None:
    """bf16 hidden states (from an autocast model) with a float32 head: refused outside autocast, cast inside."""
    hidden, weight, _, targets = _inputs(3)
    hidden = hidden.detach().bfloat16()
    with pytest.raises(TypeError, match="must have the dtype of hidden"):
        tl.linear_cross_entropy(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tl.linear_cross_entropy(hidden, weight, targets)
    assert_close(loss, tl.linear_cross_entropy(hidden, weight.detach().bfloat16(), targets), rtol=0, atol=0)
