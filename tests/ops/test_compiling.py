"""Tests of tokenloss.ops.compiling: the public losses inside torch.compile are one eager call, so batches
with different numbers of counted tokens reuse the compiled graphs (no recompiles) and give the eager numbers."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.testing import assert_close

import tokenloss as tl

V, D = 37, 8

LOSSES = {
    "cross_entropy": lambda h, w, t: tl.cross_entropy(h @ w.T, t, shift=True, z_loss=1e-3),
    "linear_cross_entropy": lambda h, w, t: tl.linear_cross_entropy(h, w, t, shift=True, label_smoothing=0.1),
    "linear_token_logprobs": lambda h, w, t: sum(x.sum() for x in tl.linear_token_logprobs(h, w, t, shift=True)),
    "linear_distillation_loss": lambda h, w, t: tl.linear_distillation_loss(
        h, w, h.detach(), w.detach().flip(0), targets=t, shift=True, hard_weight=0.5
    ),
}


def _step(function, layer, weight, hidden, targets):
    loss = function(torch.tanh(layer(hidden)), weight, targets)  # a layer before the loss, compiled
    grads = torch.autograd.grad(loss, [layer.weight, weight])
    return loss.detach(), grads


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_recompile_across_counted_token_numbers(name: str) -> None:
    """Five batches of one shape with 1..5 ignored targets: the compiled graphs of the first batch serve all of
    them, and loss and gradients equal the eager ones."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(D, D)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda h, t: _step(LOSSES[name], layer, weight, h, t), backend=counter)
    frames = []
    for ignored in range(1, 6):
        hidden = torch.randn(2, 7, D, generator=gen)
        targets = torch.randint(0, V, (2, 7), generator=gen)
        targets[0, :ignored] = -100
        loss, grads = compiled(hidden, targets)
        expected_loss, expected_grads = _step(LOSSES[name], layer, weight, hidden, targets)
        assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, expected_grads):
            assert_close(got, want, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] >= 1  # something was compiled
    assert frames == [frames[0]] * 5, frames  # and never again
