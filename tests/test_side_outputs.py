"""Tests of tokenloss.side_outputs: token accuracy, the z-loss term and the log-sum-exp returned by
cross_entropy and linear_cross_entropy from the same pass, against full logits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.side_outputs import CrossEntropyOutput

V, D = 23, 6
FLAGS = dict(return_z_loss=True, return_token_accuracy=True, return_lse=True)


def _case(seed: int, dtype: torch.dtype):
    """hidden (2, 7, D), head (V, D), targets with ignored positions, a mask, token weights; the target is made
    the largest logit of the position before at about half the positions, so the accuracy is neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (2, 7), generator=gen)
    logits = hidden @ weight.T
    predicted = torch.roll(logits.argmax(-1), 1, dims=-1)  # shift=True: position t predicts target t + 1
    use_prediction = torch.rand(2, 7, generator=gen) < 0.5
    targets = torch.where(use_prediction, predicted, targets)
    targets[0, :2] = -100
    mask = torch.rand(2, 7, generator=gen) < 0.8
    token_weights = torch.rand(2, 7, generator=gen, dtype=torch.float64) + 0.5
    return hidden.to(dtype), weight.to(dtype), targets, mask, token_weights.float()


def _expected(logits, targets, mask, token_weights, options, reduction):
    """The side outputs from full float64 logits, written plainly."""
    z = logits.double()
    if options.get("softcap"):
        z = options["softcap"] * torch.tanh(z / options["softcap"])
    z, targets, mask, token_weights = z[:, :-1], targets[:, 1:], mask[:, 1:], token_weights[:, 1:]  # shift=True
    counted = (targets != -100) & mask
    lse = torch.where(counted, torch.logsumexp(z, -1), 0.0)
    z_rows = options.get("z_loss", 0.0) * lse**2 * token_weights.double() * counted
    correct = ((z.argmax(-1) == targets) & counted).double()
    if reduction == "mean":
        return z_rows.sum() / counted.sum(), correct.sum() / counted.sum(), lse
    if reduction == "sum":
        return z_rows.sum(), correct.sum(), lse
    return z_rows, correct, lse


OPTIONS = [dict(), dict(z_loss=1e-2), dict(z_loss=1e-3, softcap=2.0, label_smoothing=0.1, focal_gamma=1.0)]


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "z_loss", "softcap-smoothing-focal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_side_outputs_equal_full_logits(fused, reduction, options, dtype) -> None:
    hidden, weight, targets, mask, token_weights = _case(0, dtype)
    common = dict(shift=True, mask=mask, token_weights=token_weights, reduction=reduction, **options)
    if fused:
        out = tl.linear_cross_entropy(hidden, weight, targets, chunk_size=3, **common, **FLAGS)
        plain = tl.linear_cross_entropy(hidden, weight, targets, chunk_size=3, **common)
    else:
        out = tl.cross_entropy(hidden @ weight.T, targets, chunk_size=3, **common, **FLAGS)
        plain = tl.cross_entropy(hidden @ weight.T, targets, chunk_size=3, **common)
    assert isinstance(out, CrossEntropyOutput)
    assert_close(out.loss, plain, rtol=0, atol=0)  # the loss is unchanged by asking for more
    z_term, accuracy, lse = _expected(hidden @ weight.T, targets, mask, token_weights, options, reduction)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_close(out.lse, lse.to(out.lse.dtype), **tol)
    assert_close(out.z_loss, z_term.to(out.z_loss.dtype), **tol)
    assert_close(out.token_accuracy, accuracy.to(out.token_accuracy.dtype), rtol=0, atol=1e-7)
    if reduction == "mean":
        assert 0 < out.token_accuracy < 1
    assert not out.lse.requires_grad and not out.z_loss.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype) -> None:
    """bf16/fp16 logits: lse in float32 against float64 of the same values, accuracy exact."""
    hidden, weight, targets, mask, _ = _case(1, torch.float64)
    logits = (hidden @ weight.T).to(dtype)
    out = tl.cross_entropy(logits, targets, shift=True, mask=mask, **FLAGS)
    _, accuracy, lse = _expected(logits, targets, mask, torch.ones(2, 7), {}, "mean")
    assert out.lse.dtype == torch.float32
    assert_close(out.lse, lse.float(), rtol=2e-5, atol=2e-6)
    assert_close(out.token_accuracy, accuracy.float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_ties_go_to_the_first_index_as_torch_argmax(fused) -> None:
    """Equal largest logits: the target counts as predicted only when it is the first of them."""
    hidden = torch.ones(3, 1)
    weight = torch.tensor([[0.0], [2.0], [2.0], [1.0]])  # classes 1 and 2 tie for the largest logit
    targets = torch.tensor([1, 2, 3])
    call = (lambda **k: tl.linear_cross_entropy(hidden, weight, targets, **k)) if fused else (
        lambda **k: tl.cross_entropy(hidden @ weight.T, targets, **k))  # fmt: skip
    out = call(reduction="none", return_token_accuracy=True)
    assert out.token_accuracy.tolist() == [1.0, 0.0, 0.0]
    assert out.z_loss is None and out.lse is None


def test_nothing_counts_gives_zero_accuracy() -> None:
    out = tl.cross_entropy(torch.randn(3, 5), torch.full((3,), -100), **FLAGS)
    assert out.token_accuracy.item() == 0.0 and out.z_loss.item() == 0.0 and out.lse.eq(0).all()


def test_gradients_are_those_of_the_loss() -> None:
    hidden, weight, targets, mask, _ = _case(2, torch.float32)
    hidden.requires_grad_()
    tl.linear_cross_entropy(hidden, weight, targets, shift=True, z_loss=1e-2, **FLAGS).loss.backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    tl.linear_cross_entropy(hidden, weight, targets, shift=True, z_loss=1e-2).backward()
    assert_close(hidden.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: tl.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), return_lse=1), TypeError, "return_lse"),
        (lambda: tl.cross_entropy(torch.randn(2, 3), torch.softmax(torch.randn(2, 3), -1), return_lse=True),
         ValueError, "class-index targets"),
        (lambda: tl.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), return_z_loss=True, impl="triton"),
         ValueError, "torch implementation"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
