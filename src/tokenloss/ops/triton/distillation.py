"""The per-chunk math of the fused distillation loss in Triton: one read of both heads' logits for the loss,
one more read and one write for the gradient.

:func:`tokenloss.distillation.chunk_loss_and_gradient` does the same with torch ops (about a dozen
passes over each chunk). Here, one program per row streams the row in ``BLOCK_V`` tiles:

- :func:`_loss_kernel`: online log-sum-exps of the tempered student and teacher logits ``s``, ``t``
  (``a``, ``b``), and with them the one sum each divergence needs, rescaled as the running maximum
  grows: ``sum e^(t - m_t) (t - s)`` (forward KL), ``sum e^(s - m_s) (s - t)`` (reverse KL) or
  ``sum e^(t - m_t) s`` (cross-entropy), each 0 where its probability is 0. The row's loss follows
  from them, with the hard term (``a`` minus the target's ``s``) at ``T = 1``.
  The JSD needs ``log m = log(beta p + (1 - beta) q)``, hence both normalisers: it reads the row a
  second time for ``beta KL(p || m) + (1 - beta) KL(q || m)``.
- :func:`_gradient_kernel`: ``(1 - w) * soft + w * (q - onehot)`` with ``soft = (q - p) / T`` (forward
  KL, cross-entropy), ``q (s - t + b - a - KL) / T`` (reverse KL) or
  ``(1 - beta) q (log q - log m - KL(q || m)) / T`` (JSD), written once.

The products stay torch's (cuBLAS). Accumulation in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloss.ops.rowwise import accumulation_dtype
from tokenloss.ops.triton.common import block_v, check_device, on_device_of, triton_dtype

MAX_BLOCK_V = 4096
NUM_WARPS = 8
_KINDS = {"forward_kl": 0, "reverse_kl": 1, "cross_entropy": 2, "jsd": 3}


def _block_v(vocab_size: int) -> int:
    return block_v(vocab_size, MAX_BLOCK_V)  # read at each launch: the tests lower MAX_BLOCK_V


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """``log(beta p + (1 - beta) q)`` of a tile, ``-inf`` where both are 0."""
    x = log_p + log_beta
    y = log_q + log_1m_beta
    top = tl.maximum(x, y)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def _loss_kernel(
    student_ptr,  # (n, V) raw student logits, unit column stride
    teacher_ptr,  # (n, V) raw teacher logits, unit column stride
    targets_ptr,  # (n,) int64 (read with HARD)
    loss_ptr,  # (n,) ACC out
    soft_ptr,  # (n,) ACC out: the divergence alone, without the hard term (JSD: its KL(q || m) only)
    a_ptr,  # (n,) ACC out: log-sum-exp of s
    b_ptr,  # (n,) ACC out: log-sum-exp of t
    n_cols,
    stride_student,
    stride_teacher,
    inv_temperature,
    hard_weight,
    beta,
    log_beta,
    log_1m_beta,
    KIND: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 cross-entropy, 3 JSD (0 < beta < 1)
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * stride_student
    t_row = teacher_ptr + row * stride_teacher
    offsets = tl.arange(0, BLOCK_V)
    max_s = tl.full((), float("-inf"), ACC)  # running maxima
    max_t = tl.full((), float("-inf"), ACC)
    shift_s = tl.zeros((), ACC)  # the finite shifts of the sums (0 while a row is all -inf so far)
    shift_t = tl.zeros((), ACC)
    sum_s = tl.zeros((), ACC)
    sum_t = tl.zeros((), ACC)
    acc = tl.zeros((), ACC)  # the divergence's sum, on the scale of its own head's maximum
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        s = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature
        t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature
        max_s = tl.maximum(max_s, tl.max(s, axis=0))
        max_t = tl.maximum(max_t, tl.max(t, axis=0))
        new_shift_s = tl.where(max_s == float("-inf"), 0.0, max_s)
        new_shift_t = tl.where(max_t == float("-inf"), 0.0, max_t)
        scale_s = tl.where(sum_s == 0, 0.0, tl.exp(shift_s - new_shift_s))
        scale_t = tl.where(sum_t == 0, 0.0, tl.exp(shift_t - new_shift_t))
        shift_s = new_shift_s
        shift_t = new_shift_t
        e_s = tl.exp(s - shift_s)
        e_t = tl.exp(t - shift_t)
        if KIND == 0:
            term = e_t * tl.where(e_t > 0, t - s, 0.0)
            acc = acc * scale_t + tl.sum(term, axis=0)
        elif KIND == 1:
            term = e_s * tl.where(e_s > 0, s - t, 0.0)
            acc = acc * scale_s + tl.sum(term, axis=0)
        elif KIND == 2:
            term = e_t * tl.where(e_t > 0, s, 0.0)
            acc = acc * scale_t + tl.sum(term, axis=0)
        sum_s = sum_s * scale_s + tl.sum(e_s, axis=0)
        sum_t = sum_t * scale_t + tl.sum(e_t, axis=0)
    a = shift_s + tl.log(sum_s)
    b = shift_t + tl.log(sum_t)
    if KIND == 0:
        loss = acc / sum_t + a - b  # sum p (t - s) + a - b
    elif KIND == 1:
        loss = acc / sum_s + b - a  # sum q (s - t) + b - a
    elif KIND == 2:
        loss = a - acc / sum_t  # a - sum p s
    if KIND == 3:  # log m needs both normalisers: a second read of the row
        kl_p = tl.zeros((), ACC)
        kl_q = tl.zeros((), ACC)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            valid = cols < n_cols
            log_q = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature - a
            log_p = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature - b
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            kl_p += tl.sum(p * tl.where(p > 0, log_p - log_m, 0.0), axis=0)
            kl_q += tl.sum(q * tl.where(q > 0, log_q - log_m, 0.0), axis=0)
        loss = beta * kl_p + (1.0 - beta) * kl_q
        tl.store(soft_ptr + row, kl_q)
    else:
        tl.store(soft_ptr + row, loss)
    if HARD:
        target = tl.load(targets_ptr + row)
        target_s = tl.load(s_row + target).to(ACC)  # T = 1 whenever HARD
        loss = (1.0 - hard_weight) * loss + hard_weight * (a - target_s)
    tl.store(loss_ptr + row, loss)
    tl.store(a_ptr + row, a)
    tl.store(b_ptr + row, b)


@triton.jit
def _gradient_kernel(
    student_ptr,
    teacher_ptr,
    targets_ptr,
    soft_ptr,  # (n,) ACC: the soft divergence of the row (reverse KL's KL; the JSD's KL(q || m))
    a_ptr,
    b_ptr,
    grad_ptr,  # (n, V) ACC out
    n_cols,
    stride_student,
    stride_teacher,
    stride_grad,
    inv_temperature,
    hard_weight,
    beta,
    log_beta,
    log_1m_beta,
    KIND: tl.constexpr,
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * stride_student
    t_row = teacher_ptr + row * stride_teacher
    g_row = grad_ptr + row * stride_grad
    offsets = tl.arange(0, BLOCK_V)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    kl = tl.load(soft_ptr + row)
    target = tl.full((), -1, tl.int64)
    if HARD:
        target = tl.load(targets_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        s = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature
        t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(ACC) * inv_temperature
        q = tl.exp(s - a)
        if KIND == 1:
            soft = q * tl.where(q > 0, s - t + b - a - kl, 0.0)
        elif KIND == 3:  # (1 - beta) q (log q - log m - KL(q || m))
            log_m = _log_mixture(t - b, s - a, log_beta, log_1m_beta)
            soft = (1.0 - beta) * q * tl.where(q > 0, s - a - log_m - kl, 0.0)
        else:
            soft = q - tl.exp(t - b)
        grad = (1.0 - hard_weight) * inv_temperature * soft
        if HARD:
            grad += hard_weight * q
            grad = tl.where(cols == target, grad - hard_weight, grad)
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def chunk_loss_and_gradient(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    gradient: bool,
    first_row: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """:func:`tokenloss.distillation.chunk_loss_and_gradient` by the kernels: the same arguments, results
    and errors (the chunks are read, not overwritten)."""
    from tokenloss.distillation import raise_non_finite, resolved_divergence

    check_device(_loss_kernel, student_logits, teacher_logits)
    student = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    teacher = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    n_rows, n_cols = student.shape
    acc = accumulation_dtype(student.dtype)
    loss, soft, a, b = (torch.empty(n_rows, dtype=acc, device=student.device) for _ in range(4))
    divergence = resolved_divergence(divergence, beta)
    hard = bool(hard_weight)
    if hard and temperature != 1.0:
        raise ValueError("the distillation kernels take a hard term at temperature 1 only")
    target_rows = targets if hard else loss  # an unread placeholder without the hard term
    mixture = (float(beta), math.log(beta), math.log1p(-beta)) if divergence == "jsd" else (0.5, 0.0, 0.0)
    common = dict(KIND=_KINDS[divergence], HARD=hard, ACC=triton_dtype(acc), BLOCK_V=_block_v(n_cols),
                  num_warps=NUM_WARPS)  # fmt: skip
    if n_rows == 0:
        return loss, (torch.empty(student.shape, dtype=acc, device=student.device) if gradient else None)
    with on_device_of(student):
        _loss_kernel[(n_rows,)](
            student, teacher, target_rows, loss, soft, a, b, n_cols, student.stride(0), teacher.stride(0),
            1.0 / temperature, float(hard_weight), *mixture, **common,
        )  # fmt: skip
    raise_non_finite(a, b, loss, first_row)
    if not gradient:
        return loss, None
    grad = torch.empty(student.shape, dtype=acc, device=student.device)
    with on_device_of(student):
        _gradient_kernel[(n_rows,)](
            student, teacher, target_rows, soft, a, b, grad, n_cols, student.stride(0), teacher.stride(0),
            grad.stride(0), 1.0 / temperature, float(hard_weight), *mixture, **common,
        )  # fmt: skip
    return loss, grad
