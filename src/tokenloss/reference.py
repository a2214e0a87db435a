"""The cross-entropy loss of next-token prediction, written out plainly: the formulas a learner reads.

This is the specification every fast path in tokenloss is tested against. It builds the full
``(N, V)`` log-probabilities and lets autograd find the gradient, so it is simple and slow.

For one position with logits ``x`` (shape ``(V,)``) and target ``t``:

    z      = softcap * tanh(x / softcap)             (only when softcap is set; Gemma 2)
    log_p  = z - logsumexp(z)                        (log-softmax, computed stably)
    nll    = -log_p[t]                               (the cross-entropy)
    ce     = (1 - eps) * nll + eps * mean_j(-log_p[j])   (label smoothing, as PyTorch defines it)
             (with per-class weights w: (1 - eps) * w[t] * nll + eps * mean_j(-w[j] * log_p[j]))
    focal  = (1 - p[t]) ** gamma                     (focal loss; 1 when gamma = 0)
    loss   = weight * (focal * ce + z_loss * logsumexp(z) ** 2)

and the batch loss is the sum over positions that count, divided by their number (``"mean"``;
with per-class weights, by the sum of ``w[t]`` over them, as PyTorch divides), or by ``num_items``
when it is given. A position counts when its target is not ``ignore_index``
and its mask (if any) is True.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloss.options import LossOptions, takes_loss_options


@takes_loss_options
def reference_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | Tensor | None = None,
    weight: Tensor | None = None,
    options: LossOptions,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Cross-entropy computed straight from the formulas, in ``dtype`` (float64 by default).

    Args:
        logits: ``(..., V)`` floating tensor.
        targets: ``(...)`` integer tensor, same leading shape as ``logits``.
        mask, token_weights, num_items, weight: as in :func:`tokenloss.cross_entropy` (class-index targets).
        dtype: the dtype of the computation and of the result.
        **options: the loss options listed below (``check_inputs`` and ``chunk_size`` are ignored).

    Returns:
        A scalar for ``"mean"`` and ``"sum"``; per-position losses shaped like ``targets`` (after
        the shift) for ``"none"``, 0 where a position does not count. The result is in ``dtype``.
    """
    ignore_index, reduction, softcap = options.ignore_index, options.reduction, options.softcap
    label_smoothing, focal_gamma, z_loss = options.label_smoothing, options.focal_gamma, options.z_loss
    steps = options.shift_steps
    if steps:  # the input at t predicts the target at t + steps
        kept = max(logits.shape[-2] - steps, 0)
        logits = logits[..., :kept, :]
        targets = targets[..., steps:]
        mask = None if mask is None else mask[..., steps:]
        token_weights = None if token_weights is None else token_weights[..., steps:]

    x = logits.to(dtype)
    vocab_size = x.shape[-1]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)

    counts = targets != ignore_index
    if mask is not None:
        counts = counts & mask
    safe_targets = torch.where(counts, targets, torch.zeros_like(targets))

    log_p = torch.log_softmax(x, dim=-1)
    log_p_target = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    class_weight = torch.ones(vocab_size, dtype=dtype) if weight is None else weight.to(dtype)
    nll = -log_p_target
    ce = nll if weight is None else class_weight[safe_targets] * nll
    if label_smoothing:  # (skipped at 0: 0 * inf would turn a -inf logit into a NaN)
        ce = (1 - label_smoothing) * ce + label_smoothing * (-(log_p * class_weight).sum(-1) / vocab_size)
    if focal_gamma:
        ce = (1 - log_p_target.exp()) ** focal_gamma * ce
    loss = ce + z_loss * torch.logsumexp(x, dim=-1) ** 2
    if token_weights is not None:
        loss = loss * token_weights.to(dtype)
    loss = torch.where(counts, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if num_items is None and weight is not None:
        denominator = torch.where(counts, class_weight[safe_targets], 0.0).sum()
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    elif num_items is None:
        denominator = counts.sum().clamp(min=1)
    else:  # exactly num_items; 0 only when nothing counts anywhere, where the sum is 0
        denominator = torch.as_tensor(num_items, dtype=dtype)
        denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return loss.sum() / denominator.to(dtype)
