"""The public loss functions: check the arguments, flatten to rows, run an implementation, reduce."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from tokenloss.ops import resolve_impl
from tokenloss.ops.autocast import autocast_inputs, autocast_off
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.options import (
    LossOptions,
    check_class_weight,
    check_linear_inputs,
    check_logits,
    prepare_targets,
    takes_loss_options,
)
from tokenloss.side_outputs import CrossEntropyOutput, SideRows, side_outputs


def _rows_module(
    impl: str, device: torch.device, *, class_weights: bool = False, name: str = "weight", side_outputs: bool = False
):
    if class_weights:  # the Triton kernels subtract a constant for label smoothing, not a vector
        if impl == "triton":
            raise ValueError(f"{name} (per-class weights) runs on the torch implementation: use impl='auto' or 'torch'")
        impl = "torch"
    if side_outputs:  # the Triton kernels record neither the argmax nor the rows' log-sum-exp
        if impl == "triton":
            raise ValueError(
                "return_z_loss/return_token_accuracy/return_lse run on the torch implementation: use impl='auto' or "
                "'torch'"
            )
        impl = "torch"
    name = resolve_impl(impl, device)
    return importlib.import_module("tokenloss.ops.triton" if name == "triton" else "tokenloss.ops")


@eager_under_compile
@takes_loss_options
def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    weight: Tensor | None = None,
    options: LossOptions,
    impl: str = "auto",
    inplace_backward: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_lse: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Cross-entropy of next-token prediction from logits, exact against ``F.cross_entropy``.

    Per counted position with (soft-capped) logits ``z`` and target ``t``::

        loss = weight * ((1 - p_t) ** focal_gamma * ce + z_loss * logsumexp(z) ** 2)
        ce   = (1 - label_smoothing) * (-log p_t) + label_smoothing * mean_j(-log p_j)

    (:mod:`tokenloss.reference` writes the formulas out.) Computed in float32 whatever the
    input dtype; the gradient ``alpha * softmax - beta * onehot - delta`` is written chunk by
    chunk in the backward pass, without keeping an ``(N, V)`` tensor from the forward pass.

    Args:
        logits: ``(..., V)`` float32, bfloat16, float16 or float64.
        targets: ``(...)`` integer class indices, the leading shape of ``logits``; or, as in
            PyTorch, a floating tensor shaped like ``logits`` holding a distribution over V per
            position (probability targets: soft labels, a teacher's probabilities). The loss is
            then ``-sum_j q_j log p_j`` (with label smoothing, of ``(1 - eps) q + eps / V``);
            ``focal_gamma``, ``ignore_index`` and ``inplace_backward`` do not apply, and each counted
            row must be non-negative and sum to 1 within 1e-3 (``check_inputs``).
        mask: optional bool tensor shaped like ``targets``; only positions where it is True
            count (an SFT completion mask). A position counts when its target is not
            ``ignore_index`` and its mask is True.
        token_weights: optional float tensor shaped like ``targets``; multiplies each counted
            position's loss (the mean still divides by the number of counted positions).
        num_items: for ``"mean"``, divide the sum by this instead of the local count: the global
            number of counted tokens across gradient-accumulation steps or ranks
            (:func:`tokenloss.distributed.global_num_items`).
        weight: optional ``(V,)`` per-class weights, finite and >= 0, exactly as PyTorch's ``weight``:
            a position's cross-entropy term is ``(1 - eps) * w_t * (-log p_t) + eps / V * sum_j w_j (-log p_j)``
            and ``"mean"`` divides by the summed ``w_t`` of the counted targets (unless ``num_items``);
            for probability targets the loss is ``-sum_j w_j q_j log p_j`` and the mean divides by the
            number of counted positions. It multiplies neither the z-loss term nor the focal factor.
            Runs on the torch implementation.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`tokenloss.ops`).
        inplace_backward: write the gradient into ``logits``' storage in the backward pass
            (saves one ``(N, V)`` tensor; ``logits`` is overwritten, so use it only when nothing
            else reads them after the loss).
        return_z_loss, return_token_accuracy, return_lse: also return the z-loss term alone, the
            token accuracy and the per-position log-sum-exp, from the same pass over the logits
            (:class:`~tokenloss.side_outputs.CrossEntropyOutput`; class-index targets, torch path).
        **options: the loss options listed below (``shift``, ``reduction``, ``label_smoothing``, ...).

    Returns:
        A scalar for ``"mean"``/``"sum"``; a tensor shaped like ``targets`` (after the shift) for
        ``"none"``. float32, or float64 for float64 logits. A batch where nothing counts gives exactly 0.0 and zero
        gradients. With any ``return_*`` flag, a :class:`~tokenloss.side_outputs.CrossEntropyOutput`
        ``(loss, z_loss, token_accuracy, lse)`` with None for what was not asked for.

    Raises:
        TypeError: ``logits`` not floating, ``targets`` neither integer nor floating, ``mask`` not bool.
        ValueError: shapes that do not match, a target outside ``[0, V)`` that is not
            ``ignore_index``, an unknown ``reduction``, a negative ``label_smoothing``,
            ``z_loss``, ``focal_gamma`` or ``softcap``, NaN/inf logits in a counted row.

    Examples:
        >>> import torch, tokenloss as tl
        >>> logits = torch.zeros(2, 5)          # a uniform guess over V = 5 words
        >>> round(tl.cross_entropy(logits, torch.tensor([1, 3])).item(), 3)  # log 5
        1.609
    """
    check_logits(logits)
    side = _side_rows(return_z_loss, return_token_accuracy, return_lse)
    if isinstance(targets, Tensor) and targets.dtype.is_floating_point:
        if side is not None:
            raise ValueError("return_z_loss/return_token_accuracy/return_lse need class-index targets")
        return _probability_cross_entropy(
            logits, targets, mask, token_weights, num_items, weight, options, impl, inplace_backward
        )
    if inplace_backward and torch._debug_has_internal_overlap(logits) != 0:
        raise ValueError(
            "inplace_backward=True writes the gradient into the logits' storage, so the logits must own "
            "their memory: these overlap (expanded or strided views); pass logits.contiguous() or "
            "inplace_backward=False"
        )
    vocab_size = logits.shape[-1]
    prepared = prepare_targets(
        tuple(logits.shape[:-1]),
        targets,
        vocab_size,
        options,
        mask=mask,
        token_weights=token_weights,
        num_items=num_items,
        class_weight=weight,
        device=logits.device,
    )
    module = _rows_module(impl, logits.device, class_weights=weight is not None, side_outputs=side is not None)
    extra = {} if weight is None else {"class_weights": prepared.class_weights}
    if side is not None:
        extra["side"] = side
    rows = module.cross_entropy_rows(
        logits.reshape(-1, vocab_size),
        prepared.targets,
        prepared.weights,
        prepared.counted,
        options,
        inplace_backward=inplace_backward,
        **extra,
    )
    loss = prepared.reduce(rows, options.reduction)
    return loss if side is None else side_outputs(loss, side, prepared, options)


@eager_under_compile
@takes_loss_options
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    class_weight: Tensor | None = None,
    options: LossOptions,
    impl: str = "auto",
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_lse: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T + bias`` without ever holding the ``(N, V)`` logits.

    Equal to ``cross_entropy(hidden @ weight.T + bias, targets, ...)`` in value and gradients
    (within float32 rounding), but the logits exist only one chunk of rows at a time, so the extra
    memory is about ``chunk x V`` floats whatever N is (:mod:`tokenloss.ops.linear_cross_entropy`).
    Rows that do not count are dropped before the matrix products. With ``"mean"``/``"sum"`` the
    gradients are computed during the forward pass (so one backward per forward; evaluate under
    ``torch.no_grad()``, where only the logits product runs); ``"none"`` recomputes the logits in
    the backward pass.

    Args:
        hidden: ``(..., D)`` float32, bfloat16, float16 or float64: the last hidden states.
        weight: ``(V, D)`` the LM head (``nn.Linear(D, V).weight``); same dtype and device.
        targets: ``(...)`` integer class indices, the leading shape of ``hidden``.
        bias: optional ``(V,)``; same dtype and device.
        mask, token_weights, num_items: as in :func:`cross_entropy`; ``shift`` shifts along
            ``hidden``'s second-to-last dimension and ``targets``' last.
        class_weight: optional ``(V,)`` per-class weights: :func:`cross_entropy`'s ``weight`` (here
            ``weight`` is the LM head).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`tokenloss.ops`).
        return_z_loss, return_token_accuracy, return_lse: as in :func:`cross_entropy`, from the same
            chunks of logits (torch path).
        **options: the loss options listed below; ``chunk_size=None`` picks the rows per chunk from
            N, V and the free memory (:func:`tokenloss.ops.linear_cross_entropy.fused_chunk_rows`).

    Under ``torch.autocast`` the product runs in the autocast dtype, as an ``nn.Linear`` head's would
    (:mod:`tokenloss.ops.autocast`).

    Returns:
        A float32 scalar for ``"mean"``/``"sum"`` (float64 for float64 inputs); for ``"none"`` the
        per-position losses shaped like ``targets`` (after the shift), 0.0 where nothing counts.
        With any ``return_*`` flag, a :class:`~tokenloss.side_outputs.CrossEntropyOutput`.

    Raises:
        TypeError: a non-floating ``hidden``/``weight``/``bias`` or dtypes that differ; targets,
            mask, token_weights of the wrong kind.
        ValueError: shapes that do not match (``weight`` must be ``(V, D)``), tensors on different
            devices, a bad option, a target out of ``[0, V)``, non-finite logits in a counted row.

    Examples:
        >>> import torch, tokenloss as tl
        >>> hidden, weight = torch.zeros(2, 3), torch.zeros(5, 3)   # uniform logits over V = 5
        >>> round(tl.linear_cross_entropy(hidden, weight, torch.tensor([1, 3])).item(), 3)
        1.609
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)  # as nn.Linear under torch.autocast
    check_linear_inputs(hidden, weight, bias)
    prepared = prepare_targets(
        tuple(hidden.shape[:-1]),
        targets,
        weight.shape[0],
        options,
        mask=mask,
        token_weights=token_weights,
        num_items=num_items,
        class_weight=class_weight,
        class_weight_name="class_weight",
        input_name="hidden",
        device=hidden.device,
    )
    side = _side_rows(return_z_loss, return_token_accuracy, return_lse)
    module = _rows_module(
        impl, hidden.device, class_weights=class_weight is not None, name="class_weight", side_outputs=side is not None
    )
    extra = {} if side is None else {"side": side}
    with autocast_off(hidden.device):
        loss = module.linear_cross_entropy_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, prepared, options, **extra
        )
    loss = prepared.reduce(loss, "none") if options.reduction == "none" else loss
    return loss if side is None else side_outputs(loss, side, prepared, options)


def _side_rows(return_z_loss: bool, return_token_accuracy: bool, return_lse: bool) -> SideRows | None:
    """What the forward pass must record for the side outputs asked for; None when none is."""
    for name, value in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
                        ("return_lse", return_lse)):  # fmt: skip
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if not (return_z_loss or return_token_accuracy or return_lse):
        return None
    return SideRows(z_loss=return_z_loss, token_accuracy=return_token_accuracy, lse_out=return_lse)


def _probability_cross_entropy(
    logits: Tensor,
    target_probs: Tensor,
    mask: Tensor | None,
    token_weights: Tensor | None,
    num_items: int | float | Tensor | None,
    weight: Tensor | None,
    options: LossOptions,
    impl: str,
    inplace_backward: bool,
) -> Tensor:
    """:func:`cross_entropy` with probability targets (see its ``targets``), on the torch path."""
    from tokenloss.ops.soft_cross_entropy import soft_cross_entropy_rows

    if tuple(target_probs.shape) != tuple(logits.shape):
        raise ValueError(
            f"probability targets must have the shape of logits {tuple(logits.shape)}, got {tuple(target_probs.shape)} "
            "(for class indices, pass an integer tensor)"
        )
    if target_probs.device != logits.device:
        raise ValueError(f"targets must be on the device of logits ({logits.device}), got {target_probs.device}")
    if options.focal_gamma > 0:
        raise ValueError("focal_gamma needs class-index targets (p_target is not defined for a distribution)")
    if options.ignore_index != -100:
        raise ValueError("ignore_index does not apply to probability targets (as in PyTorch): use mask=")
    if inplace_backward:
        raise ValueError("inplace_backward=True is for class-index targets only")
    if impl == "triton":
        raise ValueError("probability targets run on the torch path only: use impl='auto' or 'torch'")
    leading = tuple(logits.shape[:-1])
    placeholder = torch.zeros(leading, dtype=torch.long, device=logits.device)  # every position a "target"
    prepared = prepare_targets(
        leading,
        placeholder,
        None,
        options,
        mask=mask,
        token_weights=token_weights,
        num_items=num_items,
        device=logits.device,
    )
    vocab_size = logits.shape[-1]
    probs = target_probs
    steps = options.shift_steps
    if steps:  # the distribution of position t + steps, as the targets move in prepare_targets
        length = probs.shape[-2]
        kept = max(length - steps, 0)
        pad = torch.zeros_like(probs[..., : length - kept, :])
        probs = torch.cat([probs[..., length - kept :, :], pad], dim=-2)
    if weight is not None:
        weight = check_class_weight(weight, vocab_size, logits.device, options.check_inputs)
    rows = soft_cross_entropy_rows(
        logits.reshape(-1, vocab_size),
        probs.reshape(-1, vocab_size),
        prepared.weights,
        prepared.counted,
        options,
        class_weight=weight,
    )
    return prepared.reduce(rows, options.reduction)
