"""Cross-entropy against a distribution: ``H(q, p) = -sum_j q_j log p_j`` for probability targets.

The truth is a distribution ``q`` per row (soft labels, a teacher's probabilities) instead of one
class. With ``z`` the (capped) logits, ``m`` the row maximum and ``S = sum_j exp(z_j - m)``::

    loss = sum_j q_j (logsumexp(z) - z_j) = log S * sum(q) - sum_j q_j (z_j - m)
    dloss/dz = sum(q) * softmax(z) - q

(relative to the row maximum, as in :mod:`tokenloss.ops.rowwise`). Label smoothing replaces ``q``
by ``(1 - eps) q + eps / V`` and z-loss adds ``z_loss * logsumexp(z) ** 2``, exactly as PyTorch's
``F.cross_entropy`` with probability targets does for the former. The forward pass keeps ``(N,)``
numbers; the backward pass recomputes the softmax chunk by chunk and reads ``q`` again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.cross_entropy import plain_chunk_rows
from tokenloss.ops.rowwise import accumulation_dtype, capped, check_finite_rows, finite_shift, refuse_double_backward
from tokenloss.options import LossOptions


def _smoothed(probs: Tensor, eps: float, class_weight: Tensor | None) -> Tensor:
    """``w * ((1 - eps) q + eps / V)`` in the accumulation dtype (``q`` itself, converted, when ``eps`` is 0
    and there are no class weights ``w``)."""
    q = probs.to(accumulation_dtype(probs.dtype))
    if eps != 0:
        q = q.mul(1 - eps).add_(eps / probs.shape[-1])
    if class_weight is not None:
        q = q * class_weight.to(q.dtype)
    return q


class SoftCrossEntropyFunction(torch.autograd.Function):
    """``(N, V)`` logits and ``(N, V)`` target probabilities -> ``(N,)`` weighted per-row losses."""

    @staticmethod
    def forward(ctx, logits, probs, weights, counted, options: LossOptions, chunk_rows: int, class_weight):
        acc = accumulation_dtype(logits.dtype)
        n_rows = logits.shape[0]
        shift, log_sum, loss = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in range(3))
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = capped(logits[rows], options.softcap)  # (n, V) accumulation dtype
            m = finite_shift(z.amax(dim=-1))
            x = z - m.unsqueeze(1)
            q = _smoothed(probs[rows], options.label_smoothing, class_weight)  # (n, V)
            ls = torch.exp(x).sum(dim=-1).log()
            # sum_j q_j x_j, with 0 * (-inf) taken as 0 (a class of probability 0 at a -inf logit)
            qx = torch.where(q != 0, q * x, torch.zeros_like(x)).sum(dim=-1)
            shift[rows], log_sum[rows], loss[rows] = m, ls, ls * q.sum(dim=-1) - qx
        lse = shift + log_sum
        if options.z_loss > 0:
            loss = loss + options.z_loss * lse.square()
        weights = weights.to(acc)
        loss = torch.where(weights != 0, loss * weights, torch.zeros_like(loss))
        zero_skipped = check_finite_rows(lse, counted, "logits", loss) if options.check_inputs else False
        ctx.save_for_backward(logits, probs, weights, shift, log_sum)
        ctx.options, ctx.chunk_rows, ctx.zero_skipped = options, chunk_rows, zero_skipped
        ctx.class_weight = class_weight
        return loss

    @staticmethod
    @eager_under_compile
    def backward(ctx, grad_loss):
        refuse_double_backward("cross_entropy (probability targets)")
        logits, probs, weights, shift, log_sum = ctx.saved_tensors
        options = ctx.options
        scale = grad_loss.to(weights.dtype) * weights  # (N,)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            z = capped(logits[rows], options.softcap)
            q = _smoothed(probs[rows], options.label_smoothing, ctx.class_weight)
            p = torch.exp(z - (shift[rows] + log_sum[rows]).unsqueeze(1))  # softmax
            alpha = q.sum(dim=-1)
            if options.z_loss > 0:
                alpha = alpha + 2 * options.z_loss * (shift[rows] + log_sum[rows])
            g = p.mul_(alpha.unsqueeze(1)).sub_(q).mul_(scale[rows].unsqueeze(1))  # (n, V)
            if options.softcap is not None:
                g.mul_(1 - torch.tanh(logits[rows].to(g.dtype) / options.softcap).square())
            if ctx.zero_skipped:
                g.masked_fill_((scale[rows] == 0).unsqueeze(1), 0)
            grad[rows] = g
        return grad, None, None, None, None, None, None


def check_probability_targets(probs: Tensor, counted: Tensor, *, tolerance: float = 1e-3) -> None:
    """ValueError unless every counted row of ``probs`` ``(N, V)`` is non-negative and sums to 1 within
    ``tolerance`` (one host sync on CUDA). For bf16/fp16 targets the tolerance is at least the
    dtype's epsilon: rounding each probability can move a row's sum by up to half of it."""
    if probs.numel() == 0:
        return
    tolerance = max(tolerance, torch.finfo(probs.dtype).eps)
    rows = probs[counted] if not bool(counted.all()) else probs
    if rows.numel() == 0:
        return
    if not bool(torch.isfinite(rows).all()) or bool((rows < 0).any()):
        raise ValueError("target_probs must be finite and >= 0 in every counted row (a distribution over V)")
    sums = rows.double().sum(dim=-1)
    worst = float((sums - 1).abs().max())
    if worst > tolerance:
        raise ValueError(
            f"target_probs rows must sum to 1 (within {tolerance}); a counted row is off by {worst:.3g}. "
            "Normalise them (softmax or q / q.sum(-1)), or pass check_inputs=False to skip this check"
        )


def soft_cross_entropy_rows(
    logits: Tensor,
    probs: Tensor,
    weights: Tensor,
    counted: Tensor,
    options: LossOptions,
    *,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Per-row weighted losses ``(N,)`` of ``(N, V)`` logits against ``(N, V)`` target probabilities
    (``class_weight`` ``(V,)``: the loss is ``-sum_j w_j q_j log p_j``, as PyTorch's ``weight``)."""
    if options.check_inputs:
        check_probability_targets(probs, counted)
    chunk_rows = plain_chunk_rows(logits.shape[-1], options.chunk_size)
    return SoftCrossEntropyFunction.apply(logits, probs, weights, counted, options, chunk_rows, class_weight)
