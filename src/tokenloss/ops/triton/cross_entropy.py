"""Plain cross-entropy from logits in Triton: one read of the logits forward, one read and one write backward.

Design (one program per row, the row streamed in ``BLOCK_V`` tiles):

- Forward, :func:`_row_statistics_kernel`: an online log-sum-exp over the row (per tile: the tile's
  maximum, then ``s = s * exp(m_old - m_new) + sum(exp(z - m_new))``, one ``exp`` per element), the
  sum of the (capped) logits for label smoothing, and the target's logit from one scalar load.
  Each logit is read once; nothing but ``(N,)`` statistics is written. The per-row loss and the
  gradient coefficients ``alpha, beta, delta`` then come from the shared
  :func:`tokenloss.ops.rowwise.loss_and_coefficients` (``O(N)`` elementwise work), so every option
  has exactly the math of the torch path.
- Backward, :func:`_row_gradient_kernel`: reads the row once more and writes
  ``(alpha * softmax - beta * onehot - delta) * dz/dx`` once, into a fresh tensor or (opt-in,
  ``inplace_backward=True``) into the logits' own storage. Rows whose scaled coefficients are all
  zero (ignored, masked, zero upstream gradient) are written as zeros without reading their logits.

Why the gradient is not written in the forward pass (the Liger Kernel design): the loss returned
here is per row and its upstream gradient is only known in the backward pass (``1/denominator`` for
a mean, a vector for ``"none"``). A gradient written in the forward pass must therefore be
rescaled in the backward pass, one more read and write of ``N x V`` numbers: forward (read, read
again, write) plus backward (read, write), against forward (read) plus backward (read, write) here;
even with the second forward read served from L2 that is two writes of ``N x V`` against one. It
would also allocate the ``N x V`` gradient during the forward pass and do that work for forwards
that never run a backward (evaluation). So the recompute-in-backward design is kept; the benchmark
(``benchmarks/bench_gpu.py``) times it against Liger's gradient-in-forward kernel on the GPU.

Accumulation is in float32 for float32/bfloat16/float16 logits and float64 for float64 ones. No
host synchronisation except the optional finite check of ``check_inputs`` (shared with the torch
path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.rowwise import (
    RowStatistics,
    accumulation_dtype,
    check_finite_rows,
    loss_and_coefficients,
    refuse_double_backward,
    scale_coefficients,
)
from tokenloss.ops.triton.common import block_v, check_device, on_device_of, softcap_tanh, triton_dtype
from tokenloss.options import LossOptions

# Largest tile of a row that one loop iteration holds (elements); tests lower it to exercise the
# tile loop on small vocabularies. 8192 float32 values over 8 warps are 32 registers per thread.
MAX_BLOCK_V = 8192
NUM_WARPS = 8


def _block_v(vocab_size: int) -> int:
    return block_v(vocab_size, MAX_BLOCK_V)  # read at each launch: the tests lower MAX_BLOCK_V


@triton.jit
def _row_statistics_kernel(
    logits_ptr,  # (N, V) float32/bf16/fp16/fp64, unit column stride
    targets_ptr,  # (N,) int64 in [0, V)
    lse_ptr,  # (N,) ACC out: logsumexp of the capped logits
    target_logit_ptr,  # (N,) ACC out: the capped logit of the target
    logit_sum_ptr,  # (N,) ACC out: sum of the capped logits (written only with LABEL_SMOOTHING)
    n_cols,
    stride_row,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK_V)

    target = tl.load(targets_ptr + row)
    in_range = (target >= 0) & (target < n_cols)  # checked on the host unless check_inputs=False
    target_logit = tl.load(row_ptr + target, mask=in_range, other=0.0).to(ACC)
    if HAS_SOFTCAP:
        target_logit = softcap_tanh(target_logit, softcap)

    running_max = tl.full((), float("-inf"), ACC)
    running_sum = tl.zeros((), ACC)
    logit_sum = tl.zeros((), ACC)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC)  # (BLOCK_V,)
        if HAS_SOFTCAP:
            z = softcap_tanh(z, softcap)
        if LABEL_SMOOTHING:
            logit_sum += tl.sum(tl.where(valid, z, 0.0))
        z = tl.where(valid, z, float("-inf"))  # after the cap, which would map -inf to -softcap
        new_max = tl.maximum(running_max, tl.max(z))
        # A row of only -inf so far keeps a shift of 0, so that exp(-inf - shift) = 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift))
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))
    tl.store(target_logit_ptr + row, target_logit)
    if LABEL_SMOOTHING:
        tl.store(logit_sum_ptr + row, logit_sum)


@triton.jit
def _row_gradient_kernel(
    logits_ptr,  # (N, V) raw logits, unit column stride
    grad_ptr,  # (N, V) out, the logits' dtype; may be logits_ptr itself (in-place backward)
    targets_ptr,  # (N,) int64
    lse_ptr,  # (N,) ACC
    alpha_ptr,  # (N,) ACC scaled coefficients (weight x upstream gradient folded in)
    beta_ptr,  # (N,) ACC
    delta_ptr,  # (N,) ACC
    n_cols,
    stride_row,
    stride_grad_row,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    offsets = tl.arange(0, BLOCK_V)
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    delta = tl.load(delta_ptr + row)
    if (alpha == 0) & (beta == 0) & (delta == 0):
        # Ignored row: exact zeros, without reading logits that may hold anything.
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            tl.store(grad_row_ptr + cols, tl.zeros((BLOCK_V,), ACC).to(grad_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        lse = tl.load(lse_ptr + row)
        target = tl.load(targets_ptr + row)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            valid = cols < n_cols
            x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC)  # (BLOCK_V,)
            z = x
            if HAS_SOFTCAP:
                z = softcap_tanh(x, softcap)
            grad = alpha * tl.exp(z - lse) - delta
            grad = tl.where(cols == target, grad - beta, grad)
            if HAS_SOFTCAP:
                capped_tanh = z / softcap
                grad = grad * (1.0 - capped_tanh * capped_tanh)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def row_statistics(logits: Tensor, targets: Tensor, options: LossOptions) -> RowStatistics:
    """Whole-row statistics of ``(N, V)`` logits (unit column stride) by one read of each logit.

    Returns :class:`~tokenloss.ops.rowwise.RowStatistics` of ``(N,)`` tensors in the accumulation
    dtype (``logit_sum`` only with label smoothing).
    """
    n_rows, n_cols = logits.shape
    acc = accumulation_dtype(logits.dtype)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)
    target_logit = torch.empty_like(lse)
    logit_sum = torch.empty_like(lse) if options.label_smoothing > 0 else None
    if n_rows > 0:
        with on_device_of(logits):
            _row_statistics_kernel[(n_rows,)](
                logits,
                targets,
                lse,
                target_logit,
                lse if logit_sum is None else logit_sum,
                n_cols,
                logits.stride(0),
                1.0 if options.softcap is None else float(options.softcap),
                HAS_SOFTCAP=options.softcap is not None,
                LABEL_SMOOTHING=logit_sum is not None,
                ACC=triton_dtype(acc),
                BLOCK_V=_block_v(n_cols),
                num_warps=NUM_WARPS,
            )
    return RowStatistics.from_lse(lse, target_logit, logit_sum, n_cols)


def write_gradient(
    logits: Tensor,
    grad: Tensor,
    targets: Tensor,
    lse: Tensor,
    alpha: Tensor,
    beta: Tensor,
    delta: Tensor,
    options: LossOptions,
) -> Tensor:
    """Writes the gradient w.r.t. the raw ``(N, V)`` logits into ``grad`` (may be ``logits``) and returns it.

    ``alpha, beta, delta`` are the ``(N,)`` *scaled* coefficients
    (:func:`tokenloss.ops.rowwise.scale_coefficients`), ``lse`` the saved log-sum-exp.
    """
    n_rows, n_cols = logits.shape
    if n_rows > 0:
        with on_device_of(logits):
            _row_gradient_kernel[(n_rows,)](
                logits,
                grad,
                targets,
                lse,
                alpha,
                beta,
                delta,
                n_cols,
                logits.stride(0),
                grad.stride(0),
                1.0 if options.softcap is None else float(options.softcap),
                HAS_SOFTCAP=options.softcap is not None,
                ACC=triton_dtype(lse.dtype),
                BLOCK_V=_block_v(n_cols),
                num_warps=NUM_WARPS,
            )
    return grad


class TritonCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function: ``(N, V)`` logits -> ``(N,)`` weighted per-row losses, by Triton kernels."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,  # (N, V) float32 / bf16 / fp16 / fp64, unit column stride
        targets: Tensor,  # (N,) int64, 0 where the row does not count
        weights: Tensor,  # (N,) float32, 0 where the row does not count
        counted: Tensor,  # (N,) bool
        options: LossOptions,
        inplace_backward: bool,
    ) -> Tensor:
        stats = row_statistics(logits, targets, options)
        weights = weights.to(stats.lse.dtype)
        loss, alpha, beta, delta = loss_and_coefficients(stats, weights, logits.shape[1], options)
        if options.check_inputs:
            check_finite_rows(stats.lse, counted, "logits", loss)
        ctx.save_for_backward(logits, targets, weights, stats.lse, alpha, beta, delta)
        ctx.options, ctx.inplace_backward = options, inplace_backward
        return loss

    @staticmethod
    @eager_under_compile
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("cross_entropy")
        logits, targets, weights, lse, alpha, beta, delta = ctx.saved_tensors
        alpha, beta, delta = scale_coefficients(alpha, beta, delta, grad_loss.to(weights.dtype) * weights)
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        write_gradient(logits, grad, targets, lse, alpha, beta, delta, ctx.options)
        return grad, None, None, None, None, None


def cross_entropy_rows(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    counted: Tensor,
    options: LossOptions,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """Per-row weighted losses ``(N,)`` of ``(N, V)`` logits by the Triton kernels.

    Same arguments and result as :func:`tokenloss.ops.cross_entropy.cross_entropy_rows`: float32
    losses (float64 for float64 logits), 0 where a row does not count. ``options.chunk_size`` is
    unused: each program streams its row in tiles, with no ``(n, V)`` temporary to bound. Logits
    whose last dimension is not contiguous are copied first.

    Raises:
        ValueError: tensors not on a CUDA device (or, with kernels loaded under
            ``TRITON_INTERPRET=1``, not on the CPU); NaN/inf in a counted row (``check_inputs``).
    """
    check_device(_row_statistics_kernel, logits, targets, weights)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return TritonCrossEntropyFunction.apply(logits, targets, weights, counted, options, inplace_backward)
