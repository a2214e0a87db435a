"""The per-row math of the loss and its gradient, on chunks of rows, in float32 (float64 for float64 input).

Every torch implementation (plain, fused, vocabulary-parallel) is built from three steps:

1. :func:`chunk_statistics` reads a chunk of logits ``(n, V)`` once and returns per-row
   statistics: the row maximum ``m``, ``log sum_j exp(z_j - m)``, the target's (capped) logit
   and, for label smoothing, the sum of the (capped) logits, the last two *relative to* ``m``.
2. :func:`loss_and_coefficients` turns those ``(N,)`` statistics into the per-row loss and three
   per-row coefficients ``alpha, beta, delta`` such that the gradient of the row's loss with
   respect to its (capped) logits ``z`` is

       dloss/dz = alpha * softmax(z) - beta * onehot(target) - delta

   With no options this is ``softmax - onehot`` (alpha = beta = 1, delta = 0). Label smoothing
   adds ``delta = eps / V`` and lowers ``beta``; z-loss adds ``2 * z_loss * lse`` to alpha; focal
   loss scales everything by ``(1 - p_t) ** gamma`` and adds the derivative of that factor.
3. :func:`chunk_gradient` recomputes ``softmax`` for a chunk from the saved statistics and
   writes that gradient (times the soft-capping derivative ``1 - (z / c) ** 2``).

So the ``(N, V)`` probabilities never exist: only one chunk of them at a time.

Why relative to the row maximum: the log-sum-exp of logits near ``1e4`` is itself near ``1e4``,
where a float32 holds it only to about ``5e-4``. ``lse - z_target`` and ``z - lse`` would inherit
that error (the loss off by 1e-5 relative, the softmax by 5e-4 at an offset of 1e4). ``z - m`` is
exact near the maximum (Sterbenz), so ``-log p_t = log_sum - (z_t - m)`` and
``softmax = exp(z - m) / sum`` are as accurate as PyTorch's ``(x - max) - log(sum)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenloss.options import ClassWeights, LossOptions


@dataclass
class RowStatistics:
    """Per-row quantities of a batch of rows, each ``(N,)`` in the accumulation dtype.

    Attributes:
        shift: the row maximum ``m`` of the capped logits (0 where it is not finite, see
            :func:`finite_shift`).
        log_sum: ``log sum_j exp(z_j - m)``; the log-sum-exp is ``m + log_sum``.
        target_logit: the capped logit of the target minus ``m``.
        logit_sum: ``sum_j (z_j - m)`` over the vocabulary (only with label smoothing, else None).
    """

    shift: Tensor
    log_sum: Tensor
    target_logit: Tensor
    logit_sum: Tensor | None

    @property
    def lse(self) -> Tensor:
        """``logsumexp(z)`` ``(N,)``: for z-loss and the finite check, not for differences."""
        return self.shift + self.log_sum

    @classmethod
    def from_lse(cls, lse: Tensor, target_logit: Tensor, logit_sum: Tensor | None, vocab_size: int) -> RowStatistics:
        """Statistics from an absolute log-sum-exp, target logit and logit sum (the Triton kernels'
        form): shifted by the log-sum-exp itself, so they carry its float32 rounding."""
        shift = finite_shift(lse)
        return cls(
            shift,
            lse - shift,
            target_logit - shift,
            None if logit_sum is None else logit_sum - vocab_size * shift,
        )


# On the CPU the elementwise passes over a chunk (maxima, exponentials, sums, the gradient's scaling) run on
# blocks of rows of about this many bytes per (rows, V) float32 tensor, so that a block's few tensors stay in
# the cache from one pass to the next; the products keep the whole chunk (their speed needs the rows). At
# (4096, 512, 32000) the distillation's per-chunk math took 0.52 s in 256-row chunks, 0.34 s in 16-row blocks.
CACHE_BLOCK_BYTES = 2 << 20


def cache_blocks(n_rows: int, vocab_size: int, device: torch.device) -> list[slice]:
    """Row slices covering ``n_rows`` rows of ``vocab_size`` columns for the elementwise math: one slice on an
    accelerator (each op is one kernel launch over the chunk), about :data:`CACHE_BLOCK_BYTES` of float32
    each on the CPU. Never empty (``[slice(0, 0)]`` for no rows)."""
    rows = n_rows if device.type != "cpu" else CACHE_BLOCK_BYTES // (4 * max(vocab_size, 1))
    rows = max(rows, 1)
    return [slice(start, start + rows) for start in range(0, n_rows, rows)] or [slice(0, 0)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (so that gradcheck is exact), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def capped(logits: Tensor, softcap: float | None) -> Tensor:
    """``softcap * tanh(logits / softcap)`` in the accumulation dtype, or the logits in it without a cap."""
    x = logits.to(accumulation_dtype(logits.dtype))
    if softcap is None:
        return x
    return torch.tanh(x / softcap).mul_(softcap)


def chunk_statistics(
    logits: Tensor,
    targets: Tensor,
    options: LossOptions,
    *,
    buffer: Tensor | None = None,
    class_weight: Tensor | None = None,
    argmax_out: Tensor | None = None,
) -> RowStatistics:
    """Statistics of one chunk of rows.

    Args:
        logits: ``(n, V)`` any float dtype; read once.
        targets: ``(n,)`` int64 in ``[0, V)``.
        options: loss options (softcap and label_smoothing are used here).
        buffer: optional ``(n', V)`` scratch tensor in the accumulation dtype with ``n' >= n``.
            A caller that loops over chunks passes the same buffer to every chunk, so that no
            chunk allocates (and, on the CPU, page-faults in) its own ``(n, V)`` temporaries.
        class_weight: optional ``(V,)`` per-class weights; with label smoothing, ``logit_sum`` is
            then the weighted sum ``sum_j w_j (z_j - m)``.
        argmax_out: optional ``(n,)`` int64, receives each row's ``argmax`` (found with the maximum).

    Returns:
        :class:`RowStatistics` with ``(n,)`` tensors in the accumulation dtype.
    """
    scratch = None if buffer is None else buffer[: logits.shape[0]]
    if logits.dtype == accumulation_dtype(logits.dtype) and options.softcap is None:
        z = logits  # no copy: the exponentials go to the scratch space
        work = scratch if scratch is not None else torch.empty_like(z)
    else:
        if scratch is not None:
            z = scratch.copy_(logits)  # (n, V) in the accumulation dtype
            if options.softcap is not None:
                z.div_(options.softcap).tanh_().mul_(options.softcap)  # the same ops as capped()
        else:
            z = capped(logits, options.softcap)  # (n, V) float32: a copy
        work = z  # our own copy: the exponentials may overwrite it once the gathers are done
    shift = finite_shift(row_maximum(z, argmax_out))
    target_logit = z.gather(1, targets.unsqueeze(1)).squeeze(1) - shift
    shifted = torch.sub(z, shift.unsqueeze(1), out=work)  # (n, V) z - m: exact near the maximum
    logit_sum = smoothing_sum(shifted, options, class_weight)
    log_sum = shifted.exp_().sum(dim=-1).log_()
    return RowStatistics(shift, log_sum, target_logit, logit_sum)


def row_maximum(z: Tensor, argmax_out: Tensor | None = None) -> Tensor:
    """``z.amax(dim=-1)`` ``(n,)``; with ``argmax_out`` ``(n,)`` int64, also the argmax, in the same pass."""
    if argmax_out is None:
        return z.amax(dim=-1)
    values, indices = z.max(dim=-1)
    argmax_out.copy_(indices)
    return values


def smoothing_sum(shifted: Tensor, options: LossOptions, class_weight: Tensor | None) -> Tensor | None:
    """``sum_j w_j (z_j - m)`` of ``(n, V)`` shifted logits (``w_j = 1`` without class weights), the
    label-smoothing statistic; None without label smoothing."""
    if options.label_smoothing == 0:
        return None
    if class_weight is None:
        return shifted.sum(dim=-1)
    return shifted @ class_weight.to(shifted.dtype)  # (n,)


def finite_shift(row_max: Tensor) -> Tensor:
    """The shift of a log-sum-exp: ``row_max`` where it is finite, 0 elsewhere.

    A row whose maximum is +-inf would give ``inf - inf = NaN``; shifted by 0 instead, its
    log-sum-exp comes out +-inf (and :func:`check_finite_rows` names it), as ``torch.logsumexp``
    does.
    """
    return torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))


def chunked_statistics(
    n_rows: int,
    chunk_rows: int,
    options: LossOptions,
    dtype: torch.dtype,
    device: torch.device,
    chunk: Callable[[slice], RowStatistics],
) -> RowStatistics:
    """The ``(N,)`` statistics of ``n_rows`` rows, gathered chunk by chunk.

    Args:
        n_rows: N.
        chunk_rows: rows per chunk.
        options: loss options (``logit_sum`` is kept only with label smoothing).
        dtype: the accumulation dtype of the statistics.
        device: their device.
        chunk: returns the statistics of the rows of one ``slice`` (it reads or computes that
            chunk's logits; nothing of the chunk outlives the call).
    """

    def empty() -> Tensor:
        return torch.empty(n_rows, dtype=dtype, device=device)

    stats = RowStatistics(empty(), empty(), empty(), empty() if options.label_smoothing > 0 else None)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        part = chunk(rows)
        for name in ("shift", "log_sum", "target_logit", "logit_sum"):
            into = getattr(stats, name)
            if into is not None:
                into[rows] = getattr(part, name)
    return stats


def loss_and_coefficients(
    stats: RowStatistics,
    weights: Tensor,
    vocab_size: int,
    options: LossOptions,
    *,
    class_weights: ClassWeights | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row weighted losses and gradient coefficients.

    With per-class weights ``w`` (PyTorch's ``weight``) the cross-entropy term of a row is
    ``(1 - eps) * w_t * nll + eps / V * sum_j w_j (-log p_j)``, whose gradient is
    ``((1 - eps) w_t + eps W / V) * softmax - (1 - eps) w_t * onehot - eps / V * w`` with ``W = sum_j w_j``:
    ``delta`` then multiplies the vector ``w`` (:func:`chunk_gradient`'s ``class_weight``). The z-loss
    term is not class-weighted.

    Args:
        stats: ``(N,)`` statistics from :func:`chunk_statistics` (whole-vocabulary values; with class
            weights and label smoothing, ``logit_sum`` weighted by them).
        weights: ``(N,)`` float32; 0 for rows that do not count.
        vocab_size: V.
        options: loss options.
        class_weights: optional per-class weights, their values at the rows' targets ``(N,)`` and sum.

    Returns:
        ``(loss, alpha, beta, delta)``, each ``(N,)`` float32. ``loss`` is already multiplied by
        the weight and is exactly 0 where the weight is 0 (whatever the logits there). The
        coefficients are *not* multiplied by the weight (see :func:`scale_coefficients`).
    """
    eps, gamma, zl = options.label_smoothing, options.focal_gamma, options.z_loss
    log_sum, target_logit = stats.log_sum, stats.target_logit  # both relative to the row maximum
    nll = log_sum - target_logit
    ones = torch.ones_like(log_sum)
    if class_weights is None:
        w_target, w_mean = ones, 1.0
    else:
        w_target = class_weights.of_target.to(log_sum.dtype)
        w_mean = class_weights.weight.sum().to(log_sum.dtype) / vocab_size
    ce = w_target * nll if class_weights is not None else nll
    if eps > 0:
        ce = (1 - eps) * ce + eps * (w_mean * log_sum - stats.logit_sum / vocab_size)

    if class_weights is None:
        alpha, beta = ones.clone(), ones * (1 - eps)  # alpha exactly 1 (the fused path relies on it)
    else:
        alpha, beta = (1 - eps) * w_target + eps * w_mean, (1 - eps) * w_target
    delta = ones * (eps / vocab_size)
    loss = ce
    if gamma > 0:
        log_p_target = target_logit - log_sum
        one_minus_p = -torch.expm1(log_p_target)  # accurate when p_target is close to 1
        focal = one_minus_p.pow(gamma)
        # d(focal)/dz = gamma * (1 - p_t) ** (gamma - 1) * p_t * (softmax - onehot); its limit at
        # p_t = 1 is 0 (ce vanishes as fast as 1 - p_t), which pow() alone gets wrong for gamma < 1.
        slope = torch.where(
            one_minus_p > 0,
            gamma * one_minus_p.clamp(min=1e-30).pow(gamma - 1) * log_p_target.exp(),
            torch.zeros_like(one_minus_p),
        )
        loss = focal * ce
        alpha = focal * alpha + ce * slope
        beta = focal * beta + ce * slope
        delta = focal * (eps / vocab_size)
    if zl > 0:
        lse = stats.lse
        loss = loss + zl * lse.square()
        alpha = alpha + 2 * zl * lse

    counts = weights != 0
    zero = torch.zeros_like(loss)
    loss = torch.where(counts, loss * weights, zero)
    return loss, alpha, beta, delta


def scale_coefficients(alpha: Tensor, beta: Tensor, delta: Tensor, row_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Multiplies the coefficients by ``row_scale`` (weight times upstream gradient), with exact
    zeros where the scale is 0 so that non-finite logits of ignored rows never leak a NaN."""
    counts = row_scale != 0
    zero = torch.zeros_like(alpha)
    return (
        torch.where(counts, alpha * row_scale, zero),
        torch.where(counts, beta * row_scale, zero),
        torch.where(counts, delta * row_scale, zero),
    )


def chunk_gradient(
    logits: Tensor,
    targets: Tensor,
    shift: Tensor,
    log_sum: Tensor,
    alpha: Tensor,
    beta: Tensor,
    delta: Tensor,
    options: LossOptions,
    *,
    target_in_chunk: Tensor | None = None,
    out: Tensor | None = None,
    buffer: Tensor | None = None,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Gradient of the (already scaled) loss with respect to a chunk of raw logits.

    Args:
        logits: ``(n, V)`` raw logits (before soft-capping), any float dtype.
        targets: ``(n,)`` int64 column of the target *within this chunk's columns*.
        shift, log_sum: ``(n,)`` whole-vocabulary :class:`RowStatistics` fields (the log-sum-exp of
            the capped logits is ``shift + log_sum``).
        alpha, beta, delta: ``(n,)`` float32 scaled coefficients (:func:`scale_coefficients`).
        options: loss options (softcap is used here; ``delta`` is only subtracted when
            ``label_smoothing > 0``, the only case where :func:`loss_and_coefficients` makes it
            non-zero).
        target_in_chunk: optional ``(n,)`` bool; False where the target column lies outside this
            chunk's columns (vocabulary-parallel shards), so no onehot is subtracted there.
        out: optional ``(n, V)`` tensor the gradient is written into (it may be ``logits``
            itself: every read of ``logits`` happens before the first write). When its dtype is
            the accumulation dtype the gradient is computed in it directly, with no ``(n, V)``
            temporary (none at all without a softcap); otherwise it is computed in a temporary
            and cast into ``out``.
        buffer: optional ``(n', V)`` scratch tensor in the accumulation dtype, ``n' >= n``, used
            for that temporary instead of a fresh allocation (see :func:`chunk_statistics`).
        class_weight: optional ``(V,)`` per-class weights: ``delta`` then multiplies them (a rank-one
            update) instead of a constant (:func:`loss_and_coefficients`).

    Returns:
        ``(n, V)`` gradient: ``out`` if given, else a fresh tensor in the accumulation dtype.
    """
    acc = accumulation_dtype(logits.dtype)
    if out is not None and out.dtype == acc:
        work = out
    elif buffer is not None:
        work = buffer[: logits.shape[0]]
    else:
        work = torch.empty(logits.shape, dtype=acc, device=logits.device)
    shift_col = shift.unsqueeze(1)
    if options.softcap is None:
        # z - m in one pass that reads the logits and writes `work` (bf16/fp16 promote to float32 here)
        torch.sub(logits, shift_col, out=work)
        derivative = None
    else:
        tanh = torch.tanh(logits.to(acc) / options.softcap)  # (n, V): read before `work` may overwrite logits
        torch.mul(tanh, options.softcap, out=work).sub_(shift_col)
        derivative = tanh.square_().neg_().add_(1)  # dz/dx = 1 - tanh(x / c) ** 2
    # softmax = exp(z - m) / sum: the 1/sum rides on alpha, so no pass is added.
    grad = work.exp_().mul_((alpha * torch.exp(-log_sum)).unsqueeze(1))  # alpha * softmax
    onehot_coeff = beta if target_in_chunk is None else torch.where(target_in_chunk, beta, torch.zeros_like(beta))
    grad.scatter_add_(1, targets.unsqueeze(1), -onehot_coeff.unsqueeze(1))
    subtract_smoothing(grad, delta, options, class_weight)
    if derivative is not None:
        grad.mul_(derivative)
    if out is not None and grad is not out:
        out.copy_(grad)
        return out
    return grad


def subtract_smoothing(grad: Tensor, delta: Tensor, options: LossOptions, class_weight: Tensor | None) -> None:
    """``grad -= delta[:, None] * w[None, :]`` in place (``w_j = 1`` without class weights); nothing
    without label smoothing, where ``delta`` is exactly 0 (a pass over ``(n, V)`` saved)."""
    if options.label_smoothing == 0:
        return
    if class_weight is None:
        grad.sub_(delta.unsqueeze(1))
    else:
        grad.addr_(delta.to(grad.dtype), class_weight.to(grad.dtype), alpha=-1)


def refuse_double_backward(name: str) -> None:
    """Raises NotImplementedError in a backward pass run with ``create_graph=True``.

    The backward passes write ``softmax - onehot`` with in-place kernels that autograd cannot
    differentiate again; without this check ``torch.autograd.grad(..., create_graph=True)`` would
    return a gradient with no graph (so the next ``grad`` call fails far away) or an unrelated
    ``out=`` error.
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"tokenloss.{name} computes first derivatives only: a double backward (create_graph=True, "
            "e.g. a gradient penalty) is not supported. Use tokenloss.reference.reference_cross_entropy "
            "or torch.nn.functional.cross_entropy for that term"
        )


def check_finite_rows(lse: Tensor, counted: Tensor, name: str, loss: Tensor | None = None) -> bool:
    """Raises ValueError if a counted row's log-sum-exp, or its loss, is NaN or infinite.

    A NaN anywhere in a row, a ``+inf``, or a row of only ``-inf`` shows up in the log-sum-exp, so
    this O(N) check replaces an O(N * V) scan of the logits. A ``-inf`` logit at the target class
    (or, with label smoothing, at any class) leaves the log-sum-exp finite but makes the loss
    infinite: that shows up in ``loss``. One host sync on CUDA for both.

    Args:
        lse: ``(N,)`` log-sum-exp of each row.
        counted: ``(N,)`` bool, True where the row counts.
        name: what the rows are, for the message (``"logits"``).
        loss: optional ``(N,)`` per-row losses.

    Returns:
        True when some row that does *not* count is non-finite: its gradient must then be zeroed
        explicitly, because ``0 * exp(NaN)`` is NaN.
    """
    nonfinite = ~torch.isfinite(lse)
    bad = counted & nonfinite
    bad_loss = counted & ~torch.isfinite(loss) if loss is not None else torch.zeros_like(counted)
    any_bad, any_nonfinite, any_bad_loss = torch.stack([bad.any(), nonfinite.any(), bad_loss.any()]).tolist()
    if any_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} contain NaN or infinite values in {int(bad.sum())} counted row(s) (first: row {first} "
            "of the flattened rows); the loss would be NaN. Fix the model's output, or pass "
            "check_inputs=False to skip this check"
        )
    if any_bad_loss:
        first = int(bad_loss.nonzero()[0, 0])
        raise ValueError(
            f"the loss is infinite in {int(bad_loss.sum())} counted row(s) (first: row {first} of the flattened "
            f"rows): {name} hold -inf at the target class (or, with label smoothing, at some class), where the "
            "probability is 0. Pass check_inputs=False to get the infinite loss instead"
        )
    return bool(any_nonfinite)
