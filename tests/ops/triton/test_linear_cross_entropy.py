"""The Triton fused linear cross-entropy gives the loss and the hidden/weight/bias gradients of the torch path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import tokenloss as tl  # noqa: E402
from tokenloss.ops.triton import linear_cross_entropy as triton_lce  # noqa: E402
from tokenloss.ops.triton.linear_cross_entropy import linear_cross_entropy_loss  # noqa: E402
from tokenloss.options import LossOptions, prepare_targets  # noqa: E402
from tokenloss.reference import reference_cross_entropy  # noqa: E402

pytestmark = pytest.mark.triton_kernels
# read at import, before conftest lowers them for each test
DEFAULT_TILES = {name: getattr(triton_lce, name) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}

# Awkward on purpose (tiles lowered in conftest to 16 x 32 x 16): 2 row blocks (16 + 3 rows), 3 column
# blocks (32 + 32 + 11) in 2 forward splits, 2 steps over D (16 + 5).
N, D, V = 19, 21, 75

# float32 against the torch fused path (same float32 math, other summation orders). bf16/fp16 against
# the float32 truth: the kernels keep float32 logits, so the loss is float32-accurate; the gradient
# tile is rounded to the input dtype for its two products and the results once more, so the
# gradients carry a few ulps of the input dtype relative to the largest entry.
TOL = {
    torch.float64: dict(loss=dict(rtol=1e-12, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-12)),
    torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-4, atol=1e-6)),
    torch.bfloat16: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=2**-6, atol=2**-7)),
    torch.float16: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=2**-9, atol=2**-10)),
}

CASES = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "ignore_and_mask": dict(ignore_every=3, mask=True),
    "smoothing_softcap": dict(label_smoothing=0.1, softcap=4.0),
    "z_loss_focal_none": dict(reduction="none", z_loss=1e-3, focal_gamma=2.0, ignore_every=4),
    "weights_sum_num_items": dict(reduction="sum", token_weights=True, num_items=7, ignore_every=5),
    "everything": dict(
        label_smoothing=0.2, z_loss=1e-2, softcap=3.0, focal_gamma=0.5, token_weights=True, ignore_every=4, mask=True
    ),
}


def _inputs(dtype, device, seed=0, shape=(N, D, V)):
    n, d, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (3 / d**0.5)  # logits of std ~3
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)] + [targets.to(device)]


def _run(impl, hidden, weight, bias, targets, case, **extra):
    """Loss and (hidden, weight, bias) gradients of tl.linear_cross_entropy under ``case``."""
    case = dict(case)
    ignore_every = case.pop("ignore_every", 0)
    gen = torch.Generator().manual_seed(7)
    targets = targets.clone()
    if ignore_every:
        targets[::ignore_every] = -100
    if case.pop("mask", False):
        case["mask"] = (torch.rand(targets.shape, generator=gen) > 0.3).to(targets.device)
    if case.pop("token_weights", False):
        case["token_weights"] = torch.rand(targets.shape, generator=gen, dtype=torch.float64).to(targets.device)
    use_bias = case.pop("bias", True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    h, w, b = leaves
    loss = tl.linear_cross_entropy(h, w, targets, bias=b if use_bias else None, impl=impl, **case, **extra)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype))
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return loss.detach(), grads


def _assert_close_to(got, want, dtype):
    loss, grads = got
    loss_want, grads_want = want
    torch.testing.assert_close(loss.to(loss_want.dtype), loss_want, **TOL[dtype]["loss"])
    for grad, grad_want in zip(grads, grads_want):
        assert grad.dtype == dtype
        scale = grad_want.abs().max().clamp(min=1e-30)  # gradients compared relative to their largest entry
        tol = TOL[dtype]["grad"]
        torch.testing.assert_close(grad.to(grad_want.dtype), grad_want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize(
    "case, dtype",
    [(case, torch.float32) for case in CASES]
    + [(case, dtype) for case in ("plain", "everything") for dtype in (torch.bfloat16, torch.float16)]
    + [("everything", torch.float64)],
    ids=lambda value: str(value).replace("torch.", ""),
)
def test_every_option_matches_torch_path(case, dtype, device):
    """Loss and all three gradients equal the torch fused path (float32 truth for bf16/fp16)."""
    inputs = _inputs(dtype, device)
    got = _run("triton", *inputs, CASES[case])
    truth_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    truth_inputs = [t.to(truth_dtype) if t.is_floating_point() else t for t in inputs]
    want = _run("torch", *truth_inputs, CASES[case])
    _assert_close_to(got, want, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_in_forward_strategy_matches_recompute(reduction, device):
    """strategy='in_forward' (gradients during the forward pass) gives the recompute strategy's numbers."""
    hidden, weight, bias, targets = _inputs(torch.float32, device)
    options = LossOptions(reduction=reduction, label_smoothing=0.1, softcap=4.0)
    prepared = prepare_targets((N,), targets, V, options)
    results = []
    for strategy in ("recompute", "in_forward"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = linear_cross_entropy_loss(*leaves, prepared, options, strategy=strategy)
        loss.backward(torch.full_like(loss, 0.37))
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    _assert_close_to(results[1], results[0], torch.float32)


def test_public_api_matches_float64_reference(device):
    """tl.linear_cross_entropy(impl='triton') with shift and a mask equals the float64 formulas on h @ W.T + b."""
    hidden, weight, bias, _ = _inputs(torch.float32, device)
    hidden = hidden.reshape(1, N, D)
    targets = torch.randint(0, V, (1, N), generator=torch.Generator().manual_seed(5)).to(device)
    mask = (torch.arange(N, device=device) % 3 != 0).reshape(1, N)
    kwargs = dict(shift=True, mask=mask, z_loss=1e-4, reduction="none")
    got = tl.linear_cross_entropy(hidden, weight, targets, bias=bias, impl="triton", **kwargs)
    logits = hidden.double() @ weight.double().t() + bias.double()
    want = reference_cross_entropy(logits, targets, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_ignored_rows_are_skipped_and_cannot_poison_gradients(device):
    """Rows that do not count contribute nothing, even holding NaN; if none counts: 0 loss, zero gradients."""
    hidden, weight, bias, targets = _inputs(torch.float32, device)
    hidden[4] = float("nan")
    targets[4] = targets[11] = -100
    keep = torch.tensor([i for i in range(N) if i not in (4, 11)], device=device)
    got = _run("triton", hidden, weight, bias, targets, dict(reduction="sum"))
    want = _run("torch", hidden[keep], weight, bias, targets[keep], dict(reduction="sum"))
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32]["loss"])
    torch.testing.assert_close(got[1][0][keep], want[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1][1], want[1][1], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[1][0][4], torch.zeros(D, device=device))
    loss, grads = _run("triton", hidden, weight, bias, torch.full_like(targets, -100), {})
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_only_requested_gradients_are_computed(device):
    """A frozen weight gets no gradient (the kernel skips that product); hidden's is still right."""
    hidden, weight, bias, targets = _inputs(torch.float32, device)
    grads = {}
    for impl in ("triton", "torch"):
        h = hidden.clone().requires_grad_(True)
        tl.linear_cross_entropy(h, weight, targets, bias=bias, impl=impl).backward()
        grads[impl] = h.grad
    assert not weight.requires_grad and weight.grad is None
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_clear_errors(device):
    """An unknown strategy and a weight of another dtype are refused with the argument named."""
    hidden, weight, bias, targets = _inputs(torch.float32, device)
    options = LossOptions()
    prepared = prepare_targets((N,), targets, V, options)
    with pytest.raises(ValueError, match="strategy"):
        linear_cross_entropy_loss(hidden, weight, bias, prepared, options, strategy="later")
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        linear_cross_entropy_loss(hidden, weight.double(), None, prepared, options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_default_tiles_on_gpu(dtype, device, monkeypatch):
    """On a GPU, the default 128 x 128 x 64 tiles on an awkward (N, D, V) give the torch path's numbers."""
    if device != "cuda":
        pytest.skip("GPU-sized shapes are too slow for the interpreter")
    for name, value in DEFAULT_TILES.items():
        monkeypatch.setattr(triton_lce, name, value)
    inputs = _inputs(dtype, device, shape=(301, 520, 50257))
    got = _run("triton", *inputs, CASES["everything"])
    truth_inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    _assert_close_to(got, _run("torch", *truth_inputs, CASES["everything"]), dtype)
