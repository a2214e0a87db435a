"""What the Triton kernels share: the soft-capping tanh, dtype mapping, and the device check.

Triton decides when a kernel is *defined* (``@triton.jit`` runs at import) whether it will be
compiled for a GPU or run by Triton's CPU interpreter (``TRITON_INTERPRET=1`` at that moment).
:func:`kernels_interpreted` reads that decision back from a kernel object, so the device check
below is right whatever the environment says later.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def softcap_tanh(x, cap):
    """``cap * tanh(x / cap)`` elementwise, in the dtype of ``x``.

    Triton's ``libdevice.tanh`` does not run under the interpreter, so tanh is built from ``exp``:
    ``(1 - e) / (1 + e)`` with ``e = exp(-2|y|)`` (never overflows; ``+-inf`` map to ``+-1``), and
    for ``|y| < 1/16``, where that form loses relative precision (a few float32 ulps at most beyond),
    the odd Taylor series to ``y**9`` (truncation error below ``1e-14`` relative there), written with
    integer constants only.
    """
    y = x / cap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    y2 = y * y
    # a - a^3/3 + 2a^5/15 - 17a^7/315 + 62a^9/2835 over the common denominator 2835, so that every
    # constant is an integer (exact in the float32 literals Triton makes of them, even for float64)
    small = a + a * y2 * (((62.0 * y2 - 153.0) * y2 + 378.0) * y2 - 945.0) / 2835.0
    t = tl.where(a < 0.0625, small, large)
    return cap * tl.where(y < 0, -t, t)


def block_v(vocab_size: int, max_block_v: int) -> int:
    """The tile width of a row-streaming kernel: the next power of two of ``vocab_size``, within
    ``[16, max_block_v]`` (each kernel module has its ``MAX_BLOCK_V``, which the tests lower)."""
    return max(16, min(max_block_v, triton.next_power_of_2(vocab_size)))


def triton_dtype(dtype: torch.dtype):
    """The Triton scalar type of a torch float dtype (accumulators and constexpr casts)."""
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


def kernels_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs in Triton's CPU interpreter."""
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


def check_device(kernel, *tensors: Tensor) -> None:
    """Raises ValueError unless the tensors can be handed to ``kernel``.

    Compiled kernels need CUDA tensors; interpreted kernels (defined under ``TRITON_INTERPRET=1``)
    take CPU tensors. All tensors must be on one device.
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"impl='triton' needs all tensors on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if kernels_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError(
                f"the Triton kernels were loaded in interpreter mode (TRITON_INTERPRET=1) and take CPU "
                f"tensors, got a tensor on {device}"
            )
    elif device.type != "cuda":
        raise ValueError(
            f"impl='triton' runs Triton kernels on CUDA tensors, got a tensor on {device}; use impl='torch' "
            "(or impl='auto', which picks torch off the GPU), or set TRITON_INTERPRET=1 before importing "
            "tokenloss.ops.triton to run the kernels in Triton's (slow) CPU interpreter"
        )


def bf16_dot_in_fp32(kernel, dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` must get float32 operands instead of bfloat16 ones.

    Triton 3.9's interpreter multiplies bfloat16 blocks wrongly (it treats their bits as integers:
    results off by 1e10). Upcasting bf16 to float32 is exact, and bf16 x bf16 products accumulated
    in float32 are what the tensor cores compute, so the interpreted kernels test the same math.
    Compiled kernels keep bf16 operands (tensor cores).
    """
    return dtype == torch.bfloat16 and kernels_interpreted(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for float32 operands: TF32 only where PyTorch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def on_device_of(tensor: Tensor):
    """Context in which a kernel launch goes to ``tensor``'s GPU (Triton launches on the current one)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
