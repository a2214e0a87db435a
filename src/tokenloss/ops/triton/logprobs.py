"""Per-token log-probabilities and entropy in Triton: one read of each logit forward, one read and one write backward.

The same per-row math as :mod:`tokenloss.logprobs` (which runs it with torch ops, several passes
over each chunk), in two kernels, one program per row streaming the row in ``BLOCK_V`` tiles:

- :func:`_statistics_kernel`: an online log-sum-exp of the tempered logits ``z = logits / T``, and
  with it ``t = sum_j e^(z_j - m) (z_j - m)`` rescaled like the sum when the running maximum ``m``
  grows (``t' = e^(m - m') (t + (m - m') s)``), so that the entropy ``H = log s - t / s`` comes from
  the same single read; the target's log-probability from one scalar load; and the row's argmax
  (the first index of the maximum, as ``torch.argmax``) for ``return_top1``.
- :func:`_gradient_kernel`: ``d(g logp + h H)/dlogits = (e^x (x slope - offset) + g onehot) / T``
  with ``x = z - m`` and two per-row scalars, written once in the logits' dtype.

Used by :func:`tokenloss.token_logprobs` on the logits, and by
:func:`tokenloss.linear_token_logprobs` on each chunk of logits that cuBLAS computes (the products
stay torch's). Accumulation in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloss.ops.rowwise import accumulation_dtype
from tokenloss.ops.triton.common import block_v, check_device, on_device_of, triton_dtype

MAX_BLOCK_V = 8192
NUM_WARPS = 8


def _block_v(vocab_size: int) -> int:
    return block_v(vocab_size, MAX_BLOCK_V)  # read at each launch: the tests lower MAX_BLOCK_V


@triton.jit
def _statistics_kernel(
    logits_ptr,  # (N, V) raw logits, unit column stride
    targets_ptr,  # (N,) int64 in [0, V)
    shift_ptr,  # (N,) ACC out: the row maximum of z (0 for a row of -inf)
    log_sum_ptr,  # (N,) ACC out: log sum_j exp(z_j - shift)
    logp_ptr,  # (N,) ACC out: z_target - shift - log_sum
    entropy_ptr,  # (N,) ACC out (WANT_ENTROPY): log_sum - t / s
    argmax_ptr,  # (N,) int64 out (WANT_ARGMAX)
    n_cols,
    stride_row,
    inv_temperature,
    WANT_ENTROPY: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    target_z = tl.load(row_ptr + target).to(ACC) * inv_temperature

    running_max = tl.full((), float("-inf"), ACC)
    shift = tl.zeros((), ACC)  # the finite shift of s and t so far
    s = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    best = tl.zeros((), tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC) * inv_temperature
        z = tl.where(valid, z, float("-inf"))
        tile_max = tl.max(z, axis=0)
        if WANT_ARGMAX:  # strictly greater: the first index of the maximum wins, as torch.argmax
            best = tl.where(tile_max > running_max, start + tl.argmax(z, axis=0).to(tl.int64), best)
        new_max = tl.maximum(running_max, tile_max)
        new_shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        scale = tl.where(s == 0, 0.0, tl.exp(shift - new_shift))
        e = tl.exp(z - new_shift)  # 0 at -inf and outside the row
        if WANT_ENTROPY:
            x = tl.where(e > 0, z - new_shift, 0.0)  # 0 where e is: no 0 * -inf
            t = tl.where(s == 0, 0.0, scale * (t + (shift - new_shift) * s)) + tl.sum(e * x)
        s = s * scale + tl.sum(e, axis=0)
        running_max = new_max
        shift = new_shift
    log_sum = tl.log(s)
    tl.store(shift_ptr + row, shift)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(logp_ptr + row, target_z - shift - log_sum)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, log_sum - t / s)
    if WANT_ARGMAX:
        tl.store(argmax_ptr + row, best)


@triton.jit
def _gradient_kernel(
    logits_ptr,  # (N, V) raw logits, unit column stride
    grad_ptr,  # (N, V) out: ACC (the fused path) or the logits' dtype
    targets_ptr,  # (N,) int64
    shift_ptr,  # (N,) ACC
    log_sum_ptr,  # (N,) ACC
    entropy_ptr,  # (N,) ACC
    g_logp_ptr,  # (N,) ACC upstream gradient of logp
    g_entropy_ptr,  # (N,) ACC upstream gradient of the entropy
    n_cols,
    stride_row,
    stride_grad_row,
    inv_temperature,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    shift = tl.load(shift_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    g = tl.load(g_logp_ptr + row)
    h = tl.load(g_entropy_ptr + row)
    inv_s = tl.exp(-log_sum)
    slope = -h * inv_s
    offset = (g + h * (tl.load(entropy_ptr + row) - log_sum)) * inv_s
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC) * inv_temperature - shift
        e = tl.exp(x)
        x = tl.where(e > 0, x, 0.0)  # a -inf logit: p = 0 and a zero gradient, no 0 * -inf
        grad = e * (x * slope - offset)
        grad = tl.where(cols == target, grad + g, grad) * inv_temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def statistics(
    logits: Tensor, targets: Tensor, temperature: float, want_entropy: bool, argmax_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(shift, log_sum, logp, entropy)`` ``(n,)`` in the accumulation dtype of ``(n, V)`` raw logits
    at ``temperature`` (entropy None unless ``want_entropy``), each row's argmax into ``argmax_out``."""
    check_device(_statistics_kernel, logits, targets)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_rows, n_cols = logits.shape
    acc = accumulation_dtype(logits.dtype)
    shift, log_sum, logp = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in range(3))
    entropy = torch.empty_like(shift) if want_entropy else None
    if n_rows > 0:
        with on_device_of(logits):
            _statistics_kernel[(n_rows,)](
                logits, targets, shift, log_sum, logp, shift if entropy is None else entropy,
                targets if argmax_out is None else argmax_out, n_cols, logits.stride(0), 1.0 / temperature,
                WANT_ENTROPY=want_entropy, WANT_ARGMAX=argmax_out is not None, ACC=triton_dtype(acc),
                BLOCK_V=_block_v(n_cols), num_warps=NUM_WARPS,
            )  # fmt: skip
    return shift, log_sum, logp, entropy


def gradient(
    logits: Tensor,
    targets: Tensor,
    shift: Tensor,
    log_sum: Tensor,
    entropy: Tensor,
    g_logp: Tensor,
    g_entropy: Tensor,
    temperature: float,
    out: Tensor,
) -> Tensor:
    """Writes ``d(g logp + h entropy)/dlogits`` ``(n, V)`` of raw logits into ``out`` and returns it."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_rows, n_cols = logits.shape
    if n_rows > 0:
        with on_device_of(logits):
            _gradient_kernel[(n_rows,)](
                logits, out, targets, shift, log_sum, entropy, g_logp, g_entropy, n_cols, logits.stride(0),
                out.stride(0), 1.0 / temperature, ACC=triton_dtype(shift.dtype), BLOCK_V=_block_v(n_cols),
                num_warps=NUM_WARPS,
            )  # fmt: skip
    return out
