"""Fused linear layer + cross-entropy in PyTorch: the loss and every gradient chunk by chunk, never the (N, V) logits.

For hidden states ``h`` ``(N, D)``, an LM head ``W`` ``(V, D)`` and an optional bias ``b`` ``(V,)``
the logits ``h @ W.T + b`` take ``N * V`` numbers. This module walks the rows in chunks of ``n``;
per chunk it holds one ``(n, V)`` buffer (plus a float32 copy for bf16/fp16 inputs) and:

1. computes the chunk's logits with one matrix product (oneDNN's linear for float32 CPU tensors,
   a fresh tensor per chunk; ``torch.mm`` into one reused buffer otherwise: see :func:`_uses_onednn`);
2. turns them *in place* into the per-row statistics of :mod:`tokenloss.ops.rowwise` (one
   ``exp`` per element: the row maximum is subtracted, the buffer exponentiated and summed,
   so ``lse = max + log(sum)``) and the coefficients ``alpha, beta, delta`` from
   :func:`~tokenloss.ops.rowwise.loss_and_coefficients` (the shared per-row math);
3. turns the same buffer into the gradient of the logits ``alpha * softmax - beta * onehot - delta``
   (times the soft-capping derivative) up to a per-row factor, which is applied to the ``(n, D)``
   operands of the next products rather than to the ``(n, V)`` buffer, and
4. multiplies it into ``grad_hidden`` (one product) and adds it into ``grad_weight`` (one product).

Rows that do not count (ignored or masked) are dropped *before* the products (an
``index_select`` of the counted rows), so a batch with 70% prompt tokens costs about 30%.

Two strategies, chosen by the reduction:

- ``"mean"``/``"sum"``: the upstream gradient is one scalar, so the gradients are computed during
  the forward pass (three products per chunk: logits, grad_hidden, grad_weight) and only
  multiplied by that scalar in the backward pass, in place. The backward pass can run once.
- ``"none"``: the upstream gradient differs per row, so the forward pass keeps only ``(N,)``
  statistics and the backward pass recomputes each chunk's logits (four products in all).

Precision: bf16/fp16 logits are computed by a product in the input dtype (as the unfused
``hidden @ weight.T`` would be), the statistics and the gradient of the logits in float32, and
``grad_weight``/``grad_bias`` are accumulated across chunks in float32 (float32 products from the
float32 gradient). ``grad_hidden`` is not accumulated across chunks: each row lies in one chunk and
its reduction over V happens inside one product, which accumulates in float32.

Host synchronisation: selecting the counted rows needs their number (one sync on CUDA, before
any product); with ``check_inputs=True`` the finite check of the log-sum-exp adds one more after
the chunk loop. The loop itself has no ``.item()`` or data-dependent shape.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from tokenloss.ops.autocast import backward_without_autocast
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.rowwise import (
    RowStatistics,
    accumulation_dtype,
    capped,
    check_finite_rows,
    finite_shift,
    loss_and_coefficients,
    refuse_double_backward,
    row_maximum,
    scale_coefficients,
    smoothing_sum,
    subtract_smoothing,
)
from tokenloss.options import ClassWeights, LossOptions, PreparedTargets
from tokenloss.side_outputs import SideRows

# Chunk rule (see :func:`fused_chunk_rows`). Every chunk streams the whole (V, D) weight through two
# products and the (V, D) grad_weight accumulator through a third, so the time beyond the three
# products grows with the number of chunks (measured on a 2-core CPU: +35-55% at 130-row chunks,
# where the weight is 512 MiB); the memory grows with the chunk's (n, V) buffer. The unfused loss
# keeps about 2.5 (N, V) float32 tensors at its peak, so a chunk of at most N / CHUNK_FRACTION rows
# stays under ~10% of its extra memory while keeping the number of chunks at 5; MAX_CHUNK_BYTES
# bounds the buffer for large N, MIN_CHUNK_ROWS keeps small batches from being cut into slivers.
CHUNK_FRACTION = 5
MAX_CHUNK_BYTES = 256 << 20
MIN_CHUNK_ROWS = 128
MAX_MEMORY_FRACTION = 16


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: MemAvailable), or None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu" and os.path.exists("/proc/meminfo"):
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (RuntimeError, OSError, ValueError):
        return None
    return None


def fused_chunk_rows(
    n_rows: int, vocab_size: int, *, chunk_size: int | None = None, device: torch.device | None = None
) -> int:
    """Rows per chunk of the fused loss.

    ``chunk_size`` (checked by :class:`~tokenloss.options.LossOptions`) if given. Otherwise
    ``ceil(N / 5)`` rows (5 chunks: the (n, V) buffer is a fifth of the unfused logits), at most
    ``MAX_CHUNK_BYTES / (4 V)`` (256 MiB of float32 logits: 2097 rows at V = 32000, 523 at
    V = 128256), at least 128 rows (or N if smaller), and at most ``1/16`` of the memory free on
    ``device`` (``n * V * 4`` bytes). At least 1.
    """
    if chunk_size is not None:
        return chunk_size
    row_bytes = 4 * max(vocab_size, 1)
    rows = min(-(-n_rows // CHUNK_FRACTION), MAX_CHUNK_BYTES // row_bytes)
    rows = max(rows, min(MIN_CHUNK_ROWS, n_rows))
    free = _available_bytes(device) if device is not None else None
    if free is not None:
        rows = min(rows, free // (MAX_MEMORY_FRACTION * row_bytes))
    return max(1, rows)


@functools.cache
def _onednn_linear():
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``) if this build has it and it
    agrees with ``torch.addmm`` on a small probe, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 8), (5, 8), (5,)))
        agrees = all(
            torch.allclose(op(x, w, bias, "none", [], ""), want, rtol=1e-5, atol=1e-5)
            for bias, want in ((None, x @ w.t()), (b, torch.addmm(b, x, w.t())))
        )
    except (AttributeError, RuntimeError):
        return None
    return op if agrees else None


def _uses_onednn(hidden: Tensor) -> bool:
    """Whether the chunks' logits come from oneDNN's linear: float32 CPU tensors, where this build
    has it, unless the environment sets ``TOKENLOSS_ONEDNN=0``.

    Not while ``torch.compile`` traces the loss: Inductor cannot lower that op for an unpacked
    weight, so compiled code uses ``torch.mm``.

    Measured on a 2-core EPYC at (2048, 1024, 128256): for chunks of a few hundred rows, MKL's sgemm
    (``torch.mm``) takes about 1.2x the time per row of one whole-batch product, oneDNN's linear
    about 1.0x; the later products (grad_hidden, grad_weight) show no such gap.
    """
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and not torch.compiler.is_compiling()  # Inductor cannot lower this op on unpacked weights
        and os.environ.get("TOKENLOSS_ONEDNN", "1") != "0"
        and _onednn_linear() is not None
    )


def logits_buffer(hidden: Tensor, weight: Tensor, chunk_rows: int) -> Tensor | None:
    """The ``(n, V)`` buffer every chunk's logits are written into, or None when each chunk gets a
    fresh tensor from oneDNN (which has no ``out=``; the loops drop each chunk before the next)."""
    if _uses_onednn(hidden):
        return None
    return hidden.new_empty(min(chunk_rows, hidden.shape[0]), weight.shape[0])


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` ``(n, V)`` in the input dtype, in ``buffer[:n]`` unless it is None."""
    if buffer is None:
        return _onednn_linear()(hidden, weight, bias, "none", [], "")
    out = buffer[: hidden.shape[0]]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _statistics_inplace(
    logits: Tensor,
    targets: Tensor,
    options: LossOptions,
    class_weight: Tensor | None = None,
    argmax_out: Tensor | None = None,
) -> tuple[Tensor, RowStatistics, Tensor]:
    """Per-row statistics of a chunk, leaving ``exp(z - max)`` in a float buffer.

    Equal to :func:`tokenloss.ops.rowwise.chunk_statistics` (tested), with one ``exp`` per element
    and no ``(n, V)`` temporary: ``z`` is the capped logits in the accumulation dtype (the
    ``logits`` buffer itself for float32/float64 without a cap).

    Args:
        logits: ``(n, V)`` raw logits; overwritten when it is already in the accumulation dtype
            and there is no softcap.
        targets: ``(n,)`` int64 in ``[0, V)``.
        options: loss options.
        class_weight: optional ``(V,)`` per-class weights (for the smoothing statistic).
        argmax_out: optional ``(n,)`` int64, receives each row's argmax (found with the maximum).

    Returns:
        ``(exp_shifted, stats, row_sum)``: ``exp_shifted`` ``(n, V)`` holds ``exp(z - max_row)``,
        ``stats`` the :class:`~tokenloss.ops.rowwise.RowStatistics`, ``row_sum`` ``(n,)`` the sum
        of ``exp_shifted`` (so ``softmax = exp_shifted / row_sum``).
    """
    z = capped(logits, options.softcap)  # no copy for float32/float64 without a cap
    shift = finite_shift(row_maximum(z, argmax_out))
    shifted = z.sub_(shift.unsqueeze(1))  # (n, V) z - m, exact near the maximum
    target_logit = shifted.gather(1, targets.unsqueeze(1)).squeeze(1)
    logit_sum = smoothing_sum(shifted, options, class_weight)
    exp_shifted = shifted.exp_()
    row_sum = exp_shifted.sum(dim=-1)
    return exp_shifted, RowStatistics(shift, row_sum.log(), target_logit, logit_sum), row_sum


def _gradient_inplace(
    exp_shifted: Tensor,
    row_sum: Tensor,
    raw_logits: Tensor,
    targets: Tensor,
    coefficients: tuple[Tensor, Tensor, Tensor],
    row_scale: Tensor,
    options: LossOptions,
    class_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Turns ``exp_shifted`` ``(n, V)`` into the gradient w.r.t. the raw logits, in place, up to a row factor.

    With ``softmax = exp_shifted / row_sum`` and the unscaled coefficients ``(alpha, beta, delta)``
    of :func:`~tokenloss.ops.rowwise.loss_and_coefficients`, the gradient of row ``i`` is
    ``row_scale[i] * (alpha * softmax - beta * onehot - delta)`` times the soft-capping derivative
    ``1 - tanh(x / c) ** 2`` (recomputed from ``raw_logits``, which it then overwrites; only with a
    softcap). Equal to :func:`tokenloss.ops.rowwise.chunk_gradient` (tested).

    Without z-loss and focal loss ``alpha`` is 1, so the per-row factor ``row_scale / row_sum``
    commutes out of the ``(n, V)`` buffer: the buffer becomes ``exp_shifted - row_sum * (beta *
    onehot + delta)`` and the factor is returned, for the caller to apply to the ``(n, D)`` sides of
    the products instead (one pass over ``(n, V)`` saved). Otherwise the buffer is scaled here.

    Returns:
        ``(grad, factor)``: the gradient is ``factor[:, None] * grad``; ``factor`` ``(n,)`` or None for 1.
    """
    alpha, beta, delta = coefficients
    if options.z_loss == 0 and options.focal_gamma == 0 and class_weight is None:  # alpha == 1
        factor = torch.where(row_scale != 0, row_scale / row_sum, torch.zeros_like(row_scale))
        onehot, uniform = beta * row_sum, delta * row_sum
    else:
        alpha, onehot, uniform = scale_coefficients(alpha, beta, delta, row_scale)
        exp_shifted.mul_((alpha / row_sum).unsqueeze(1))
        factor = None
    grad = exp_shifted
    grad.scatter_add_(1, targets.unsqueeze(1), -onehot.unsqueeze(1))
    subtract_smoothing(grad, uniform, options, class_weight)
    if options.softcap is not None:
        if raw_logits.dtype == grad.dtype:
            derivative = raw_logits.div_(options.softcap).tanh_()
        else:
            derivative = torch.tanh(raw_logits.to(grad.dtype) / options.softcap)
        grad.mul_(derivative.square_().neg_().add_(1))
    return grad, factor


class GradientSink:
    """Where the gradients of one call go: ``(M, D)`` grad_hidden rows, and float32/float64
    accumulators for grad_weight ``(V, D)`` and grad_bias ``(V,)``, each only if needed.

    The buffers start uninitialised: every grad_hidden row is written by exactly one chunk, and the
    first chunk writes grad_weight instead of adding to it (no pass to zero 0.5 GiB at V = 128k).
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]) -> None:
        acc = accumulation_dtype(weight.dtype)
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None
        self._weight_written = False

    def add_chunk(
        self, rows: slice, grad: Tensor, factor: Tensor | None, grad_lowp: Tensor | None, hidden: Tensor, weight: Tensor
    ) -> None:
        """Adds one chunk whose gradient of the logits is ``factor[:, None] * grad``.

        ``grad`` ``(n, V)`` is in the accumulation dtype; ``grad_lowp`` is the whole gradient
        (factor applied) in the input dtype for bf16/fp16 inputs, None for float32/float64;
        ``hidden`` ``(n, D)``; ``factor`` ``(n,)`` or None for 1.
        """
        if self.hidden is not None:
            out = self.hidden[rows]
            if grad_lowp is not None:
                torch.mm(grad_lowp, weight, out=out)  # (n, D)
            else:
                torch.mm(grad, weight, out=out)
                if factor is not None:
                    out.mul_(factor.unsqueeze(1))
        if self.weight is None and self.bias is None:
            return
        scaled_hidden = hidden.to(grad.dtype)
        if factor is not None:
            scaled_hidden = scaled_hidden * factor.unsqueeze(1)  # (n, D): cheaper than scaling (n, V)
        if self.weight is not None:
            if self._weight_written:
                self.weight.addmm_(grad.t(), scaled_hidden)  # (V, D) += (V, n) @ (n, D)
            else:
                torch.mm(grad.t(), scaled_hidden, out=self.weight)
                self._weight_written = True
        if self.bias is not None:
            if factor is None:
                self.bias.add_(grad.sum(dim=0))
            else:
                self.bias.addmv_(grad.t(), factor)

    def gradients(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_hidden, grad_weight, grad_bias)`` once every chunk is added (zeros if there were none)."""
        if self.weight is not None and not self._weight_written:
            self.weight.zero_()
        return self.hidden, self.weight, self.bias


def _fused_chunks(
    hidden: Tensor,  # (M, D) counted rows only
    weight: Tensor,  # (V, D)
    bias: Tensor | None,  # (V,)
    targets: Tensor,  # (M,) int64 in [0, V)
    weights: Tensor,  # (M,) accumulation dtype, > 0 or token weight
    options: LossOptions,
    chunk_rows: int,
    *,
    row_scale: Tensor | None,
    sink: GradientSink | None,
    class_weights: ClassWeights | None = None,
    predicted: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward chunk loop: per-row losses ``(M,)``, and the gradients into ``sink`` if given.

    ``row_scale`` ``(M,)`` multiplies each row's gradient (weight / denominator for ``"mean"``).
    Returns ``(loss, shift, log_sum, alpha, beta, delta)``, each ``(M,)`` in the accumulation dtype; the
    coefficients are unscaled (what ``"none"`` saves for its backward pass). ``predicted`` ``(M,)``
    int64, when given, receives each row's argmax.
    """
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    outputs = [torch.empty(n_rows, dtype=acc, device=hidden.device) for _ in range(6)]
    buffer = logits_buffer(hidden, weight, chunk_rows)  # (n, V): the one big tensor
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows]
        logits = chunk_logits(h, weight, bias, buffer)
        class_weight = None if class_weights is None else class_weights.weight
        probs, stats, row_sum = _statistics_inplace(
            logits, targets[rows], options, class_weight, None if predicted is None else predicted[rows]
        )
        loss, alpha, beta, delta = loss_and_coefficients(
            stats,
            weights[rows],
            vocab_size,
            options,
            class_weights=None if class_weights is None else class_weights.rows(rows),
        )
        for out, value in zip(outputs, (loss, stats.shift, stats.log_sum, alpha, beta, delta)):
            out[rows] = value
        if sink is not None:
            grad, factor = _gradient_inplace(
                probs, row_sum, logits, targets[rows], (alpha, beta, delta), row_scale[rows], options, class_weight
            )
            sink.add_chunk(rows, grad, factor, _input_dtype_copy(grad, factor, logits), h, weight)
            del grad
        del logits, probs  # never hold two chunks: the next one's logits may be a fresh tensor
    return tuple(outputs)


def _input_dtype_copy(grad: Tensor, factor: Tensor | None, buffer: Tensor) -> Tensor | None:
    """For bf16/fp16 inputs, ``factor[:, None] * grad`` cast into the input-dtype ``buffer`` (one pass); else None."""
    if buffer.dtype == grad.dtype:
        return None
    if factor is None:
        return buffer.copy_(grad)
    return torch.mul(grad, factor.unsqueeze(1), out=buffer)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``(M, D)`` counted hidden rows, ``(V, D)`` weight, ``(V,)`` bias -> the loss.

    ``reduction`` ``"mean"``/``"sum"``: returns the reduced 0-dim loss, gradients computed in the
    forward pass. ``"none"``: returns ``(M,)`` per-row losses, gradients recomputed in backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (M, D)
        weight: Tensor,  # (V, D)
        bias: Tensor | None,  # (V,) or None
        targets: Tensor,  # (M,) int64
        weights: Tensor,  # (M,) float32
        denominator: Tensor,  # () float32, for "mean"
        options: LossOptions,
        chunk_rows: int,
        needs: tuple[bool, bool, bool],  # grad of hidden, weight, bias wanted
        class_weights: ClassWeights | None,  # of the M rows
        side: SideRows | None,  # filled with the M rows' lse (and argmax) when given
    ) -> Tensor:
        acc = accumulation_dtype(hidden.dtype)
        ctx.class_weights = class_weights
        weights = weights.to(acc)
        ctx.options, ctx.chunk_rows, ctx.needs = options, chunk_rows, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grad_now = options.reduction != "none" and any(needs)
        row_scale = None
        if grad_now:
            row_scale = weights / denominator.to(acc) if options.reduction == "mean" else weights
        sink = GradientSink(hidden, weight, bias, needs) if grad_now else None
        predicted = None
        if side is not None and side.argmax:
            predicted = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        loss, shift, log_sum, alpha, beta, delta = _fused_chunks(
            hidden,
            weight,
            bias,
            targets,
            weights,
            options,
            chunk_rows,
            row_scale=row_scale,
            sink=sink,
            class_weights=class_weights,
            predicted=predicted,
        )
        if side is not None:
            side.lse, side.predicted = shift + log_sum, predicted
        if options.check_inputs:
            counted = torch.ones_like(shift, dtype=torch.bool)  # only counted rows reach this Function
            check_finite_rows(shift + log_sum, counted, "logits (hidden @ weight.T + bias)", loss)
        if options.reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets, weights, shift, log_sum, alpha, beta, delta)
            ctx.grads = None
            return loss.float() if acc != torch.float64 else loss
        ctx.grads = sink
        total = loss.sum()
        return total / denominator.to(acc) if options.reduction == "mean" else total

    @staticmethod
    @eager_under_compile
    @backward_without_autocast
    def backward(ctx, grad_output: Tensor):
        refuse_double_backward("linear_cross_entropy")
        if ctx.options.reduction == "none":
            grads = _recompute_gradients(ctx, grad_output)
        else:
            sink = ctx.grads
            if sink is None:
                raise RuntimeError(
                    "linear_cross_entropy computes its gradients during the forward pass and hands them "
                    "out once: a second backward through the same graph (retain_graph=True) is not "
                    "supported; run the forward again, or use reduction='none' and reduce yourself"
                )
            ctx.grads = None  # drop our reference so autograd can take the tensors without a copy
            grads = sink.gradients()
            scale = grad_output.reshape(())
            # loss.backward() passes 1: on the CPU, where reading it costs nothing, skip a pass over (V, D)
            if scale.device.type != "cpu" or scale.item() != 1:
                grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None, None)


def _recompute_gradients(ctx, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of ``"none"``: recompute each chunk's logits, softmax from the saved statistics, gradient."""
    hidden, weight, bias, targets, weights, shift, log_sum, alpha, beta, delta = ctx.saved_tensors
    options, chunk_rows = ctx.options, ctx.chunk_rows
    needs = tuple(ctx.needs_input_grad[:3])
    row_scale = grad_rows.to(weights.dtype) * weights
    sink = GradientSink(hidden, weight, bias, needs)
    buffer = logits_buffer(hidden, weight, chunk_rows)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows]
        logits = chunk_logits(h, weight, bias, buffer)
        z = capped(logits, options.softcap)  # the logits buffer itself for float32/float64 without a cap
        exp_shifted = z.sub_(shift[rows].unsqueeze(1)).exp_()  # softmax = exp_shifted / exp(log_sum)
        coefficients = (alpha[rows], beta[rows], delta[rows])
        grad, factor = _gradient_inplace(
            exp_shifted,
            log_sum[rows].exp(),
            logits,
            targets[rows],
            coefficients,
            row_scale[rows],
            options,
            None if ctx.class_weights is None else ctx.class_weights.weight,
        )
        sink.add_chunk(rows, grad, factor, _input_dtype_copy(grad, factor, logits), h, weight)
        del logits, z, exp_shifted, grad  # never hold two chunks
    return sink.gradients()


def gradients_needed(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Whether the gradient of hidden, weight and bias is wanted (grad mode on and the tensor requires it)."""
    grad_on = torch.is_grad_enabled()
    return (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )


def counted_row_index(counted: Tensor) -> Tensor | None:
    """Indices ``(M,)`` of the rows that count, or None when all do (then nothing is copied).

    One host sync on CUDA (``nonzero`` must know M to size its result).
    """
    index = counted.nonzero().squeeze(1)
    return None if index.numel() == counted.numel() else index


def linear_cross_entropy_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prepared: PreparedTargets,
    options: LossOptions,
    *,
    side: SideRows | None = None,
) -> Tensor:
    """The loss of ``hidden @ weight.T + bias`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` float32, bfloat16, float16 or float64.
        weight: ``(V, D)`` same dtype and device.
        bias: ``(V,)`` same dtype and device, or None.
        prepared: targets from :func:`tokenloss.options.prepare_targets` for the N rows.
        options: loss options; ``options.reduction`` chooses the output, ``options.chunk_size``
            the rows per chunk (None: :func:`fused_chunk_rows`).
        side: filled with the ``(N,)`` rows' log-sum-exp (and argmax) when given (0 and -1 where a
            row does not count).

    Returns:
        ``"mean"``/``"sum"``: a 0-dim float32 tensor (float64 for float64 inputs), the sum divided
        by ``prepared.denominator`` for ``"mean"``. ``"none"``: ``(N,)`` per-row losses, 0 where a
        row does not count.
    """
    n_rows = hidden.shape[0]
    index = counted_row_index(prepared.counted)
    rows_hidden, targets, weights = hidden, prepared.targets, prepared.weights
    class_weights = prepared.class_weights
    if index is not None:
        rows_hidden = hidden.index_select(0, index)  # (M, D): dropped rows never reach a product
        targets, weights = targets.index_select(0, index), weights.index_select(0, index)
        class_weights = None if class_weights is None else class_weights.rows(index)
    chunk_rows = fused_chunk_rows(
        rows_hidden.shape[0], weight.shape[0], chunk_size=options.chunk_size, device=hidden.device
    )
    needs = gradients_needed(hidden, weight, bias)
    loss = LinearCrossEntropyFunction.apply(
        rows_hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        targets,
        weights,
        prepared.denominator,
        options,
        chunk_rows,
        needs,
        class_weights,
        side,
    )
    if side is not None and index is not None:  # back to all N rows
        side.lse = side.lse.new_zeros(n_rows).index_copy(0, index, side.lse)
        if side.predicted is not None:
            side.predicted = side.predicted.new_full((n_rows,), -1).index_copy(0, index, side.predicted)
    if options.reduction != "none" or index is None:
        return loss
    return loss.new_zeros(n_rows).index_copy(0, index, loss)
