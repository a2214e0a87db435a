"""Fused linear layer + cross-entropy in Triton: each logits tile lives in on-chip memory only (Cut Cross-Entropy).

For hidden states ``h`` ``(N, D)``, an LM head ``W`` ``(V, D)`` and an optional bias ``b`` ``(V,)``,
no ``(N, V)`` tensor (nor an ``(n, V)`` chunk of one) is ever written to GPU memory:

- Forward, :func:`_lse_forward_kernel`: program ``(i, s)`` owns ``BLOCK_M`` rows and the ``s``-th
  of ``n_splits`` column ranges of the vocabulary. For each ``BLOCK_M x BLOCK_N`` tile in its range
  it computes the logits ``h_tile @ W_tile.T (+ b)`` in registers (``tl.dot`` over ``D`` in
  ``BLOCK_K`` steps, float32 accumulation), caps them, and folds them into a per-row online
  log-sum-exp, the target's logit (the column equal to the target, if in this tile) and, for label
  smoothing, the sum of the logits. It writes ``(n_splits, N)`` partial results, which
  ``logsumexp``/``sum`` over the splits combine (splitting the vocabulary gives the GPU enough
  programs when N is small). The loss and coefficients ``alpha, beta, delta`` then come from the
  shared :func:`tokenloss.ops.rowwise.loss_and_coefficients`, so every option has the torch math.
- Backward, :func:`_backward_kernel`: program ``(i, j)`` recomputes its logits tile, turns it into
  the gradient tile ``g = (alpha * softmax - beta * onehot - delta) * dz/dx`` from the saved
  log-sum-exp, and adds ``g @ W_tile`` into ``grad_hidden`` and ``g.T @ h_tile`` into
  ``grad_weight`` (and ``sum(g)`` into ``grad_bias``) with float32 atomic adds, ``BLOCK_K`` columns
  of ``D`` at a time. Tiles whose rows all have zero scaled coefficients (ignored or masked rows,
  a zero upstream gradient) return at once: an SFT batch that is 70% prompt skips 70% of the work,
  decided on the device, without a host sync.

Gradient-in-forward or recompute-in-backward: the gradient tile needs each row's final
log-sum-exp, which is known only after a full pass over the vocabulary, and ``grad_weight``
receives contributions from every row block, so a gradient computed in the forward pass still
takes two passes over the tiles there: one product for the log-sum-exp, then one to recompute the
tile and two for the gradients, the same four products as forward (one) plus backward (three)
here. Computing it early would hold the float32 ``grad_weight`` (``4 V D`` bytes: 2 GiB at
V = 128256, D = 4096) from the forward to the backward pass, spend three products on forwards
that never run a backward, and could not serve ``"none"`` (its per-row upstream gradient is known
only in the backward pass). So recompute-in-backward is the default; ``strategy="in_forward"``
(mean/sum only) is kept so that ``benchmarks/bench_gpu.py`` can time both on a GPU.

Precision: bf16/fp16 operands go to ``tl.dot`` as they are (tensor cores, float32 accumulation), the
statistics and the gradient tile are float32, the gradient tile is rounded to the input dtype for
its two products (as an unfused backward through bf16 logits would be), and ``grad_hidden``,
``grad_weight`` and ``grad_bias`` accumulate in float32 before the final cast. float32 operands use
TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` allows it. float64 runs in float64.
Atomic adds make the low bits of the gradients depend on the order in which tiles finish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloss.ops.autocast import backward_without_autocast
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.linear_cross_entropy import gradients_needed
from tokenloss.ops.rowwise import (
    RowStatistics,
    accumulation_dtype,
    check_finite_rows,
    loss_and_coefficients,
    refuse_double_backward,
    scale_coefficients,
)
from tokenloss.ops.triton.common import (
    bf16_dot_in_fp32,
    check_device,
    dot_precision,
    on_device_of,
    softcap_tanh,
    triton_dtype,
)
from tokenloss.options import LossOptions, PreparedTargets

# Tile sizes for 2-byte operands (bf16/fp16); :func:`_tiles` scales them down for float32 and
# float64 so the pipelined operand buffers fit in shared memory. Compiled ahead of time for sm_90
# (no GPU needed), the bf16 kernels take 32 KiB (forward) and 64 KiB (backward) of shared memory
# (H100: 227 KiB a block).
# Tests lower them to exercise the loops on small shapes. Not autotuned: the backward kernel's
# atomic adds would have to be reset between autotuning trials.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
GROUP_M = 8  # row blocks that consecutive programs share, so weight tiles are reused from L2
NUM_WARPS = 8
NUM_STAGES = 3
STRATEGIES = ("recompute", "in_forward")


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,  # (BM,) int64 row indices
    cols,  # (BN,) int64 column indices
    n_rows,
    n_cols,
    dim,
    stride_h,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """The (capped) logits tile ``(BM, BN)`` in ACC, in registers; out-of-range entries hold junk."""
    acc = tl.zeros((BM, BN), ACC)
    ks = tl.arange(0, BK)
    for k0 in range(0, dim, BK):
        k = k0 + ks
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < dim), other=0.0
        )  # (BM, BK)
        w = tl.load(
            w_ptr + cols[:, None] * stride_w + k[None, :], mask=(cols[:, None] < n_cols) & (k[None, :] < dim), other=0.0
        )  # (BN, BK)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_SOFTCAP:
        acc = softcap_tanh(acc, softcap)
    return acc


@triton.jit
def _lse_forward_kernel(
    h_ptr,  # (N, D) input dtype, row stride stride_h, unit column stride
    w_ptr,  # (V, D) input dtype, row stride stride_w, unit column stride
    b_ptr,  # (V,) or a dummy when not HAS_BIAS
    targets_ptr,  # (N,) int64
    lse_part_ptr,  # (n_splits, N) ACC out: log-sum-exp over this split's columns
    target_part_ptr,  # (n_splits, N) ACC out: the target's logit if in this split, else 0
    sum_part_ptr,  # (n_splits, N) ACC out: sum of this split's logits (only LABEL_SMOOTHING)
    n_rows,
    n_cols,
    dim,
    stride_h,
    stride_w,
    cols_per_split,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr,
    ACC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_valid = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=-1)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)

    running_max = tl.full((BM,), float("-inf"), ACC)
    running_sum = tl.zeros((BM,), ACC)
    target_logit = tl.zeros((BM,), ACC)
    logit_sum = tl.zeros((BM,), ACC)
    for n0 in range(col_start, col_end, BN):
        cols = n0 + tl.arange(0, BN).to(tl.int64)
        col_valid = cols < col_end
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            n_rows,
            n_cols,
            dim,
            stride_h,
            stride_w,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
            ACC,
            DOT_FP32,
            PRECISION,
            BM,
            BN,
            BK,
        )  # (BM, BN): the logits tile, never stored
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        if LABEL_SMOOTHING:
            logit_sum += tl.sum(tl.where(col_valid[None, :], z, 0.0), axis=1)
        z = tl.where(col_valid[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: exp(-inf) = 0, not NaN
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        running_max = new_max
    out = split.to(tl.int64) * n_rows + rows
    tl.store(lse_part_ptr + out, running_max + tl.log(running_sum), mask=row_valid)
    tl.store(target_part_ptr + out, target_logit, mask=row_valid)
    if LABEL_SMOOTHING:
        tl.store(sum_part_ptr + out, logit_sum, mask=row_valid)


@triton.jit
def _backward_kernel(
    h_ptr,  # (N, D) input dtype
    w_ptr,  # (V, D) input dtype
    b_ptr,  # (V,) or dummy
    targets_ptr,  # (N,) int64
    lse_ptr,  # (N,) ACC
    alpha_ptr,  # (N,) ACC scaled coefficients
    beta_ptr,  # (N,) ACC
    delta_ptr,  # (N,) ACC
    grad_h_ptr,  # (N, D) ACC accumulator (atomic adds), row stride = dim
    grad_w_ptr,  # (V, D) ACC accumulator (atomic adds), row stride = dim
    grad_b_ptr,  # (V,) ACC accumulator or dummy
    n_rows,
    n_cols,
    dim,
    stride_h,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GRAD_H: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    ACC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    # Grouped order: GROUP row blocks sweep the vocabulary together, sharing weight tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BM)
    num_n = tl.cdiv(n_cols, BN)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    row_valid = rows < n_rows
    col_valid = cols < n_cols
    alpha = tl.load(alpha_ptr + rows, mask=row_valid, other=0.0)
    beta = tl.load(beta_ptr + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_valid, other=0.0)
    active = (alpha != 0) | (beta != 0) | (delta != 0)  # (BM,) rows with a gradient
    if tl.sum(active.to(tl.int32)) > 0:
        lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
        targets = tl.load(targets_ptr + rows, mask=row_valid, other=-1)
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            n_rows,
            n_cols,
            dim,
            stride_h,
            stride_w,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
            ACC,
            DOT_FP32,
            PRECISION,
            BM,
            BN,
            BK,
        )  # (BM, BN) recomputed in registers
        grad = alpha[:, None] * tl.exp(z - lse[:, None]) - delta[:, None]
        grad = tl.where(cols[None, :] == targets[:, None], grad - beta[:, None], grad)
        if HAS_SOFTCAP:
            capped_tanh = z / softcap
            grad = grad * (1.0 - capped_tanh * capped_tanh)
        grad = tl.where(active[:, None] & col_valid[None, :], grad, 0.0)  # (BM, BN) ACC
        if GRAD_B:
            tl.atomic_add(grad_b_ptr + cols, tl.sum(grad, axis=0), mask=col_valid)
        if DOT_FP32:
            grad_op = grad.to(tl.float32)
        else:
            grad_op = grad.to(h_ptr.dtype.element_ty)  # the operand dtype of the tile's products
        ks = tl.arange(0, BK)
        for k0 in range(0, dim, BK):
            k = k0 + ks
            k_valid = k < dim
            if GRAD_H:
                w = tl.load(
                    w_ptr + cols[:, None] * stride_w + k[None, :], mask=col_valid[:, None] & k_valid[None, :], other=0.0
                )  # (BN, BK)
                if DOT_FP32:
                    w = w.to(tl.float32)
                grad_h = tl.dot(grad_op, w, input_precision=PRECISION, out_dtype=ACC)  # (BM, BK)
                tl.atomic_add(
                    grad_h_ptr + rows[:, None] * dim + k[None, :], grad_h, mask=row_valid[:, None] & k_valid[None, :]
                )
            if GRAD_W:
                # Rows without a gradient load as zeros: 0 * NaN would leak an ignored row's junk.
                h = tl.load(
                    h_ptr + rows[:, None] * stride_h + k[None, :], mask=active[:, None] & k_valid[None, :], other=0.0
                )  # (BM, BK)
                if DOT_FP32:
                    h = h.to(tl.float32)
                grad_w = tl.dot(tl.trans(grad_op), h, input_precision=PRECISION, out_dtype=ACC)  # (BN, BK)
                tl.atomic_add(
                    grad_w_ptr + cols[:, None] * dim + k[None, :], grad_w, mask=col_valid[:, None] & k_valid[None, :]
                )


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, stages)`` for operands of ``dtype``.

    Shared memory of the backward kernel compiled for sm_90 (``tests/ops/triton/test_compile.py``
    does this without a GPU): bf16/fp16 64 KiB; float32 would need 208 KiB at those tiles, so ``BK``
    is halved (144 KiB, under the 164 KiB of an A100); float64 would need 448 KiB, so ``BM``, ``BN``
    and ``BK`` are halved and two stages are pipelined instead of three (80 KiB). Never below 16,
    the smallest compiled ``tl.dot``.
    """
    size = torch.empty((), dtype=dtype).element_size()
    if size <= 2:
        return BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES
    if size == 4:
        return BLOCK_M, BLOCK_N, max(16, BLOCK_K // 2), NUM_STAGES
    return max(16, BLOCK_M // 2), max(16, BLOCK_N // 2), max(16, BLOCK_K // 2), 2


def _n_splits(n_rows: int, n_cols: int, tiles: tuple[int, int, int, int], device: torch.device) -> int:
    """Column splits of the forward grid: about four programs per SM, at most one split per column tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    m_blocks = triton.cdiv(n_rows, tiles[0])
    return max(1, min(triton.cdiv(4 * sms, m_blocks), triton.cdiv(n_cols, tiles[1])))


def _common_constexprs(hidden: Tensor, bias: Tensor | None, options: LossOptions) -> dict:
    block_m, block_n, block_k, stages = _tiles(hidden.dtype)
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=options.softcap is not None,
        ACC=triton_dtype(accumulation_dtype(hidden.dtype)),
        DOT_FP32=bf16_dot_in_fp32(_lse_forward_kernel, hidden.dtype),
        PRECISION=dot_precision(hidden.dtype),
        BM=block_m,
        BN=block_n,
        BK=block_k,
        num_warps=NUM_WARPS,
        num_stages=stages,
    )


def fused_statistics(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, options: LossOptions
) -> RowStatistics:
    """Whole-vocabulary statistics of the rows of ``hidden @ weight.T + bias`` without storing any logits.

    Args:
        hidden: ``(N, D)`` contiguous; weight: ``(V, D)`` contiguous; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 in ``[0, V)``.

    Returns:
        :class:`~tokenloss.ops.rowwise.RowStatistics` of ``(N,)`` tensors in the accumulation dtype.
    """
    n_rows, dim = hidden.shape
    n_cols = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    tiles = _tiles(hidden.dtype)
    n_splits = _n_splits(n_rows, n_cols, tiles, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_splits), tiles[1]) * tiles[1]
    n_splits = triton.cdiv(n_cols, cols_per_split)
    smoothing = options.label_smoothing > 0
    lse_part = torch.empty(n_splits, n_rows, dtype=acc, device=hidden.device)  # (S, N)
    target_part = torch.empty_like(lse_part)
    sum_part = torch.empty_like(lse_part) if smoothing else lse_part
    if n_rows > 0:
        grid = (triton.cdiv(n_rows, tiles[0]), n_splits)
        with on_device_of(hidden):
            _lse_forward_kernel[grid](
                hidden,
                weight,
                hidden if bias is None else bias,
                targets,
                lse_part,
                target_part,
                sum_part,
                n_rows,
                n_cols,
                dim,
                hidden.stride(0),
                weight.stride(0),
                cols_per_split,
                1.0 if options.softcap is None else float(options.softcap),
                LABEL_SMOOTHING=smoothing,
                **_common_constexprs(hidden, bias, options),
            )
    return RowStatistics.from_lse(
        torch.logsumexp(lse_part, dim=0), target_part.sum(dim=0), sum_part.sum(dim=0) if smoothing else None, n_cols
    )


def fused_gradients(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    alpha: Tensor,
    beta: Tensor,
    delta: Tensor,
    options: LossOptions,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_hidden, grad_weight, grad_bias)`` in the accumulation dtype (None where not in ``needs``).

    ``alpha, beta, delta`` are the ``(N,)`` scaled coefficients, ``lse`` the saved log-sum-exp.
    """
    n_rows, dim = hidden.shape
    n_cols = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    grad_h = torch.zeros(n_rows, dim, dtype=acc, device=hidden.device) if needs[0] else None
    grad_w = torch.zeros(n_cols, dim, dtype=acc, device=hidden.device) if needs[1] else None
    grad_b = torch.zeros(n_cols, dtype=acc, device=hidden.device) if needs[2] and bias is not None else None
    if n_rows > 0 and any(g is not None for g in (grad_h, grad_w, grad_b)):
        dummy = lse
        tiles = _tiles(hidden.dtype)
        grid = (triton.cdiv(n_rows, tiles[0]) * triton.cdiv(n_cols, tiles[1]),)
        with on_device_of(hidden):
            _backward_kernel[grid](
                hidden,
                weight,
                hidden if bias is None else bias,
                targets,
                lse,
                alpha,
                beta,
                delta,
                dummy if grad_h is None else grad_h,
                dummy if grad_w is None else grad_w,
                dummy if grad_b is None else grad_b,
                n_rows,
                n_cols,
                dim,
                hidden.stride(0),
                weight.stride(0),
                1.0 if options.softcap is None else float(options.softcap),
                GRAD_H=grad_h is not None,
                GRAD_W=grad_w is not None,
                GRAD_B=grad_b is not None,
                GROUP=GROUP_M,
                **_common_constexprs(hidden, bias, options),
            )
    return grad_h, grad_w, grad_b


class TritonLinearCrossEntropyFunction(torch.autograd.Function):
    """``(N, D)`` hidden, ``(V, D)`` weight, ``(V,)`` bias -> the reduced loss (or ``(N,)`` rows for ``"none"``)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (N, D) contiguous
        weight: Tensor,  # (V, D) contiguous
        bias: Tensor | None,  # (V,) or None
        targets: Tensor,  # (N,) int64, 0 where the row does not count
        weights: Tensor,  # (N,) float32, 0 where the row does not count
        counted: Tensor,  # (N,) bool
        denominator: Tensor,  # () float32, for "mean"
        options: LossOptions,
        strategy: str,
        needs: tuple[bool, bool, bool],  # grad of hidden, weight, bias wanted
    ) -> Tensor:
        stats = fused_statistics(hidden, weight, bias, targets, options)
        acc = stats.lse.dtype
        weights = weights.to(acc)
        loss, alpha, beta, delta = loss_and_coefficients(stats, weights, weight.shape[0], options)
        if options.check_inputs:
            check_finite_rows(stats.lse, counted, "logits (hidden @ weight.T + bias)", loss)
        ctx.options, ctx.early, ctx.in_forward = options, None, False
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        reduced = options.reduction != "none"
        if reduced and strategy == "in_forward" and any(needs):
            row_scale = weights / denominator.to(acc) if options.reduction == "mean" else weights
            scaled = scale_coefficients(alpha, beta, delta, row_scale)
            ctx.early = fused_gradients(hidden, weight, bias, targets, stats.lse, *scaled, options, needs)
            ctx.in_forward = True
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, weights, denominator, stats.lse, alpha, beta, delta)
        if not reduced:
            return loss
        total = loss.sum()
        return total / denominator.to(acc) if options.reduction == "mean" else total

    @staticmethod
    @eager_under_compile
    @backward_without_autocast
    def backward(ctx, grad_output: Tensor):
        refuse_double_backward("linear_cross_entropy")
        if ctx.in_forward:
            if ctx.early is None:
                raise RuntimeError(
                    "strategy='in_forward' hands out the gradients computed in the forward pass once: a second "
                    "backward through the same graph is not supported; use the default strategy='recompute'"
                )
            grads, ctx.early = ctx.early, None
            scale = grad_output.reshape(())
            grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        else:
            hidden, weight, bias, targets, weights, denominator, lse, alpha, beta, delta = ctx.saved_tensors
            upstream = grad_output.to(weights.dtype)
            if ctx.options.reduction == "mean":
                upstream = upstream / denominator.to(weights.dtype)
            alpha, beta, delta = scale_coefficients(alpha, beta, delta, upstream * weights)
            needs = tuple(ctx.needs_input_grad[:3])
            grads = fused_gradients(hidden, weight, bias, targets, lse, alpha, beta, delta, ctx.options, needs)
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


def linear_cross_entropy_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prepared: PreparedTargets,
    options: LossOptions,
    *,
    strategy: str = "recompute",
) -> Tensor:
    """The loss of ``hidden @ weight.T + bias`` by the Triton kernels, without any ``(N, V)`` logits.

    Same arguments and result as :func:`tokenloss.ops.linear_cross_entropy.linear_cross_entropy_loss`.

    Args:
        hidden: ``(N, D)`` float32, bfloat16, float16 or float64.
        weight: ``(V, D)`` same dtype and device.
        bias: ``(V,)`` same dtype and device, or None.
        prepared: targets from :func:`tokenloss.options.prepare_targets` for the N rows.
        options: loss options; ``options.reduction`` chooses the output (``options.chunk_size`` is
            unused: the kernels work in tiles).
        strategy: ``"recompute"`` (default: the backward pass recomputes the logits tiles) or
            ``"in_forward"`` (gradients computed in the forward pass; ``"mean"``/``"sum"`` only,
            ``"none"`` always recomputes). For benchmarks: see the module docstring.

    Returns:
        ``"mean"``/``"sum"``: a 0-dim float32 tensor (float64 for float64 inputs), divided by
        ``prepared.denominator`` for ``"mean"``. ``"none"``: ``(N,)`` per-row losses, 0 where a
        row does not count.

    Raises:
        ValueError: tensors not on one CUDA device (or CPU with interpreted kernels), an unknown
            ``strategy``, NaN/inf logits in a counted row (``check_inputs``).
        TypeError: ``weight`` or ``bias`` of another dtype than ``hidden``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_device(_lse_forward_kernel, hidden, weight, bias, prepared.targets)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {tensor.dtype}")
    needs = gradients_needed(hidden, weight, bias)
    return TritonLinearCrossEntropyFunction.apply(
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        prepared.targets,
        prepared.weights,
        prepared.counted,
        prepared.denominator,
        options,
        strategy,
        needs,
    )
