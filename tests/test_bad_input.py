"""Bad input to the loss: each class is the documented meaning or a clear error naming the argument,
never a silent wrong number, a NaN, or an internal error."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.reference import reference_cross_entropy

INF, NAN = math.inf, math.nan


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    return logits, targets


ENTRIES = {
    "cross_entropy": lambda logits, targets, **kw: tl.cross_entropy(logits, targets, **kw),
    "linear_cross_entropy": lambda logits, targets, **kw: tl.linear_cross_entropy(
        logits, torch.eye(logits.shape[-1], dtype=logits.dtype), targets, **kw
    ),
}


@pytest.fixture(params=list(ENTRIES))
def loss_fn(request):
    """Each public loss; the fused one sees the same numbers as logits through an identity head."""
    return ENTRIES[request.param]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_shift_on_an_empty_sequence_gives_the_empty_result(loss_fn, reduction):
    """shift=True on T = 0 (and T = 1): "none" is shaped (B, 0); the reductions are exactly 0."""
    for length in (0, 1):
        out = loss_fn(
            torch.randn(2, length, 7, dtype=torch.float64),
            torch.zeros(2, length, dtype=torch.long),
            shift=True,
            reduction=reduction,
        )
        if reduction == "none":
            assert out.shape == (2, 0)
        else:
            assert out.item() == 0.0


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 7])
def test_integer_shift_predicts_k_steps_ahead(loss_fn, steps):
    """shift=k: the input at t predicts the target at t + k (multi-token prediction), as the reference."""
    logits, targets = _inputs()
    for reduction in ("none", "mean"):
        got = loss_fn(logits, targets, shift=steps, reduction=reduction)
        want = reference_cross_entropy(logits, targets, shift=steps, reduction=reduction)
        assert got.shape == want.shape
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_close(loss_fn(logits, targets, shift=1), loss_fn(logits, targets, shift=True))


@pytest.mark.parametrize("shift", [-1, 1.0, "yes", None])
def test_shift_of_another_kind_is_refused(loss_fn, shift):
    logits, targets = _inputs()
    with pytest.raises(TypeError, match="shift must be a bool or an int >= 0"):
        loss_fn(logits, targets, shift=shift)


@pytest.mark.parametrize("name", ["softcap", "z_loss", "focal_gamma", "label_smoothing"])
@pytest.mark.parametrize("value", [INF, NAN])
def test_non_finite_options_are_refused(loss_fn, name, value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=f"{name} must be"):
        loss_fn(logits, targets, **{name: value})


def test_ignore_index_outside_int64_is_refused(loss_fn):
    logits, targets = _inputs()
    for value in (2**63, -(2**63) - 1, 2**70):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            loss_fn(logits, targets, ignore_index=value, shift=True)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_token_weights_in_a_counted_row_raise(loss_fn, bad):
    logits, targets = _inputs()
    weights = torch.ones(2, 5, dtype=torch.float64)
    weights[1, 2] = bad
    with pytest.raises(ValueError, match="token_weights must be finite"):
        loss_fn(logits, targets, token_weights=weights)
    ignored = targets.clone()
    ignored[1, 2] = -100  # the same weight in a row that does not count is fine
    assert torch.isfinite(loss_fn(logits, ignored, token_weights=weights))


@pytest.mark.parametrize("num_items", [0.5, 3, 12.5, torch.tensor(0.5), torch.tensor(7)], ids=str)
def test_num_items_divides_exactly(loss_fn, num_items):
    """num_items is the divisor of "mean", whatever its size (0.5 divides by 0.5, as transformers does)."""
    logits, targets = _inputs()
    want = reference_cross_entropy(logits, targets, reduction="sum") / float(num_items)
    assert_close(loss_fn(logits, targets, num_items=num_items), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("num_items", "match"),
    [
        (NAN, "num_items must be a finite number >= 0"),
        (INF, "num_items must be a finite number >= 0"),
        (-1, "num_items must be a finite number >= 0"),
        (torch.tensor(-2.0), "num_items must be a finite number >= 0"),
        (torch.tensor(NAN), "num_items must be a finite number >= 0"),
        (0, "num_items is 0 but 10 position"),
        (torch.tensor(0), "num_items is 0 but 10 position"),
    ],
    ids=str,
)
def test_bad_num_items_raise(loss_fn, num_items, match):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=match):
        loss_fn(logits, targets, num_items=num_items)


def test_num_items_zero_when_nothing_counts_is_zero(loss_fn):
    logits, targets = _inputs()
    assert loss_fn(logits, torch.full_like(targets, -100), num_items=0).item() == 0.0


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3, "focal_gamma": 2.0}], ids=str)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_minus_inf_at_the_target_raises_unless_unchecked(entry, options):
    """A -inf logit at the target (or with label smoothing, anywhere) makes the loss infinite: a
    ValueError, or +inf with check_inputs=False; a -inf elsewhere without smoothing is fine.
    (The fused loss gets its -inf through the bias: -inf in hidden would make NaN products.)"""

    def loss(row, **kw):
        if entry == "cross_entropy":
            return tl.cross_entropy(row.unsqueeze(0), torch.tensor([2]), **kw)
        return tl.linear_cross_entropy(torch.zeros(1, 1), torch.zeros(7, 1), torch.tensor([2]), bias=row, **kw)

    row = torch.randn(7)
    row[2] = -INF
    with pytest.raises(ValueError, match="the loss is infinite in 1 counted row"):
        loss(row, **options)
    assert loss(row, check_inputs=False, **options).item() == INF
    row = torch.randn(7)
    row[4] = -INF
    if options.get("label_smoothing"):
        with pytest.raises(ValueError, match="the loss is infinite"):
            loss(row, **options)
    else:
        assert torch.isfinite(loss(row, **options))


def test_tensors_on_another_device_are_named(loss_fn):
    logits, targets = _inputs()
    meta = torch.device("meta")
    for name, value in (
        ("targets", targets.to(meta)),
        ("mask", torch.ones(2, 5, dtype=torch.bool, device=meta)),
        ("token_weights", torch.ones(2, 5, device=meta)),
    ):
        kwargs = {} if name == "targets" else {name: value}
        with pytest.raises(ValueError, match=f"{name} must be on the device of"):
            loss_fn(logits, value if name == "targets" else targets, **kwargs)


def test_inplace_backward_on_overlapping_logits_is_refused():
    expanded = torch.randn(1, 7, requires_grad=True).expand(4, 7)
    with pytest.raises(ValueError, match="inplace_backward=True .* must own"):
        tl.cross_entropy(expanded, torch.tensor([1, 2, 3, 4]), inplace_backward=True)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_double_backward_is_a_clear_error(entry):
    """create_graph=True (a gradient penalty) raises NotImplementedError that says what to use instead."""
    logits, targets = _inputs()
    logits.requires_grad_()
    loss = ENTRIES[entry](logits, targets)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)
    (grad,) = torch.autograd.grad(ENTRIES[entry](logits, targets), logits)  # first order still works
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_a_clear_error(transform):
    logits, targets = _inputs()
    with pytest.raises(NotImplementedError, match="torch.func transform"):
        if transform == "grad":
            torch.func.grad(lambda x: tl.cross_entropy(x, targets[0]))(logits[0])
        else:
            torch.func.vmap(lambda x, t: tl.cross_entropy(x, t))(logits, targets)
