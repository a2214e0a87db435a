"""A fuzzer over every option of cross_entropy and linear_cross_entropy, against the float64 reference.

Valid input must give the reference's value and gradient (never a NaN, an inf or another number);
input with NaN/inf logits, out-of-range targets or bad numbers must give that or a ValueError/TypeError
naming the argument, never an internal error. Bounded examples and a fixed seed (``derandomize``)
keep it a few seconds and reproducible in CI.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenloss as tl
from tokenloss.reference import reference_cross_entropy

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def cases(draw, *, valid: bool):
    """Inputs and options for one call; ``valid=False`` may add NaN/inf logits, bad targets, bad numbers."""
    batch, length, vocab = draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.0, -50.0, 1e4]))
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * scale + offset
    ignore_index = draw(st.sampled_from([-100, 0, vocab - 1]))
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    if targets.numel():
        drop = torch.rand(batch, length, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        targets = torch.where(drop, torch.full_like(targets, -100 if ignore_index == -100 else ignore_index), targets)
    options = dict(
        ignore_index=ignore_index,
        shift=draw(st.sampled_from([False, True, 0, 1, 2, 4])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-4, 0.5])),
        softcap=draw(st.sampled_from([None, 0.5, 30.0])),
        focal_gamma=draw(st.sampled_from([0.0, 0.5, 2.0])),
        chunk_size=draw(st.sampled_from([None, 1, 2, 3])),
    )
    extras = {}
    if draw(st.booleans()):
        extras["mask"] = torch.rand(batch, length, generator=gen) < 0.7
    if draw(st.booleans()):
        extras["token_weights"] = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3 - 1
    extras["num_items"] = draw(st.sampled_from([None, 1, 2.5, 7, torch.tensor(3.0)]))
    if draw(st.booleans()):  # per-class weights (PyTorch's weight), some of them 0
        extras["weight"] = torch.rand(vocab, generator=gen, dtype=torch.float64).mul_(2).sub_(0.2).clamp_(min=0)
    if not valid:
        corruption = draw(
            st.sampled_from(["nan", "inf", "-inf", "target", "num_items", "weights", "class_weights", "options"])
        )
        if corruption in ("nan", "inf", "-inf") and logits.numel():
            flat = logits.view(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = float(corruption)
        elif corruption == "target" and targets.numel():
            targets.view(-1)[0] = draw(st.sampled_from([vocab, -1, 10**6]))
        elif corruption == "num_items":
            extras["num_items"] = draw(st.sampled_from([0, -1, math.nan, math.inf, torch.tensor(-1.0)]))
        elif corruption == "weights" and targets.numel():
            weights = extras.get("token_weights", torch.ones(batch, length, dtype=torch.float64)).clone()
            weights.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf]))
            extras["token_weights"] = weights
        elif corruption == "class_weights":
            extras["weight"] = draw(
                st.sampled_from([torch.full((vocab,), -1.0), torch.full((vocab,), math.nan), torch.ones(vocab + 1)])
            ).double()
        elif corruption == "options":
            name, value = draw(
                st.sampled_from(
                    [
                        ("label_smoothing", 1.5),
                        ("z_loss", -1.0),
                        ("softcap", 0.0),
                        ("focal_gamma", math.inf),
                        ("chunk_size", 0),
                        ("shift", -1),
                        ("reduction", "avg"),
                        ("ignore_index", 2**64),
                    ]
                )
            )
            options[name] = value
    return logits, targets, options, extras, seed


def _reference(logits, targets, options, extras):
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    return reference_cross_entropy(logits, targets, **ref_options, **extras)


def _call(entry, logits, targets, options, extras):
    """(value, gradient of the logits) of tokenloss; the fused loss sees the logits through an identity head."""
    leaf = logits.clone().requires_grad_()
    if entry == "cross_entropy":
        value = tl.cross_entropy(leaf, targets, **options, **extras)
    else:
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
        extras = {("class_weight" if k == "weight" else k): v for k, v in extras.items()}  # weight is the head
        value = tl.linear_cross_entropy(leaf, eye, targets, **options, **extras)
    return value, leaf


def _check_against_reference(entry, logits, targets, options, extras, seed):
    value, leaf = _call(entry, logits, targets, options, extras)
    ref_leaf = logits.clone().requires_grad_()
    want = _reference(ref_leaf, targets, options, extras)
    assert value.dtype == torch.float64 and value.shape == want.shape
    assert torch.isfinite(value).all(), f"non-finite loss {value}"
    torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-9)
    upstream = torch.rand(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if value.numel() and value.requires_grad:
        (value * upstream).sum().backward()
        (want * upstream).sum().backward()
        assert torch.isfinite(leaf.grad).all()
        # autograd of (1 - p) ** gamma with gamma < 1 is 0 * inf = NaN where p = 1; ours takes the limit 0
        known = torch.isfinite(ref_leaf.grad)
        torch.testing.assert_close(leaf.grad[known], ref_leaf.grad[known], rtol=1e-8, atol=1e-9)


def _finite_reference(logits, targets, options, extras) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(_reference(logits, targets, options, extras)).all())


@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
@FUZZ
@given(case=cases(valid=True))
def test_valid_input_gives_the_reference(entry, case):
    """Any valid combination of options: the float64 reference's value and gradient, nothing else."""
    logits, targets, options, extras, seed = case
    if entry == "linear_cross_entropy" and not torch.isfinite(logits).all():
        return
    if not _finite_reference(logits, targets, options, extras):  # e.g. label smoothing of 1 at 1e4 offsets
        with pytest.raises(ValueError, match="infinite|NaN"):
            _call(entry, logits, targets, options, extras)
        return
    _check_against_reference(entry, logits, targets, options, extras, seed)


@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
@FUZZ
@given(case=cases(valid=False))
def test_bad_input_gives_the_reference_or_a_clear_error(entry, case):
    """NaN/inf logits, bad targets, bad numbers: the reference's finite answer where one exists (bad
    values in rows that do not count), else a ValueError/TypeError; never NaN/inf or an internal error."""
    logits, targets, options, extras, seed = case
    try:
        value, _ = _call(entry, logits, targets, options, extras)
    except (ValueError, TypeError) as error:
        assert str(error), "an error must say what is wrong"
        return
    assert torch.isfinite(value).all(), f"no error, but a non-finite loss {value}"
    try:
        finite = _finite_reference(logits, targets, options, extras)
    except (ValueError, TypeError, RuntimeError, IndexError):
        finite = False
    if entry == "cross_entropy" and finite:
        _check_against_reference(entry, logits, targets, options, extras, seed)
