"""The shared Triton helpers: the exp-built soft-capping tanh, and the device check's clear errors."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import triton.language as tl  # noqa: E402

import tokenloss  # noqa: E402
from tokenloss.ops.triton import cross_entropy as triton_ce  # noqa: E402
from tokenloss.ops.triton.common import check_device, kernels_interpreted, softcap_tanh  # noqa: E402


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, n, cap, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(out_ptr + offsets, softcap_tanh(x, cap), mask=offsets < n)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_tanh_matches_torch(dtype, device):
    """cap * tanh(x / cap) to a few ulps, across 0 (the series branch), large |x| and +-inf."""
    x = torch.cat(
        [
            torch.linspace(-40, 40, 101, dtype=torch.float64),
            torch.tensor(
                [0.0, 1e-30, -1e-6, 0.37, 0.1876, -0.1874, 0.1874, float("inf"), float("-inf")], dtype=torch.float64
            ),
        ]
    ).to(dtype)
    out = torch.empty_like(x, device=device)
    _softcap_kernel[(1,)](x.to(device), out, x.numel(), 3.0, BLOCK=128)
    tol = dict(rtol=1e-6, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(out.cpu(), 3.0 * torch.tanh(x / 3.0), **tol)


def test_compiled_kernels_refuse_cpu_tensors():
    """A compiled kernel given CPU tensors is a ValueError that says what to use instead."""

    @triton.jit
    def compiled_kernel(x_ptr):
        pass

    if kernels_interpreted(compiled_kernel):
        pytest.skip("TRITON_INTERPRET=1 in this process: every kernel is interpreted")
    with pytest.raises(ValueError, match=r"CUDA tensors.*impl='torch'"):
        check_device(compiled_kernel, torch.zeros(2))


def test_public_api_on_cpu_without_interpreter_says_use_torch():
    """tokenloss.cross_entropy(impl='triton') on CPU tensors with compiled kernels is a clear ValueError;
    impl='auto' picks torch there."""
    if kernels_interpreted(triton_ce._row_statistics_kernel):
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels take CPU tensors")
    logits, targets = torch.zeros(2, 5), torch.tensor([1, 3])
    with pytest.raises(ValueError, match=r"impl='triton' runs Triton kernels on CUDA tensors"):
        tokenloss.cross_entropy(logits, targets, impl="triton")
    with pytest.raises(ValueError, match=r"impl='triton' runs Triton kernels on CUDA tensors"):
        tokenloss.linear_cross_entropy(torch.zeros(2, 3), torch.zeros(5, 3), targets, impl="triton")
    torch.testing.assert_close(tokenloss.cross_entropy(logits, targets, impl="auto"), torch.tensor(5.0).log())


def test_tensors_on_two_devices_are_refused():
    """Tensors on different devices are a ValueError naming both."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to have two devices")
    with pytest.raises(ValueError, match="one device"):
        check_device(_softcap_kernel, torch.zeros(2), torch.zeros(2, device="cuda"))
