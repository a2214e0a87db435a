"""The Triton plain cross-entropy kernels give the torch path's loss and gradient for every option and dtype."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import tokenloss as tl  # noqa: E402
from tokenloss.ops.triton import cross_entropy as triton_ce  # noqa: E402
from tokenloss.reference import reference_cross_entropy  # noqa: E402

pytestmark = pytest.mark.triton_kernels
DEFAULT_MAX_BLOCK_V = triton_ce.MAX_BLOCK_V  # read at import, before conftest lowers it for each test

N, V = 9, 203  # awkward: V is one full tile of 128 plus 75 columns (tiles are lowered in conftest)

# Losses are float32 in both paths; gradients are float32 math rounded once to the input dtype,
# so two correct paths differ by float32 rounding, or by at most one ulp of the input dtype.
LOSS_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-6, atol=2e-6),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-15),
    torch.float32: dict(rtol=1e-5, atol=1e-8),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-7),
}

CASES = {
    "plain": dict(),
    "ignore_and_mask": dict(ignore_every=3, mask=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=5.0),
    "focal": dict(focal_gamma=2.0),
    "everything": dict(
        label_smoothing=0.2, z_loss=1e-2, softcap=3.0, focal_gamma=0.5, token_weights=True, ignore_every=4
    ),
    "sum_num_items": dict(reduction="sum", token_weights=True, ignore_every=5),
    "none_shift": dict(reduction="none", shift=True, mask=True),
    "mean_num_items": dict(num_items=40, ignore_every=2),
}


def _run(impl, logits, targets, case, upstream_seed=3):
    """Loss and gradient of ``tl.cross_entropy`` with the options of ``case`` (shared random upstream gradient)."""
    case = dict(case)
    ignore_every = case.pop("ignore_every", 0)
    gen = torch.Generator().manual_seed(7)
    targets = targets.clone()
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    if case.pop("mask", False):
        case["mask"] = (torch.rand(targets.shape, generator=gen) > 0.3).to(logits.device)
    if case.pop("token_weights", False):
        case["token_weights"] = torch.rand(targets.shape, generator=gen, dtype=torch.float64).to(logits.device)
    x = logits.detach().clone().requires_grad_(True)
    loss = tl.cross_entropy(x, targets, impl=impl, **case)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    "case, dtype",
    [(case, torch.float32) for case in CASES]
    + [(case, dtype) for case in ("plain", "everything") for dtype in (torch.bfloat16, torch.float16)]
    + [("everything", torch.float64), ("none_shift", torch.bfloat16)],
    ids=lambda value: str(value).replace("torch.", ""),
)
def test_every_option_matches_torch_path(case, dtype, device, make_logits, make_targets):
    """Loss and logits gradient of impl='triton' equal impl='torch': every option in float32, then
    bf16/fp16 (float32 accumulation) and fp64 (float64 accumulation) on the plain and all-options cases."""
    shape = (2, 5, V) if CASES[case].get("shift") else (N, V)
    logits = make_logits(*shape, dtype=dtype).to(device)
    targets = make_targets(shape[:-1], V).to(device)
    loss_t, grad_t = _run("triton", logits, targets, CASES[case])
    loss_r, grad_r = _run("torch", logits, targets, CASES[case])
    assert loss_t.dtype == loss_r.dtype and loss_t.shape == loss_r.shape
    assert grad_t.dtype == dtype
    torch.testing.assert_close(loss_t, loss_r, **LOSS_TOL[dtype])
    torch.testing.assert_close(grad_t, grad_r, **GRAD_TOL[dtype])


def test_public_api_matches_float64_reference(device, make_logits, make_targets):
    """tl.cross_entropy(impl='triton') with shift, mask and smoothing equals the float64 formulas."""
    logits = make_logits(3, 5, 37, dtype=torch.float32, scale=8.0).to(device)
    targets = make_targets((3, 5), 37, ignore_every=4).to(device)
    mask = torch.tensor([[True, False, True, True, True]] * 3, device=device)
    kwargs = dict(shift=True, mask=mask, label_smoothing=0.05, z_loss=1e-4)
    got = tl.cross_entropy(logits, targets, impl="triton", **kwargs)
    want = reference_cross_entropy(logits.double(), targets, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_inplace_backward_writes_gradient_into_logits(device, make_logits, make_targets):
    """inplace_backward=True gives the same gradient, written into the logits' own storage."""
    logits = make_logits(N, V).to(device)
    targets = make_targets((N,), V).to(device)
    expected = _run("torch", logits, targets, {})[1]
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf: the backward overwrites its storage and passes it on as x's gradient
    loss = tl.cross_entropy(y, targets, impl="triton", inplace_backward=True)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    torch.testing.assert_close(x.grad, expected, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(y.detach(), expected, **GRAD_TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_ignored_rows_with_nonfinite_logits_give_zero_gradient(device, make_logits, make_targets):
    """NaN/inf in rows that do not count change nothing: finite loss, exact zero gradient there."""
    logits = make_logits(5, 70).to(device)
    logits[1] = float("nan")
    logits[3, 4] = float("inf")
    targets = make_targets((5,), 70).to(device)
    targets[1] = targets[3] = -100
    x = logits.clone().requires_grad_(True)
    loss = tl.cross_entropy(x, targets, impl="triton")
    loss.backward()
    keep = torch.tensor([0, 2, 4], device=device)
    want = tl.cross_entropy(logits[keep], targets[keep], impl="torch")
    torch.testing.assert_close(loss, want, **LOSS_TOL[torch.float32])
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert torch.equal(x.grad[3], torch.zeros_like(x.grad[3]))
    assert torch.isfinite(x.grad).all()


def test_nonfinite_counted_row_raises(device, make_logits):
    """A NaN in a counted row is a ValueError naming the row (check_inputs=True)."""
    logits = make_logits(4, 20).to(device)
    logits[2, 7] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        tl.cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device), impl="triton")


@pytest.mark.parametrize(
    "vocab_size, scale", [(1, 4.0), (203, 1e4), (70, 1e-3)], ids=["V=1", "huge_logits", "tiny_logits"]
)
def test_extreme_shapes_and_values(vocab_size, scale, device, make_logits, make_targets):
    """V = 1, logits of magnitude 1e4 (one-hot softmax) and 1e-3 (uniform) match the torch path."""
    logits = make_logits(N, vocab_size, scale=scale).to(device)
    logits[0, 0] = float("-inf") if vocab_size > 1 else logits[0, 0]
    targets = make_targets((N,), vocab_size).to(device)
    targets[0] = min(1, vocab_size - 1)
    for case in ({}, dict(softcap=30.0, label_smoothing=0.1, focal_gamma=1.0)):
        if vocab_size > 1 and case:
            continue  # -inf logits with label smoothing are an infinite loss on both paths
        loss_t, grad_t = _run("triton", logits, targets, case)
        loss_r, grad_r = _run("torch", logits, targets, case)
        torch.testing.assert_close(loss_t, loss_r, **LOSS_TOL[torch.float32])
        torch.testing.assert_close(grad_t, grad_r, **GRAD_TOL[torch.float32])


def test_strided_and_empty_inputs(device, make_logits, make_targets):
    """A logits view with a row stride > V, one with a column stride of 2, a column-major one, and N = 0."""
    cols = 70
    base = make_logits(N, 2 * cols).to(device)
    targets = make_targets((N,), cols).to(device)
    for view in (base[:, :cols], base[:, ::2], base.t().contiguous().t()[:, :cols]):
        loss_t, grad_t = _run("triton", view, targets, {})
        loss_r, grad_r = _run("torch", view, targets, {})
        torch.testing.assert_close(loss_t, loss_r, **LOSS_TOL[torch.float32])
        torch.testing.assert_close(grad_t, grad_r, **GRAD_TOL[torch.float32])
    empty = torch.zeros(0, cols, device=device, requires_grad=True)
    loss = tl.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), impl="triton", reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_default_tiles_at_llama_vocabulary_on_gpu(dtype, device, monkeypatch, make_logits, make_targets):
    """On a GPU, the default tiles at V = 128256 (16 tiles a row) give the torch path's numbers."""
    if device != "cuda":
        pytest.skip("GPU-sized shapes are too slow for the interpreter")
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", DEFAULT_MAX_BLOCK_V)
    vocab_size = 128256
    logits = make_logits(64, vocab_size, dtype=dtype).to(device)
    targets = make_targets((64,), vocab_size).to(device)
    for case in ("plain", "everything"):
        loss_t, grad_t = _run("triton", logits, targets, CASES[case])
        loss_r, grad_r = _run("torch", logits, targets, CASES[case])
        torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_t, grad_r, **GRAD_TOL[dtype])
