"""Per-class weights (PyTorch's ``weight``): tl.cross_entropy(weight=), tl.linear_cross_entropy(class_weight=),
probability targets and the Modules, against F.cross_entropy(weight=) in float64 and the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.reference import reference_cross_entropy

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-4),
}
V, D = 13, 6


def _inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 5, V, generator=gen, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, V, (3, 5), generator=gen)
    targets[0, 1] = targets[2, 4] = -100
    weight = torch.rand(V, generator=gen, dtype=torch.float64) * 2
    weight[4] = 0.0  # a class that does not count at all
    targets[1, 2] = 4
    return logits, targets, weight


def _backward_pair(got: torch.Tensor, want: torch.Tensor) -> None:
    upstream = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (got * upstream.to(got.dtype)).sum().backward()
    (want * upstream).sum().backward()


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_cross_entropy_equals_pytorch(dtype, reduction, label_smoothing, chunk_size):
    """Value and gradient equal F.cross_entropy(weight=w) in float64, ignore_index and label smoothing included."""
    logits, targets, weight = _inputs(dtype)
    x = logits.clone().requires_grad_()
    got = tl.cross_entropy(
        x, targets, weight=weight.to(dtype), reduction=reduction, label_smoothing=label_smoothing, chunk_size=chunk_size
    )
    x64 = logits.double().requires_grad_()
    want = F.cross_entropy(
        x64.movedim(-1, 1),
        targets,
        weight=weight.to(dtype).double(),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    assert got.shape == want.shape
    assert_close(got.double(), want, **TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32])
    _backward_pair(got, want)
    assert_close(x.grad.double(), x64.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_cross_entropy_equals_pytorch(dtype, reduction, label_smoothing, chunk_size):
    """The fused loss with class_weight equals F.cross_entropy(F.linear(...), weight=w): value, hidden, head, bias."""
    _, targets, weight = _inputs(dtype)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, D, generator=gen, dtype=torch.float64).to(dtype)
    head = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype)
    ours = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    got = tl.linear_cross_entropy(
        ours[0], ours[1], targets, bias=ours[2], class_weight=weight.to(dtype), reduction=reduction,
        label_smoothing=label_smoothing, chunk_size=chunk_size,
    )  # fmt: skip
    theirs = [t.double().requires_grad_() for t in (hidden, head, bias)]
    logits = F.linear(theirs[0], theirs[1], theirs[2])
    want = F.cross_entropy(
        logits.movedim(-1, 1), targets, weight=weight.to(dtype).double(), reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip
    assert_close(got.double(), want, **TOLERANCES[dtype])  # bf16: the logits are bf16 products, as in nn.Linear
    _backward_pair(got, want)
    if dtype != torch.bfloat16:
        for mine, reference in zip(ours, theirs):
            assert_close(mine.grad.double(), reference.grad, **TOLERANCES[dtype])
        return
    # bf16: each gradient is a bf16 product of a bf16 gradient of the logits; its error is no worse than
    # that of PyTorch's own bf16 path (F.linear then F.cross_entropy(weight=)) against float64.
    unfused = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    loss = F.cross_entropy(
        F.linear(*unfused).movedim(-1, 1), targets, weight=weight.to(dtype), reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip
    upstream = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (loss * upstream.to(loss.dtype)).sum().backward()  # the upstream gradient of _backward_pair
    for mine, pytorch, reference in zip(ours, unfused, theirs):
        error = (mine.grad.double() - reference.grad).abs().max()
        assert error <= 2 * (pytorch.grad.double() - reference.grad).abs().max() + 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_probability_targets_equal_pytorch(reduction, label_smoothing):
    """With a distribution as the truth the loss is -sum_j w_j q_j log p_j and the mean divides by N, as in PyTorch."""
    logits, _, weight = _inputs(torch.float64)
    probs = torch.softmax(torch.randn(3, 5, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64), -1)
    x = logits.clone().requires_grad_()
    got = tl.cross_entropy(x, probs, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    x64 = logits.clone().requires_grad_()
    want = F.cross_entropy(
        x64.movedim(-1, 1), probs.movedim(-1, 1), weight=weight, reduction=reduction, label_smoothing=label_smoothing
    )
    assert_close(got, want, **TOLERANCES[torch.float64])
    _backward_pair(got, want)
    assert_close(x.grad, x64.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "options",
    [
        dict(z_loss=1e-3),
        dict(focal_gamma=2.0),
        dict(focal_gamma=0.5, label_smoothing=0.1),
        dict(softcap=5.0, label_smoothing=0.1, z_loss=1e-4),
        dict(shift=True, label_smoothing=0.1),
        dict(num_items=11),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_with_the_other_options_equals_the_reference(options, entry):
    """Class weights with z-loss, focal loss, soft-capping, shift, a mask, token weights and num_items: the
    float64 reference formulas (the class weight scales the cross-entropy term, not the z-loss)."""
    _, targets, weight = _inputs(torch.float64)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, D, generator=gen, dtype=torch.float64)
    head = torch.randn(V, D, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=gen) > 0.2
    token_weights = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5
    extra = dict(mask=mask, token_weights=token_weights, **options)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    if entry == "cross_entropy":
        got = tl.cross_entropy(h1 @ head.T, targets, weight=weight, **extra)
    else:
        got = tl.linear_cross_entropy(h1, head, targets, class_weight=weight, **extra)
    want = reference_cross_entropy(h2 @ head.T, targets, weight=weight, **extra)
    assert_close(got, want, **TOLERANCES[torch.float64])
    got.backward()
    want.backward()
    assert_close(h1.grad, h2.grad, **TOLERANCES[torch.float64])


def test_reference_equals_pytorch():
    """The reference's class-weight formula is PyTorch's (the reference is what the other options are checked with)."""
    logits, targets, weight = _inputs(torch.float64)
    for eps in (0.0, 0.3):
        want = F.cross_entropy(logits.movedim(-1, 1), targets, weight=weight, label_smoothing=eps)
        assert_close(reference_cross_entropy(logits, targets, weight=weight, label_smoothing=eps), want)


def test_uniform_class_weights_change_nothing():
    """w = c everywhere: the weighted mean is the plain mean (the c cancels)."""
    logits, targets, _ = _inputs(torch.float32)
    plain = tl.cross_entropy(logits, targets, label_smoothing=0.1)
    weighted = tl.cross_entropy(logits, targets, weight=torch.full((V,), 3.0), label_smoothing=0.1)
    assert_close(weighted, plain, **TOLERANCES[torch.float32])


def test_only_zero_weight_targets_give_zero_not_nan():
    """PyTorch divides 0 by 0 (NaN) when every counted target has weight 0; tokenloss returns 0 (nothing counts)."""
    logits, _, weight = _inputs(torch.float64)
    targets = torch.full((3, 5), 4)
    assert torch.isnan(F.cross_entropy(logits.movedim(-1, 1), targets, weight=weight))
    assert tl.cross_entropy(logits, targets, weight=weight).item() == 0.0


def test_modules_keep_the_weight_as_a_buffer():
    """CrossEntropyLoss(weight=) and LinearCrossEntropyLoss(class_weight=) equal the functions; weights are buffers."""
    logits, targets, weight = _inputs(torch.float32)
    module = tl.CrossEntropyLoss(weight=weight.float(), label_smoothing=0.1)
    assert "weight" in dict(module.named_buffers())
    assert_close(module(logits, targets), tl.cross_entropy(logits, targets, weight=weight.float(), label_smoothing=0.1))
    hidden, head = torch.randn(3, 5, D), torch.randn(V, D)
    linear = tl.LinearCrossEntropyLoss(class_weight=weight.float())
    assert "class_weight" in dict(linear.named_buffers())
    expected = tl.linear_cross_entropy(hidden, head, targets, class_weight=weight.float())
    assert_close(linear(hidden, head, targets), expected)
    assert module.to(torch.float64).weight.dtype == torch.float64
    with pytest.raises(TypeError, match="weight must be a 1-D floating tensor"):
        tl.CrossEntropyLoss(weight=torch.ones(2, V))


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.ones(V + 1), ValueError, r"weight must have shape \(V,\) = \(13,\)"),
        (torch.ones(V, dtype=torch.long), TypeError, "weight must be a floating tensor"),
        ([1.0] * V, TypeError, "weight must be a floating tensor"),
        (torch.full((V,), -1.0), ValueError, "weight must be finite and >= 0"),
        (torch.full((V,), float("nan")), ValueError, "weight must be finite and >= 0"),
    ],
)
def test_bad_class_weights(weight, error, match):
    """A wrong shape, dtype, sign or a NaN is a clear error naming the argument (class_weight in the fused loss)."""
    logits, targets, _ = _inputs(torch.float32)
    with pytest.raises(error, match=match):
        tl.cross_entropy(logits, targets, weight=weight)
    with pytest.raises(error, match=match.replace("weight", "class_weight")):
        tl.linear_cross_entropy(torch.randn(3, 5, D), torch.randn(V, D), targets, class_weight=weight)


def test_triton_is_refused_with_a_clear_message():
    logits, targets, weight = _inputs(torch.float32)
    with pytest.raises(ValueError, match="runs on the torch implementation"):
        tl.cross_entropy(logits, targets, weight=weight.float(), impl="triton")
