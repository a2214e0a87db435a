"""Vocabulary-parallel cross-entropy for tensor parallelism, and the global token count for data parallelism.

Design
------
Under tensor parallelism each rank of a ``torch.distributed`` process group holds one contiguous
slice of the vocabulary, in rank order (rank 0 holds the first columns): either a ``(N, V_local)``
slice of the logits or a ``(V_local, D)`` slice of the LM head weight. Slices may differ in size
(``V`` need not divide by the world size). The loss of a row needs whole-vocabulary quantities,
but every one of them is a sum or a log-sum-exp over the columns, so each rank reduces its own
columns to per-row numbers and the ranks combine those numbers, never the logits:

1. *Layout* (once per call): one ``all_gather`` of each rank's ``V_local`` gives every rank the
   offsets of all slices, unless the caller passes ``vocab_sizes``.
2. *Local statistics* (no communication): :func:`tokenloss.ops.rowwise.chunk_statistics` on the
   local columns, chunk by chunk, with each target moved into the local column range (rows whose
   target lies on another rank gather a dummy column that is zeroed).
3. *Combine* (two collectives of ``O(N)`` numbers): ``all_reduce(MAX)`` of the local row maxima
   ``m_r``, giving ``m``, then one ``all_reduce(SUM)`` of the stacked ``(N, 2 or 3)`` columns
   ``[sum exp(z - m) over the local columns, target logit - m (non-zero on one rank only), sum of
   (z - m) (label smoothing only)]``. The global statistics stay relative to ``m``, as on one
   device (:class:`~tokenloss.ops.rowwise.RowStatistics`).
4. *Coefficients* (no communication): :func:`~tokenloss.ops.rowwise.loss_and_coefficients` on
   the whole-vocabulary statistics with the whole ``V``, so label smoothing (``eps / V``),
   z-loss (``lse ** 2``), soft-capping and the focal factor are exactly those of one device (not
   per shard, which is Megatron's 1% smoothing error). Every rank ends with the same loss.
5. *Backward*: the logits variant needs no communication: each rank writes
   :func:`~tokenloss.ops.rowwise.chunk_gradient` for its own columns (``target_in_chunk`` keeps the
   one-hot on the rank that holds the target). The linear variant recomputes its logits slice per
   chunk, turns it into the weight (and bias) gradient of its slice and a *partial* hidden
   gradient ``grad_logits_slice @ weight_slice``; the hidden gradient is the sum of those partial
   gradients over the ranks, so the backward ends with one ``all_reduce(SUM)`` of ``(N, D)``
   (the same collective Megatron puts in the backward of "copy to tensor-parallel region").

Per step and rank this exchanges ``world`` integers, ``N`` numbers (MAX) and ``2N`` or ``3N``
numbers (SUM); the linear variant adds ``N * D`` in the backward. The loss is replicated: every
rank must call the function with the same targets (and the same ``hidden`` for the linear variant)
and backpropagate the same upstream gradient, which is what calling ``loss.backward()`` on every
rank does. Inputs that differ between ranks where they should agree (targets, options) are a
programming error that this module does not detect; checks that raise do so on every rank alike.

Any backend works: NCCL for CUDA tensors, gloo for CPU tensors (see :func:`default_backend`).

Data parallelism and gradient accumulation need something else: the global number of counted
tokens, so that ``sum of local losses / global count`` is the mean over one big batch.
:func:`global_num_items` computes it with one ``all_reduce``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tokenloss.ops.autocast import backward_without_autocast
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.cross_entropy import plain_chunk_rows
from tokenloss.ops.linear_cross_entropy import counted_row_index, fused_chunk_rows
from tokenloss.ops.rowwise import (
    RowStatistics,
    accumulation_dtype,
    check_finite_rows,
    chunk_gradient,
    chunk_statistics,
    chunked_statistics,
    finite_shift,
    loss_and_coefficients,
    refuse_double_backward,
    scale_coefficients,
)
from tokenloss.options import (
    LossOptions,
    PreparedTargets,
    check_linear_inputs,
    check_logits,
    check_target_range,
    prepare_targets,
    takes_loss_options,
)

__all__ = [
    "default_backend",
    "global_num_items",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, ``"gloo"`` otherwise (the backend for CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


# ---------------------------------------------------------------------------------------------
# Layout of the vocabulary slices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's slice sits in the whole vocabulary.

    Attributes:
        sizes: ``V_local`` of every rank, in rank order.
        rank: this rank's index in the group.

    Properties: ``offset`` (first vocabulary id of this rank's slice), ``local_size`` (its
    ``V_local``) and ``vocab_size`` (the whole ``V``, the sum of ``sizes``).
    """

    sizes: tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local_size(self) -> int:
        return self.sizes[self.rank]

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes)


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group(...) first "
            "(or use tokenloss.cross_entropy on one device)"
        )


def shard_layout(local_size: int, vocab_sizes: Sequence[int] | None, group, device: torch.device) -> ShardLayout:
    """This rank's slice: from ``vocab_sizes`` if given, else from one ``all_gather`` of ``local_size``.

    Raises:
        ValueError: ``vocab_sizes`` of the wrong length, with a non-positive entry, or whose
            entry for this rank is not ``local_size``.
    """
    _require_initialized()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if vocab_sizes is not None:
        sizes = tuple(vocab_sizes)
        if len(sizes) != world or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"vocab_sizes must list {world} positive ints (V_local of each rank, in rank order), got {sizes}"
            )
        if sizes[rank] != local_size:
            raise ValueError(
                f"vocab_sizes[{rank}] = {sizes[rank]} but this rank's shard has {local_size} vocabulary columns"
            )
        return ShardLayout(sizes, rank)
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)  # collective: world ints
    return ShardLayout(tuple(int(t) for t in torch.cat(gathered).tolist()), rank)


def _localize_targets(prepared: PreparedTargets, layout: ShardLayout, options: LossOptions) -> tuple[Tensor, Tensor]:
    """Checks counted targets against the whole V and moves them into this slice's columns.

    Returns:
        ``(local_targets, in_shard)``: ``(N,)`` int64 column within the slice (0 where the target
        is elsewhere) and ``(N,)`` bool, True where this rank holds the target's column.
    """
    targets = prepared.targets  # (N,) global ids, 0 where the row does not count
    if options.check_inputs:
        check_target_range(
            targets,
            prepared.counted,
            layout.vocab_size,
            options.ignore_index,
            " (the whole vocabulary over all shards)",
        )
    local = targets - layout.offset
    in_shard = (local >= 0) & (local < layout.local_size)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def _prepare_shard(
    inputs: Tensor,
    input_name: str,
    local_size: int,
    targets: Tensor,
    options: LossOptions,
    mask: Tensor | None,
    token_weights: Tensor | None,
    num_items: int | float | Tensor | None,
    vocab_sizes: Sequence[int] | None,
    group,
) -> tuple[PreparedTargets, ShardLayout, Tensor, Tensor]:
    """The preparation of both vocabulary-parallel losses: targets prepared against ``inputs``'
    leading shape, this rank's slice of the vocabulary, and the targets moved into its columns
    (checked against the whole V, not V_local)."""
    prepared = prepare_targets(
        tuple(inputs.shape[:-1]),
        targets,
        None,  # the range is checked against the whole V by _localize_targets
        options,
        mask=mask,
        token_weights=token_weights,
        num_items=num_items,
        input_name=input_name,
        device=inputs.device,
    )
    layout = shard_layout(local_size, vocab_sizes, group, inputs.device)
    local_targets, in_shard = _localize_targets(prepared, layout, options)
    return prepared, layout, local_targets, in_shard


def combine_statistics(local: RowStatistics, in_shard: Tensor, local_size: int, group) -> RowStatistics:
    """Whole-vocabulary statistics from every rank's slice statistics: two collectives of O(N).

    Args:
        local: ``(N,)`` statistics of this rank's columns, relative to the local row maximum
            (``target_logit`` is arbitrary where ``in_shard`` is False).
        in_shard: ``(N,)`` bool, True where this rank holds the row's target column.
        local_size: ``V_local``, the number of this rank's columns.
        group: the process group.

    Returns:
        :class:`RowStatistics` of the whole vocabulary, relative to the global row maximum,
        identical on every rank.
    """
    # A slice whose row is -inf everywhere (log_sum = -inf) must not lift the maximum to its
    # finite_shift of 0; a NaN or +inf slice makes the whole row non-finite through its sum.
    candidate = torch.where(torch.isfinite(local.log_sum), local.shift, torch.full_like(local.shift, -torch.inf))
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=group)  # collective 1: N numbers
    shift = finite_shift(candidate)
    moved = local.shift - shift  # (N,) <= 0: this slice's maximum relative to the global one
    columns = [
        torch.exp(moved + local.log_sum),
        torch.where(in_shard, local.target_logit + moved, torch.zeros_like(moved)),
    ]
    if local.logit_sum is not None:
        columns.append(local.logit_sum + local_size * moved)
    sums = torch.stack(columns, dim=1)  # (N, 2 or 3)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # collective 2: 2N or 3N numbers
    logit_sum = sums[:, 2].contiguous() if local.logit_sum is not None else None
    return RowStatistics(shift, torch.log(sums[:, 0]), sums[:, 1].contiguous(), logit_sum)


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy from a logits slice
# ---------------------------------------------------------------------------------------------


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function: ``(N, V_local)`` logits slice -> ``(N,)`` weighted per-row losses (float32),
    the same on every rank. Forward: two O(N) collectives; backward: none."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,  # (N, V_local) this rank's columns, any float dtype
        local_targets: Tensor,  # (N,) int64 column within the slice, 0 where the target is elsewhere
        in_shard: Tensor,  # (N,) bool, True where this rank holds the target column
        weights: Tensor,  # (N,) float32, 0 where the row does not count
        counted: Tensor,  # (N,) bool
        vocab_size: int,  # the whole V
        options: LossOptions,
        chunk_rows: int,
        group,
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local = chunked_statistics(
            logits.shape[0],
            chunk_rows,
            options,
            acc,
            logits.device,
            lambda rows: chunk_statistics(logits[rows], local_targets[rows], options),
        )
        stats = combine_statistics(local, in_shard, logits.shape[1], group)
        # True when a row that does not count is non-finite: its gradient must be zeroed explicitly.
        weights = weights.to(acc)
        loss, alpha, beta, delta = loss_and_coefficients(stats, weights, vocab_size, options)
        zero_skipped_rows = check_finite_rows(stats.lse, counted, "logits", loss) if options.check_inputs else False
        ctx.save_for_backward(logits, local_targets, in_shard, weights, stats.shift, stats.log_sum, alpha, beta, delta)
        ctx.options, ctx.chunk_rows, ctx.zero_skipped_rows = options, chunk_rows, zero_skipped_rows
        return loss

    @staticmethod
    @eager_under_compile
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("distributed.vocab_parallel_cross_entropy")
        logits, local_targets, in_shard, weights, shift, log_sum, alpha, beta, delta = ctx.saved_tensors
        row_scale = grad_loss.to(weights.dtype) * weights
        alpha, beta, delta = scale_coefficients(alpha, beta, delta, row_scale)
        skipped = (row_scale == 0).unsqueeze(1) if ctx.zero_skipped_rows else None  # (N, 1) bool
        grad = torch.empty_like(logits)  # (N, V_local)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            chunk_gradient(
                logits[rows],
                local_targets[rows],
                shift[rows],
                log_sum[rows],
                alpha[rows],
                beta[rows],
                delta[rows],
                ctx.options,
                target_in_chunk=in_shard[rows],
                out=grad[rows],  # written in place: no (n, V_local) temporary
            )
            if skipped is not None:
                grad[rows].masked_fill_(skipped[rows], 0)
        return grad, None, None, None, None, None, None, None, None


@takes_loss_options
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    targets: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_sizes: Sequence[int] | None = None,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    options: LossOptions,
) -> Tensor:
    """:func:`tokenloss.cross_entropy` of logits whose vocabulary is split over the ranks of ``group``.

    Each rank passes its slice of the logits: rank ``r`` holds the columns
    ``[sum(V_0..V_{r-1}), sum(V_0..V_r))`` of the whole ``(..., V)`` logits. The result, identical on
    every rank, equals ``tokenloss.cross_entropy`` of the whole logits within float32 rounding, and
    each rank's gradient is the matching column slice of the whole gradient. Only ``O(N)`` numbers
    per rank are exchanged (see the module docstring); the logits never leave their rank.

    Args:
        logits_shard: ``(..., V_local)`` float32, bfloat16, float16 or float64; this rank's slice.
        targets: ``(...)`` integer ids in the *whole* vocabulary ``[0, V)``, the same on every rank.
        group: the tensor-parallel process group (None: the default group).
        vocab_sizes: ``V_local`` of every rank in rank order; None discovers them with one
            ``all_gather``. Give them to save that collective when they are known.
        mask, token_weights, num_items: as in :func:`tokenloss.cross_entropy`.
        **options: the loss options listed below, as in :func:`tokenloss.cross_entropy`; label
            smoothing, z-loss and soft-capping act on the whole vocabulary, exactly as on one device.

    Returns:
        A float32 scalar for ``"mean"``/``"sum"``; a float32 tensor shaped like ``targets`` (after
        the shift) for ``"none"``. The same value on every rank.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        TypeError, ValueError: as :func:`tokenloss.cross_entropy` (the target range is checked
            against the whole V), and bad ``vocab_sizes``.

    Examples:
        On each of 2 ranks of a gloo group, holding columns ``[0, 3)`` and ``[3, 5)``::

            loss = vocab_parallel_cross_entropy(logits[:, lo:hi], targets)  # == tl.cross_entropy(logits, targets)
            loss.backward()                                                 # grad of logits[:, lo:hi]
    """
    check_logits(logits_shard, "logits_shard")
    local_size = logits_shard.shape[-1]
    prepared, layout, local_targets, in_shard = _prepare_shard(
        logits_shard, "logits_shard", local_size, targets, options, mask, token_weights, num_items, vocab_sizes, group
    )
    rows = VocabParallelCrossEntropyFunction.apply(
        logits_shard.reshape(-1, local_size),
        local_targets,
        in_shard,
        prepared.weights,
        prepared.counted,
        layout.vocab_size,
        options,
        plain_chunk_rows(local_size, options.chunk_size),
        group,
    )
    return prepared.reduce(rows, options.reduction)


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy from hidden states and a slice of the LM head
# ---------------------------------------------------------------------------------------------


def _logits_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(n, D) @ (V_local, D).T (+ bias)`` -> ``(n, V_local)`` in the inputs' dtype."""
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function: hidden ``(N, D)`` and an LM-head slice ``(V_local, D)`` -> ``(N,)`` weighted
    per-row losses (float32), the same on every rank. Only one ``(chunk, V_local)`` block of logits
    exists at a time. Forward: two O(N) collectives; backward: one all-reduce of the ``(N, D)``
    hidden gradient."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (N, D) the same on every rank
        weight: Tensor,  # (V_local, D) this rank's rows of the LM head
        bias: Tensor | None,  # (V_local,) or None
        local_targets: Tensor,  # (N,) int64 column within the slice, 0 where the target is elsewhere
        in_shard: Tensor,  # (N,) bool
        weights: Tensor,  # (N,) float32; every row counts (the caller drops the others)
        vocab_size: int,  # the whole V
        options: LossOptions,
        chunk_rows: int,
        group,
    ) -> Tensor:
        acc = accumulation_dtype(hidden.dtype)
        local = chunked_statistics(
            hidden.shape[0],
            chunk_rows,
            options,
            acc,
            hidden.device,
            # (n, V_local) logits, freed after the chunk
            lambda rows: chunk_statistics(_logits_chunk(hidden[rows], weight, bias), local_targets[rows], options),
        )
        stats = combine_statistics(local, in_shard, weight.shape[0], group)
        weights = weights.to(acc)
        loss, alpha, beta, delta = loss_and_coefficients(stats, weights, vocab_size, options)
        if options.check_inputs:
            check_finite_rows(stats.lse, torch.ones_like(in_shard), "logits (hidden @ weight.T)", loss)
        ctx.save_for_backward(
            hidden, weight, bias, local_targets, in_shard, weights, stats.shift, stats.log_sum, alpha, beta, delta
        )
        ctx.options, ctx.chunk_rows, ctx.group = options, chunk_rows, group
        return loss

    @staticmethod
    @eager_under_compile
    @backward_without_autocast
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward("distributed.vocab_parallel_linear_cross_entropy")
        hidden, weight, bias, local_targets, in_shard, weights, shift, log_sum, alpha, beta, delta = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        row_scale = grad_loss.to(weights.dtype) * weights
        alpha, beta, delta = scale_coefficients(alpha, beta, delta, row_scale)
        acc = shift.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, D)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = _logits_chunk(hidden[rows], weight, bias)  # (n, V_local) recomputed
            grad_logits = chunk_gradient(
                logits,
                local_targets[rows],
                shift[rows],
                log_sum[rows],
                alpha[rows],
                beta[rows],
                delta[rows],
                ctx.options,
                target_in_chunk=in_shard[rows],
                out=logits if logits.dtype == acc else None,  # in place when possible
            )  # (n, V_local) in acc
            del logits
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].to(acc))
            if grad_hidden is not None:
                # partial: the contribution of this slice's columns only
                grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
        if grad_hidden is not None:
            # d loss / d hidden = sum over all V columns = sum over the ranks' slices.
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)  # collective: N * D
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


@takes_loss_options
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    targets: Tensor,
    *,
    bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_sizes: Sequence[int] | None = None,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    options: LossOptions,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` with the LM head's rows split over the ranks.

    Rank ``r`` holds the rows ``[sum(V_0..V_{r-1}), sum(V_0..V_r))`` of the whole ``(V, D)`` weight
    (and the same slice of the bias). Neither the whole ``(N, V)`` logits nor this rank's
    ``(N, V_local)`` slice of them is ever stored: logits exist one chunk of rows at a time, and
    are recomputed in the backward pass. The result equals the single-device loss of the whole
    head within float32 rounding, on every rank.

    Gradients: each rank gets the gradient of its own weight (and bias) slice; the gradient of
    ``hidden`` is summed over the ranks inside the backward pass (one ``all_reduce`` of ``(N, D)``),
    so every rank gets the whole hidden gradient, as on one device. Do not all-reduce it again
    (e.g. do not put this after Megatron's "copy to tensor-parallel region", which does the same).

    Args:
        hidden: ``(..., D)`` float tensor, the same on every rank.
        weight_shard: ``(V_local, D)``, same dtype as ``hidden``.
        targets: ``(...)`` integer ids in the whole vocabulary ``[0, V)``, the same on every rank.
        bias_shard: optional ``(V_local,)``.
        group, vocab_sizes: as in :func:`vocab_parallel_cross_entropy`.
        mask, token_weights, num_items: as in :func:`tokenloss.cross_entropy`.
        **options: the loss options listed below. ``chunk_size=None`` chunks as
            :func:`tokenloss.linear_cross_entropy` does (about N / 5 rows, at most 256 MiB of float32
            logits of the slice): each chunk streams the whole weight slice and its gradient, so few
            large chunks are faster.

    Returns:
        As :func:`vocab_parallel_cross_entropy`.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        TypeError: non-float ``hidden``, ``weight_shard`` or ``bias_shard`` of another dtype.
        ValueError: shapes that do not agree, plus the errors of :func:`vocab_parallel_cross_entropy`.
    """
    check_linear_inputs(hidden, weight_shard, bias_shard, weight_name="weight_shard", bias_name="bias_shard")
    local_size, dim = weight_shard.shape
    prepared, layout, local_targets, in_shard = _prepare_shard(
        hidden, "hidden", local_size, targets, options, mask, token_weights, num_items, vocab_sizes, group
    )
    flat_hidden, weights = hidden.reshape(-1, dim), prepared.weights
    # Rows that do not count never reach a product (nor their non-finite values a gradient). The
    # targets are the same on every rank, so every rank keeps the same rows and the collectives match.
    index = counted_row_index(prepared.counted)
    if index is not None:
        flat_hidden = flat_hidden.index_select(0, index)
        local_targets, in_shard = local_targets.index_select(0, index), in_shard.index_select(0, index)
        weights = weights.index_select(0, index)
    n_rows = local_targets.shape[0]
    rows = VocabParallelLinearCrossEntropyFunction.apply(
        flat_hidden,
        weight_shard,
        bias_shard,
        local_targets,
        in_shard,
        weights,
        layout.vocab_size,
        options,
        # Few large chunks: each chunk streams the whole (V_local, D) weight and its gradient.
        fused_chunk_rows(n_rows, local_size, chunk_size=options.chunk_size, device=hidden.device),
        group,
    )
    if index is not None:
        rows = rows.new_zeros(prepared.counted.shape[0]).index_copy(0, index, rows)
    return prepared.reduce(rows, options.reduction)


# ---------------------------------------------------------------------------------------------
# Data parallelism and gradient accumulation: the global number of counted tokens
# ---------------------------------------------------------------------------------------------


def global_num_items(
    *targets: Tensor | PreparedTargets,
    ignore_index: int = -100,
    mask: Tensor | Sequence[Tensor | None] | None = None,
    shift: bool | int = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The number of counted tokens over all micro-batches of all ranks, with one ``all_reduce``.

    Pass it as ``num_items`` with ``reduction="mean"``: each micro-batch's loss is then its summed
    loss divided by the global count, so summing the losses of the accumulation steps and over
    the ranks gives the mean over one big batch (every token weighs the same, however the tokens
    are spread). Data-parallel wrappers that *average* gradients over ranks (DDP, FSDP) divide by
    the world size, so multiply the loss by ``world_size`` there, as the Hugging Face Trainer does
    with ``num_items_in_batch``.

    A position counts when its target (after the shift) is not ``ignore_index`` and its mask is
    True, exactly as in :func:`tokenloss.cross_entropy`.

    Args:
        *targets: this rank's micro-batches: ``(...)`` integer target tensors, or the
            :class:`~tokenloss.options.PreparedTargets` of a loss call (their ``counted`` is used
            and ``ignore_index``/``mask``/``shift`` are not).
        ignore_index: target value of positions that do not count.
        mask: a bool tensor for a single ``targets`` tensor, or one bool tensor (or None) per
            micro-batch; True marks positions that count.
        shift: causal shift: the first position of each sequence is never a target (an int k: the
            first k positions, as in :class:`~tokenloss.options.LossOptions`).
        group: the data-parallel group (None: the default group). Without an initialized
            ``torch.distributed`` the count of this process is returned (no communication).

    Returns:
        A 0-dim int64 tensor on the first targets' device, the same on every rank.

    Raises:
        TypeError: no targets, or targets/mask of the wrong type.
        ValueError: a mask of another shape than its targets, or a mask list of the wrong length.

    Examples:
        >>> import torch
        >>> int(global_num_items(torch.tensor([[5, 7, -100]]), shift=True))  # 7 counts, -100 does not
        1
    """
    if not targets:
        raise TypeError("global_num_items needs at least one targets tensor (or PreparedTargets)")
    if mask is None or isinstance(mask, Tensor):
        if isinstance(mask, Tensor) and len(targets) != 1:
            raise ValueError(f"mask must be a sequence of {len(targets)} masks (one per targets), got one tensor")
        masks: Sequence[Tensor | None] = [mask] * len(targets)
    else:
        masks = list(mask)
        if len(masks) != len(targets):
            raise ValueError(f"mask must list one mask per targets ({len(targets)}), got {len(masks)}")
    counts = []
    for i, (item, item_mask) in enumerate(zip(targets, masks)):
        counts.append(_local_count(item, item_mask, ignore_index, shift, f"targets[{i}]"))
    first = targets[0].counted if isinstance(targets[0], PreparedTargets) else targets[0]
    total = torch.stack([c.to(first.device) for c in counts]).sum()  # 0-dim int64
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)  # the one collective
    return total


def _local_count(item: Tensor | PreparedTargets, mask: Tensor | None, ignore_index: int, shift: bool, name: str):
    if isinstance(item, PreparedTargets):
        return item.counted.sum()
    if not isinstance(item, Tensor) or item.dtype.is_floating_point or item.dtype == torch.bool:
        got = item.dtype if isinstance(item, Tensor) else type(item).__name__
        raise TypeError(f"{name} must be an integer tensor or PreparedTargets, got {got}")
    counted = item != ignore_index
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"the mask of {name} must be a bool tensor, got {got}")
        if mask.shape != item.shape:
            raise ValueError(f"the mask of {name} must have shape {tuple(item.shape)}, got {tuple(mask.shape)}")
        counted = counted & mask
    steps = int(shift)
    if steps:
        if item.ndim < 1:
            raise ValueError(f"shift=True needs {name} with a sequence dimension, got a scalar")
        counted = counted[..., steps:]
    return counted.sum()
