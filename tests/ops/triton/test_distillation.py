"""The Triton distillation chunk kernels give the torch chunk math's losses and gradients, and the fused loss
with impl="triton" the torch path's, for every divergence the kernels cover."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import tokenloss as tl  # noqa: E402
from tokenloss import distillation  # noqa: E402
from tokenloss.ops.triton import distillation as kernels  # noqa: E402

pytestmark = pytest.mark.triton_kernels

V = 203  # three tiles of 64 (conftest lowers MAX_BLOCK_V) and 11 more columns
CONFIGS = [
    dict(divergence="forward_kl", temperature=1.0, beta=0.5, hard_weight=0.0),
    dict(divergence="forward_kl", temperature=2.0, beta=0.5, hard_weight=0.0),
    dict(divergence="reverse_kl", temperature=0.7, beta=0.5, hard_weight=0.0),
    dict(divergence="cross_entropy", temperature=1.5, beta=0.5, hard_weight=0.0),
    dict(divergence="forward_kl", temperature=1.0, beta=0.5, hard_weight=0.4),
    dict(divergence="reverse_kl", temperature=1.0, beta=0.5, hard_weight=0.3),
    dict(divergence="cross_entropy", temperature=1.0, beta=0.5, hard_weight=1.0),
    dict(divergence="jsd", temperature=1.0, beta=0.5, hard_weight=0.0),
    dict(divergence="jsd", temperature=1.8, beta=0.1, hard_weight=0.0),
    dict(divergence="jsd", temperature=1.0, beta=0.7, hard_weight=0.25),
    dict(divergence="jsd", temperature=0.8, beta=0.0, hard_weight=0.0),
    dict(divergence="jsd", temperature=1.0, beta=1.0, hard_weight=0.0),
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_chunk_kernels_equal_the_torch_chunk_math(device, dtype, config) -> None:
    gen = torch.Generator().manual_seed(4)
    student = (torch.randn(5, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    teacher = (torch.randn(5, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    student[:, 70] = teacher[:, 70] = float("-inf")  # a banned token in the second tile
    student[0, :64] = teacher[0, :64] = float("-inf")  # a first tile of -inf only
    targets = torch.randint(71, V, (5,), generator=gen)
    want_loss, want_grad = distillation.chunk_loss_and_gradient(
        student.clone(), teacher.clone(), targets, **config, gradient=True
    )
    loss, grad = kernels.chunk_loss_and_gradient(
        student.to(device), teacher.to(device), targets.to(device), **config, gradient=True
    )
    assert_close(loss.cpu(), want_loss, **TOL[dtype])
    assert_close(grad.cpu(), want_grad, **TOL[dtype])


def test_non_finite_rows_raise_as_the_torch_path(device) -> None:
    student = torch.randn(3, V, device=device)
    teacher = torch.randn(3, V, device=device)
    teacher[1, 5] = float("nan")
    config = CONFIGS[0]
    with pytest.raises(ValueError, match="the teacher logits contain NaN"):
        kernels.chunk_loss_and_gradient(student, teacher, None, **config, gradient=False)
    teacher[1, 5] = 0.0
    student[2, 9] = float("-inf")  # the teacher has mass there: an infinite forward KL
    with pytest.raises(ValueError, match="loss is infinite"):
        kernels.chunk_loss_and_gradient(student, teacher, None, **config, gradient=False)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_with_the_kernels_equals_torch(device, reduction, divergence) -> None:
    gen = torch.Generator().manual_seed(5)
    inputs = dict(
        student_hidden=torch.randn(2, 4, 8, generator=gen), student_weight=torch.randn(V, 8, generator=gen),
        teacher_hidden=torch.randn(2, 4, 12, generator=gen), teacher_weight=torch.randn(V, 12, generator=gen),
    )  # fmt: skip
    targets = torch.randint(0, V, (2, 4), generator=gen)
    results = []
    for impl in ("torch", "triton"):
        leaves = {k: v.to(device).requires_grad_(k.startswith("student")) for k, v in inputs.items()}
        loss = tl.linear_distillation_loss(**leaves, targets=targets.to(device), hard_weight=0.2, shift=True,
                                           reduction=reduction, chunk_size=3, divergence=divergence,
                                           impl=impl)  # fmt: skip
        loss.sum().backward()
        results.append((loss.detach().cpu(), leaves["student_hidden"].grad.cpu(), leaves["student_weight"].grad.cpu()))
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, rtol=2e-5, atol=2e-6)
