"""Per-token log-probabilities and entropy of the sampled tokens, for RL fine-tuning (GRPO, PPO, DAPO).

For logits ``x`` (or ``hidden @ weight.T + bias``) at temperature ``T``, with ``z = x / T`` and
``p = softmax(z)``::

    logp[i]    = log p_i[tokens[i]] = z_i[t] - logsumexp(z_i)
    entropy[i] = -sum_j p_ij log p_ij

Both are differentiable, each with its own upstream gradient per token (a policy-gradient term on
``logp`` and an entropy bonus on ``entropy`` in one backward pass)::

    d/dz (g * logp + h * entropy) = g * (onehot - p) - h * p * (log p + entropy)

and the gradient with respect to ``x`` is that divided by ``T``. As in the loss
(:mod:`tokenloss.ops.rowwise`), the statistics are kept relative to each row's maximum, the forward
pass keeps only ``(N,)`` numbers, and the backward pass recomputes the softmax one chunk of rows at
a time; the fused variant never holds more than one chunk of logits and drops the rows that do not
count before the matrix products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenloss.ops import resolve_impl
from tokenloss.ops.autocast import autocast_inputs, autocast_off, backward_without_autocast
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.cross_entropy import plain_chunk_rows
from tokenloss.ops.linear_cross_entropy import (
    GradientSink,
    chunk_logits,
    counted_row_index,
    fused_chunk_rows,
    logits_buffer,
)
from tokenloss.ops.rowwise import (
    accumulation_dtype,
    cache_blocks,
    finite_shift,
    refuse_double_backward,
    row_maximum,
)
from tokenloss.options import LossOptions, check_linear_inputs, check_logits, prepare_targets


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _chunk_statistics(
    z: Tensor, targets: Tensor, entropy: bool, argmax_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(shift, log_sum, logp, entropy)`` ``(n,)`` of tempered logits ``z`` ``(n, V)`` in the
    accumulation dtype (and each row's argmax into ``argmax_out`` when given). ``z`` is overwritten
    (it is the caller's own chunk)."""
    shift = finite_shift(row_maximum(z, argmax_out))
    x = z.sub_(shift.unsqueeze(1))  # (n, V) z - m: exact near the maximum
    target = x.gather(1, targets.unsqueeze(1)).squeeze(1)
    e = torch.exp(x)  # (n, V)
    total = e.sum(dim=-1)
    log_sum = total.log()
    ent = None
    if entropy:  # H = log S - sum(e * x) / S; e * x is 0 * -inf = NaN where a logit is -inf: take 0
        ent = log_sum - x.mul_(e).nan_to_num_(nan=0.0).sum(dim=-1) / total
    return shift, log_sum, target - log_sum, ent


def _chunk_gradient(
    z: Tensor, targets: Tensor, shift: Tensor, log_sum: Tensor, ent: Tensor, g_logp: Tensor, g_ent: Tensor, inv_t: float
) -> Tensor:
    """``d(g * logp + h * entropy) / dx`` ``(n, V)`` for tempered logits ``z = x / T``, in place in ``z``.

    With ``x = z - m``, ``p = e^x / S`` and ``log p = x - log S``::

        grad = -p * (g + h * (log p + H)) + g * onehot
             = e^x * (x * (-h / S) - (g + h * (H - log S)) / S) + g * onehot

    so the per-row factors fold into two scalars and the chunk takes five passes.
    """
    inv_s = torch.exp(-log_sum)  # 1 / S
    slope = (-g_ent * inv_s).unsqueeze(1)
    offset = ((g_logp + g_ent * (ent - log_sum)) * inv_s).unsqueeze(1)
    # clamped: a -inf logit (p = 0) would make e^x * x = 0 * -inf = NaN; below -1e4, e^x is 0 in float64 too
    x = z.sub_(shift.unsqueeze(1)).clamp_(min=-1e4)
    e = torch.exp(x)
    grad = x.mul_(slope).sub_(offset).mul_(e)
    grad.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1))
    return grad if inv_t == 1 else grad.mul_(inv_t)


def _rows_statistics(
    raw: Tensor,
    targets: Tensor,
    temperature: float,
    want_entropy: bool,
    argmax_out: Tensor | None,
    *,
    triton: bool,
    own: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(shift, log_sum, logp, entropy)`` of a chunk of raw logits ``(n, V)``, by the torch ops or the
    Triton kernel; ``own``: the chunk is ours (a product) and may be overwritten."""
    if triton:
        from tokenloss.ops.triton import logprobs as kernels

        return kernels.statistics(raw, targets, temperature, want_entropy, argmax_out)
    acc = accumulation_dtype(raw.dtype)
    blocks = cache_blocks(raw.shape[0], raw.shape[1], raw.device)
    if len(blocks) == 1:
        return _chunk_statistics(_tempered(raw, acc, temperature, copy=not own), targets, want_entropy, argmax_out)
    shift, log_sum, logp = (torch.empty(raw.shape[0], dtype=acc, device=raw.device) for _ in range(3))
    ent = torch.empty_like(shift) if want_entropy else None
    for rows in blocks:
        top = None if argmax_out is None else argmax_out[rows]
        z = _tempered(raw[rows], acc, temperature, copy=not own)
        shift[rows], log_sum[rows], logp[rows], block_ent = _chunk_statistics(z, targets[rows], want_entropy, top)
        if ent is not None:
            ent[rows] = block_ent
    return shift, log_sum, logp, ent


def _rows_gradient(
    raw: Tensor,
    targets: Tensor,
    shift: Tensor,
    log_sum: Tensor,
    ent: Tensor,
    g_logp: Tensor,
    g_ent: Tensor,
    temperature: float,
    *,
    triton: bool,
    own: bool,
) -> Tensor:
    """``d(g logp + h entropy)/d raw`` ``(n, V)`` in the accumulation dtype (overwriting ``raw`` when ``own``
    and it is already in that dtype, on the torch path)."""
    acc = shift.dtype
    if triton:
        from tokenloss.ops.triton import logprobs as kernels

        out = torch.empty(raw.shape, dtype=acc, device=raw.device)
        return kernels.gradient(raw, targets, shift, log_sum, ent, g_logp, g_ent, temperature, out)
    grad = raw if own and raw.dtype == acc else torch.empty(raw.shape, dtype=acc, device=raw.device)
    for rows in cache_blocks(raw.shape[0], raw.shape[1], raw.device):
        z = _tempered(raw[rows], acc, temperature, copy=not own)
        block = _chunk_gradient(z, targets[rows], shift[rows], log_sum[rows], ent[rows], g_logp[rows], g_ent[rows],
                                1 / temperature)  # fmt: skip
        if block.data_ptr() != grad[rows].data_ptr():
            grad[rows] = block
    return grad


def _tempered(logits: Tensor, acc: torch.dtype, temperature: float, *, copy: bool = False) -> Tensor:
    """``logits / T`` in the accumulation dtype; a fresh tensor when ``copy`` (the caller's logits must
    not be overwritten), else possibly ``logits`` itself (a chunk product the caller owns)."""
    z = logits.to(acc, copy=copy)
    return z if temperature == 1 else z.div_(temperature)


def _check_finite(logp: Tensor, log_sum: Tensor, name: str) -> None:
    bad = ~torch.isfinite(logp) | ~torch.isfinite(log_sum)
    if bool(bad.any()):
        raise ValueError(
            f"{name} give a non-finite log-probability in {int(bad.sum())} counted row(s): NaN or inf logits, or "
            "-inf at the sampled token; pass check_inputs=False to skip this check"
        )


class _TokenLogprobsFunction(torch.autograd.Function):
    """``(N, V)`` logits of the counted rows -> ``(N,)`` logp and entropy; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, want_entropy, chunk_rows, check, predicted, triton):
        acc = accumulation_dtype(logits.dtype)
        n_rows = logits.shape[0]
        shift, log_sum, logp = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in range(3))
        ent = torch.zeros(n_rows, dtype=acc, device=logits.device)
        chunk_rows = max(n_rows, 1) if triton else chunk_rows  # the kernel streams each row: no (n, V) scratch
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            top = None if predicted is None else predicted[rows]
            shift[rows], log_sum[rows], logp[rows], chunk_ent = _rows_statistics(
                logits[rows], targets[rows], temperature, want_entropy, top, triton=triton, own=False
            )
            if chunk_ent is not None:
                ent[rows] = chunk_ent
        if check:
            _check_finite(logp, log_sum, "logits")
        ctx.save_for_backward(logits, targets, shift, log_sum, ent)
        ctx.temperature, ctx.chunk_rows, ctx.triton = temperature, chunk_rows, triton
        return logp, ent

    @staticmethod
    @eager_under_compile
    def backward(ctx, g_logp, g_ent):
        refuse_double_backward("token_logprobs")
        logits, targets, shift, log_sum, ent = ctx.saved_tensors
        acc = shift.dtype
        g_logp, g_ent = g_logp.to(acc), g_ent.to(acc)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            if ctx.triton:  # written once, in the logits' dtype
                from tokenloss.ops.triton import logprobs as kernels

                kernels.gradient(logits[rows], targets[rows], shift[rows], log_sum[rows], ent[rows], g_logp[rows],
                                 g_ent[rows], ctx.temperature, grad[rows])  # fmt: skip
                continue
            grad[rows] = _rows_gradient(
                logits[rows], targets[rows], shift[rows], log_sum[rows], ent[rows], g_logp[rows], g_ent[rows],
                ctx.temperature, triton=False, own=False,
            )  # fmt: skip
        return grad, None, None, None, None, None, None, None


class _LinearTokenLogprobsFunction(torch.autograd.Function):
    """``(M, D)`` counted hidden rows, ``(V, D)`` weight, ``(V,)`` bias -> ``(M,)`` logp and entropy,
    never more than one chunk of logits; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, chunk_rows, check, predicted, triton):
        acc = accumulation_dtype(hidden.dtype)
        n_rows = hidden.shape[0]
        shift, log_sum, logp = (torch.empty(n_rows, dtype=acc, device=hidden.device) for _ in range(3))
        ent = torch.zeros(n_rows, dtype=acc, device=hidden.device)
        buffer = logits_buffer(hidden, weight, chunk_rows)  # the fused loss's (n, V) buffer, or None for oneDNN
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            raw = chunk_logits(hidden[rows], weight, bias, buffer)  # (n, V): one chunk, our own
            top = None if predicted is None else predicted[rows]
            shift[rows], log_sum[rows], logp[rows], chunk_ent = _rows_statistics(
                raw, targets[rows], temperature, want_entropy, top, triton=triton, own=True
            )
            if chunk_ent is not None:
                ent[rows] = chunk_ent
            del raw
        if check:
            _check_finite(logp, log_sum, "logits (hidden @ weight.T + bias)")
        ctx.save_for_backward(hidden, weight, bias, targets, shift, log_sum, ent)
        ctx.temperature, ctx.chunk_rows, ctx.triton = temperature, chunk_rows, triton
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return logp, ent

    @staticmethod
    @eager_under_compile
    @backward_without_autocast
    def backward(ctx, g_logp, g_ent):
        refuse_double_backward("linear_token_logprobs")
        hidden, weight, bias, targets, shift, log_sum, ent = ctx.saved_tensors
        acc = shift.dtype
        g_logp, g_ent = g_logp.to(acc), g_ent.to(acc)
        sink = GradientSink(hidden, weight, bias, tuple(ctx.needs_input_grad[:3]))
        buffer = logits_buffer(hidden, weight, ctx.chunk_rows)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows]
            grad = _rows_gradient(
                chunk_logits(h, weight, bias, buffer), targets[rows], shift[rows], log_sum[rows], ent[rows],
                g_logp[rows], g_ent[rows], ctx.temperature, triton=ctx.triton, own=True,
            )  # fmt: skip
            low = grad.to(hidden.dtype) if hidden.dtype != acc else None
            sink.add_chunk(rows, grad, None, low, h, weight)
            del grad, low
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(sink.gradients(), ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


def _prepare(leading_shape, tokens, vocab_size, input_name, device, *, shift, mask, ignore_index, check_inputs,
             chunk_size):  # fmt: skip
    options = LossOptions(
        ignore_index=ignore_index, shift=shift, reduction="none", check_inputs=check_inputs, chunk_size=chunk_size
    )
    prepared = prepare_targets(
        leading_shape, tokens, vocab_size, options, mask=mask, input_name=input_name, device=device
    )
    return options, prepared


def _outputs(prepared, index, logp, ent, return_entropy: bool, predicted: Tensor | None, targets: Tensor):
    """Rows back in place (0 where a row does not count), shaped like the tokens after the shift."""
    n = prepared.counted.shape[0]
    top1 = None if predicted is None else predicted == targets  # (M,) bool, the counted rows
    if index is not None:
        logp = logp.new_zeros(n).index_copy(0, index, logp)
        ent = ent.new_zeros(n).index_copy(0, index, ent)
        if top1 is not None:
            top1 = top1.new_zeros(n).index_copy(0, index, top1)
    outputs = (prepared.reduce(logp, "none"),)
    if return_entropy:
        outputs += (prepared.reduce(ent, "none"),)
    if top1 is not None:
        outputs += (prepared.reduce(top1 & prepared.counted, "none"),)
    return outputs[0] if len(outputs) == 1 else outputs


def _uses_triton(impl: str, tensor: Tensor) -> bool:
    """Whether ``impl`` runs the Triton kernels for tensors on ``tensor``'s device (ValueError for a bad impl)."""
    return resolve_impl(impl, tensor.device) == "triton"


def _top1_buffer(return_top1: object, n_rows: int, device: torch.device) -> Tensor | None:
    if not isinstance(return_top1, bool):
        raise TypeError(f"return_top1 must be True or False, got {return_top1!r}")
    return torch.empty(n_rows, dtype=torch.long, device=device) if return_top1 else None


@eager_under_compile
def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    shift: bool | int = False,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    chunk_size: int | None = None,
    check_inputs: bool = True,
    return_top1: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Log-probability of each token, and the entropy of each prediction, from ``(..., V)`` logits.

    Args:
        logits: ``(..., V)`` float32, bfloat16, float16 or float64.
        tokens: ``(...)`` integer ids (the sampled tokens), the leading shape of ``logits``.
        temperature: ``T > 0``; both outputs are of ``softmax(logits / T)``.
        shift: as in :func:`tokenloss.cross_entropy`: ``logits[..., t, :]`` scores ``tokens[..., t + 1]``.
        mask: optional bool tensor shaped like ``tokens``; only True positions count.
        ignore_index: tokens equal to this do not count.
        return_entropy: return ``(logp, entropy)``; False returns ``logp`` alone (and skips the
            entropy's pass over each chunk).
        chunk_size: rows per chunk (None: about 2**23 logits per chunk).
        check_inputs: raise on a non-finite log-probability or a token outside ``[0, V)`` in a
            counted position (one host sync each on CUDA).
        return_top1: also return ``is_top1``, bool, shaped like ``logp``: whether the token is the
            most likely one (``argmax`` of the logits, ties to the first index; False where a position
            does not count), found with the maximum in the same pass (TRL's token accuracy).
        impl: ``"auto"`` (Triton for CUDA tensors when it is installed, else torch), ``"torch"`` or
            ``"triton"`` (:mod:`tokenloss.ops.triton.logprobs`: one read of each logit forward).

    Returns:
        ``logp`` and ``entropy``: float32 (float64 for float64 logits), shaped like ``tokens`` after
        the shift, 0.0 where a position does not count. Each is differentiable with its own
        upstream gradient.

    Raises:
        TypeError, ValueError: bad shapes, dtypes or options (each names the argument); a
            temperature that is not a finite number > 0; NaN/inf in a counted row.

    Examples:
        >>> import torch, tokenloss as tl
        >>> logp, entropy = tl.token_logprobs(torch.zeros(1, 4), torch.tensor([2]))  # uniform over 4
        >>> round(logp.item(), 4), round(entropy.item(), 4)  # -log 4, log 4
        (-1.3863, 1.3863)
    """
    temperature = _check_temperature(temperature)
    check_logits(logits)
    vocab_size = logits.shape[-1]
    options, prepared = _prepare(
        tuple(logits.shape[:-1]), tokens, vocab_size, "logits", logits.device, shift=shift, mask=mask,
        ignore_index=ignore_index, check_inputs=check_inputs, chunk_size=chunk_size,
    )  # fmt: skip
    rows = logits.reshape(-1, vocab_size)
    index = counted_row_index(prepared.counted)
    targets = prepared.targets
    if index is not None:
        rows, targets = rows.index_select(0, index), targets.index_select(0, index)
    chunk_rows = plain_chunk_rows(vocab_size, options.chunk_size)
    predicted = _top1_buffer(return_top1, rows.shape[0], logits.device)
    logp, ent = _TokenLogprobsFunction.apply(
        rows, targets, temperature, return_entropy, chunk_rows, check_inputs, predicted, _uses_triton(impl, logits)
    )
    return _outputs(prepared, index, logp, ent, return_entropy, predicted, targets)


@eager_under_compile
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    shift: bool | int = False,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    chunk_size: int | None = None,
    check_inputs: bool = True,
    return_top1: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """:func:`token_logprobs` of ``hidden @ weight.T + bias`` without ever holding the ``(N, V)`` logits.

    Args:
        hidden: ``(..., D)`` float32, bfloat16, float16 or float64: the policy's last hidden states.
        weight: ``(V, D)`` the LM head; same dtype and device.
        tokens: ``(...)`` integer ids, the leading shape of ``hidden``.
        bias: optional ``(V,)``.
        temperature, shift, mask, ignore_index, return_entropy, check_inputs, return_top1: as in
            :func:`token_logprobs`.
        impl: as in :func:`token_logprobs`; the products are torch's, the per-chunk statistics and
            gradients the Triton kernels' with ``"triton"``.
        chunk_size: rows per chunk (None: as :func:`tokenloss.linear_cross_entropy`).

    Returns:
        As :func:`token_logprobs`; gradients flow to ``hidden``, ``weight`` and ``bias``. Rows that do
        not count never reach a matrix product; the backward pass recomputes each chunk's logits.

    Examples:
        >>> import torch, tokenloss as tl
        >>> logp = tl.linear_token_logprobs(torch.zeros(1, 3), torch.zeros(4, 3), torch.tensor([2]),
        ...                                 return_entropy=False)
        >>> round(logp.item(), 4)
        -1.3863
    """
    temperature = _check_temperature(temperature)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)  # as nn.Linear under torch.autocast
    check_linear_inputs(hidden, weight, bias)
    vocab_size = weight.shape[0]
    options, prepared = _prepare(
        tuple(hidden.shape[:-1]), tokens, vocab_size, "hidden", hidden.device, shift=shift, mask=mask,
        ignore_index=ignore_index, check_inputs=check_inputs, chunk_size=chunk_size,
    )  # fmt: skip
    rows = hidden.reshape(-1, hidden.shape[-1])
    index = counted_row_index(prepared.counted)
    targets = prepared.targets
    if index is not None:  # rows that do not count never reach a product
        rows, targets = rows.index_select(0, index), targets.index_select(0, index)
    chunk_rows = fused_chunk_rows(rows.shape[0], vocab_size, chunk_size=options.chunk_size, device=hidden.device)
    predicted = _top1_buffer(return_top1, rows.shape[0], hidden.device)
    with autocast_off(hidden.device):
        logp, ent = _LinearTokenLogprobsFunction.apply(
            rows.contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            targets,
            temperature,
            return_entropy,
            chunk_rows,
            check_inputs,
            predicted,
            _uses_triton(impl, hidden),
        )
    return _outputs(prepared, index, logp, ent, return_entropy, predicted, targets)
