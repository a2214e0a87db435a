"""Plain cross-entropy from logits in PyTorch: one read of the logits forward, one write of the gradient backward.

``F.cross_entropy`` keeps its ``(N, V)`` log-softmax alive for the backward pass and builds a dense
``(N, V)`` gradient of the NLL before turning it into the gradient of the logits. Here the forward
pass keeps only ``(N,)`` statistics (the log-sum-exp and three gradient coefficients); the backward
pass recomputes the softmax chunk by chunk from the logits autograd holds anyway and writes
``alpha * softmax - beta * onehot - delta`` straight into the gradient, or, when the caller opts in
with ``inplace_backward=True``, into the logits' own storage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.rowwise import (
    accumulation_dtype,
    check_finite_rows,
    chunk_gradient,
    chunk_statistics,
    chunked_statistics,
    loss_and_coefficients,
    refuse_double_backward,
    scale_coefficients,
)
from tokenloss.options import ClassWeights, LossOptions
from tokenloss.side_outputs import SideRows

# A chunk of 2**23 elements (32 MiB of float32, about the last-level cache of a server CPU). Each
# chunk costs about five passes, each a parallel region of the intra-op thread pool; on a busy CPU
# every region waits for its slowest thread, so fewer, larger chunks were faster on the shared
# 2-core benchmark machine (2**21 was 1.9x slower than 2**23 at (2048, 32000) with 2 threads, though
# 12% faster with 1 thread; 2**24 slower in both). One scratch chunk is allocated per call and reused, so
# the chunk size is also the forward pass's extra memory. See benchmarks/bench_cross_entropy.py.
CHUNK_ELEMENTS = 1 << 23


def plain_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk of the plain loss: ``chunk_size`` (checked by :class:`LossOptions`) if given,
    else about :data:`CHUNK_ELEMENTS` elements. At least 1."""
    if chunk_size is not None:
        return chunk_size
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd Function: ``(N, V)`` logits -> ``(N,)`` weighted per-row losses (float32)."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,  # (N, V) float32 / bf16 / fp16 / fp64
        targets: Tensor,  # (N,) int64, 0 where the row does not count
        weights: Tensor,  # (N,) float32, 0 where the row does not count
        counted: Tensor,  # (N,) bool
        options: LossOptions,
        inplace_backward: bool,
        chunk_rows: int,
        class_weights: ClassWeights | None,
        side: SideRows | None,
    ) -> Tensor:
        n_rows, vocab_size = logits.shape
        class_weight = None if class_weights is None else class_weights.weight
        acc = accumulation_dtype(logits.dtype)
        weights = weights.to(acc)
        buffer = logits.new_empty(min(chunk_rows, n_rows), vocab_size, dtype=acc)  # (n, V) scratch, reused
        predicted = None
        if side is not None and side.argmax:
            predicted = side.predicted = torch.empty(n_rows, dtype=torch.long, device=logits.device)
        stats = chunked_statistics(
            n_rows,
            chunk_rows,
            options,
            acc,
            logits.device,
            lambda rows: chunk_statistics(
                logits[rows],
                targets[rows],
                options,
                buffer=buffer,
                class_weight=class_weight,
                argmax_out=None if predicted is None else predicted[rows],
            ),
        )
        if side is not None:
            side.lse = stats.lse
        # Ignored rows may hold NaN/inf (padding); their gradient rows are then zeroed explicitly.
        # Without the check (check_inputs=False) that is not guaranteed.
        loss, alpha, beta, delta = loss_and_coefficients(
            stats, weights, vocab_size, options, class_weights=class_weights
        )
        zero_skipped_rows = check_finite_rows(stats.lse, counted, "logits", loss) if options.check_inputs else False
        ctx.save_for_backward(logits, targets, weights, stats.shift, stats.log_sum, alpha, beta, delta)
        ctx.options, ctx.inplace_backward, ctx.chunk_rows = options, inplace_backward, chunk_rows
        ctx.zero_skipped_rows, ctx.class_weight = zero_skipped_rows, class_weight
        return loss

    @staticmethod
    @eager_under_compile
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("cross_entropy")
        logits, targets, weights, shift, log_sum, alpha, beta, delta = ctx.saved_tensors
        row_scale = grad_loss.to(weights.dtype) * weights
        alpha, beta, delta = scale_coefficients(alpha, beta, delta, row_scale)
        skipped = (row_scale == 0).unsqueeze(1) if ctx.zero_skipped_rows else None  # (N, 1) bool
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        acc = accumulation_dtype(logits.dtype)
        buffer = None  # (n, V) scratch, only needed when the gradient's dtype is not the accumulation dtype
        if logits.dtype != acc:
            buffer = logits.new_empty(min(ctx.chunk_rows, logits.shape[0]), logits.shape[1], dtype=acc)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            chunk_gradient(
                logits[rows],
                targets[rows],
                shift[rows],
                log_sum[rows],
                alpha[rows],
                beta[rows],
                delta[rows],
                ctx.options,
                out=grad[rows],  # float32/float64: written in place, no (n, V) temporary, no copy
                buffer=buffer,
                class_weight=ctx.class_weight,
            )
            if skipped is not None:
                grad[rows].masked_fill_(skipped[rows], 0)
        return grad, None, None, None, None, None, None, None, None


def cross_entropy_rows(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    counted: Tensor,
    options: LossOptions,
    *,
    inplace_backward: bool = False,
    class_weights: ClassWeights | None = None,
    side: SideRows | None = None,
) -> Tensor:
    """Per-row weighted losses ``(N,)`` float32 of ``(N, V)`` logits (see :mod:`tokenloss.ops.rowwise`).

    ``options.chunk_size`` rows per chunk (None: :func:`plain_chunk_rows`); ``class_weights``: per-class
    weights (PyTorch's ``weight``); ``side``: filled with every row's log-sum-exp (and argmax) when given.
    """
    chunk_rows = plain_chunk_rows(logits.shape[-1], options.chunk_size)
    return CrossEntropyFunction.apply(
        logits, targets, weights, counted, options, inplace_backward, chunk_rows, class_weights, side
    )
