"""Knowledge distillation fused with both LM heads: a divergence between a teacher's and a student's
next-token distributions, with neither ``(N, V)`` logits tensor ever held whole.

For each position that counts, with student logits ``s = h_s @ W_s.T + b_s`` and teacher logits
``t = h_t @ W_t.T + b_t`` taken at ``temperature`` ``T``, ``q = softmax(s / T)`` (the student) and
``p = softmax(t / T)`` (the teacher)::

    forward_kl      KL(p || q) = sum p (log p - log q)
    reverse_kl      KL(q || p) = sum q (log q - log p)
    jsd             beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                    (TRL's generalised Jensen-Shannon divergence of GKD: beta = 0 is forward_kl,
                    beta = 1 is reverse_kl, as TRL special-cases them)
    cross_entropy   H(p, q) = -sum p log q  (= forward_kl + H(p); the same gradient)

``0 log 0`` is taken as 0. With ``hard_weight`` ``a > 0`` the loss of a position is
``(1 - a) * divergence + a * CE(s, target)``, the ordinary cross-entropy of the student's logits at
temperature 1 on ``targets``.

The forward pass computes both heads' logits one chunk of rows at a time and keeps only the ``(N,)``
per-position losses; with ``reduction="mean"`` or ``"sum"`` it also computes the gradient of each chunk
(written out, :func:`divergence_gradient`) and adds its products to the student's gradients, so the
backward pass only hands them out; with ``"none"`` the backward pass recomputes each chunk. Memory
beyond the inputs and gradients is one chunk of rows of each head. Rows that do not count are dropped
before the products. Gradients reach the student's hidden states, weight and bias only: the teacher
is a constant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenloss.ops import resolve_impl
from tokenloss.ops.autocast import autocast_inputs, autocast_off, backward_without_autocast
from tokenloss.ops.compiling import eager_under_compile
from tokenloss.ops.linear_cross_entropy import chunk_logits, counted_row_index, gradients_needed, logits_buffer
from tokenloss.ops.rowwise import accumulation_dtype, cache_blocks, refuse_double_backward
from tokenloss.options import LossOptions, check_linear_inputs, prepare_targets

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "cross_entropy")
# float32 logits of both heads per chunk (the two (n, V) buffers a chunk holds): 128 MiB, 524 rows at
# V = 32000; at least MIN_CHUNK_ROWS rows, since each chunk streams both heads' weights and the weight
# gradient's product has the chunk's rows as its inner dimension. Measured forward+backward at (2048, 1024,
# 128256), 2 CPU threads, over the 4-product floor: 0.92-0.98x with 128-row chunks, 0.91x with 256.
CHUNK_BYTES = 128 * 1024 * 1024
MIN_CHUNK_ROWS = 256


def chunk_rows(n_rows: int, vocab: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else ``CHUNK_BYTES`` of both heads' float32 logits
    (``CHUNK_BYTES / (8 V)`` rows) but at least ``MIN_CHUNK_ROWS``, and at most ``n_rows``; at least 1.

    >>> chunk_rows(4096, 32000), chunk_rows(2048, 128256), chunk_rows(100, 128256), chunk_rows(10, 5, 3)
    (524, 256, 100, 3)
    """
    if chunk_size is not None:
        return chunk_size
    return max(1, min(max(CHUNK_BYTES // (8 * max(vocab, 1)), MIN_CHUNK_ROWS), n_rows))


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _xlogy_sum(p: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """``sum p (log p - log r)`` per row, with ``0 log 0 = 0`` (no NaN from ``0 * -inf``)."""
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """``log m = log(beta p + (1 - beta) q)`` elementwise, for ``0 < beta < 1`` (``-inf`` where both are 0)."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))


def tempered_log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(log q, log p)``: ``log_softmax`` of the student's and the teacher's ``(n, V)`` logits over
    ``temperature``, in the accumulation dtype."""
    dtype = accumulation_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return log_q, log_p


def divergence_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    log_probs: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The ``(n,)`` per-row losses of ``(n, V)`` logits of both heads, in the accumulation dtype (float32,
    float64 for float64 logits). Differentiable; the module doc gives the formulas. ``log_probs``: the
    :func:`tempered_log_probs` of these logits when the caller has them (read, not changed)."""
    s = student_logits.to(accumulation_dtype(student_logits.dtype))
    log_q, log_p = log_probs or tempered_log_probs(student_logits, teacher_logits, temperature)
    p, q = log_p.exp(), log_q.exp()
    divergence = resolved_divergence(divergence, beta)
    if divergence == "forward_kl":
        soft = _xlogy_sum(p, log_p, log_q)
    elif divergence == "reverse_kl":
        soft = _xlogy_sum(q, log_q, log_p)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        soft = beta * _xlogy_sum(p, log_p, log_m) + (1.0 - beta) * _xlogy_sum(q, log_q, log_m)
    else:  # cross_entropy
        soft = -torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(-1)
    if not hard_weight:
        return soft
    hard = torch.logsumexp(s, dim=-1) - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (1.0 - hard_weight) * soft + hard_weight * hard


def divergence_gradient(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    log_probs: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``d(row loss)/d(student logits)`` ``(n, V)`` of :func:`divergence_rows`, written out (in the
    accumulation dtype; the arguments as there, except that ``log_probs`` is overwritten)::

        forward_kl, cross_entropy   (q - p) / T
        reverse_kl                  q * (log q - log p - KL(q || p)) / T               (0 where q = 0)
        jsd, 0 < beta < 1           (1 - beta) q * (log q - log m - KL(q || m)) / T    (0 where q = 0)
        hard term                   softmax(s) - onehot(target)

    (The JSD's teacher half depends on q only through m, and ``d/dq`` of both halves adds up to
    ``(1 - beta) log(q / m)``; the softmax's Jacobian gives the rest. ``"jsd"`` at ``beta`` 0 or 1 is
    the forward or the reverse KL.)
    """
    dtype = accumulation_dtype(student_logits.dtype)
    log_q, log_p = log_probs or tempered_log_probs(student_logits, teacher_logits, temperature)
    divergence = resolved_divergence(divergence, beta)
    if divergence in ("reverse_kl", "jsd"):
        q = log_q.exp()
        log_r = _log_mixture(log_p, log_q, beta) if divergence == "jsd" else log_p
        log_ratio = torch.where(q > 0, log_q - log_r, torch.zeros_like(q))
        kl = (q * log_ratio).sum(-1, keepdim=True)
        grad = log_ratio.sub_(kl).mul_(q)
        if divergence == "jsd":
            grad.mul_(1.0 - beta)
    else:  # forward_kl, cross_entropy
        grad = log_q.exp().sub_(log_p.exp_())
    grad.mul_((1.0 - hard_weight) / temperature)
    if hard_weight:
        hard = torch.softmax(student_logits.to(dtype), dim=-1)
        hard.scatter_add_(1, targets.unsqueeze(1), -torch.ones_like(hard[:, :1]))
        grad.add_(hard, alpha=hard_weight)
    return grad


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
    """:func:`divergence_rows` and, with ``gradient``, :func:`divergence_gradient` of one chunk: ``(n,)``
    losses and the ``(n, V)`` gradient w.r.t. the student's logits (or None), in the accumulation dtype.
    A non-finite row loss is a ValueError naming the head (``first_row``: the chunk's first counted row).

    Both chunks are the caller's own products and may be overwritten (the gradient may be the student's
    chunk itself). On the CPU the rows go through in cache-sized blocks
    (:func:`~tokenloss.ops.rowwise.cache_blocks`), each by :func:`block_loss_and_gradient` (a few passes)
    where it covers the configuration, else by the formulas.
    """
    n_rows, vocab = student_logits.shape
    divergence = resolved_divergence(divergence, beta)
    block_math = block_loss_and_gradient if few_passes(temperature, hard_weight) else _formula_block
    dtype = accumulation_dtype(student_logits.dtype)
    losses = torch.empty(n_rows, dtype=dtype, device=student_logits.device)
    grad = None
    if gradient:
        grad = student_logits if student_logits.dtype == dtype else torch.empty_like(student_logits, dtype=dtype)
    for rows in cache_blocks(n_rows, vocab, student_logits.device):
        losses[rows], block_grad = block_math(
            student_logits[rows], teacher_logits[rows], None if targets is None else targets[rows],
            temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight, gradient=gradient,
            first_row=first_row + (rows.start or 0),
        )  # fmt: skip
        if grad is not None and block_grad.data_ptr() != grad[rows].data_ptr():
            grad[rows] = block_grad
    return losses, grad


def few_passes(temperature: float, hard_weight: float) -> bool:
    """Whether :func:`block_loss_and_gradient` (and the Triton kernels) cover this configuration: every
    divergence, with a hard term only at ``temperature`` 1."""
    return not (hard_weight and temperature != 1.0)


def resolved_divergence(divergence: str, beta: float) -> str:
    """``divergence``, with TRL's special cases: ``"jsd"`` at ``beta`` 0 is the forward KL, at 1 the reverse."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _formula_block(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    gradient: bool,
    first_row: int,
) -> tuple[Tensor, Tensor | None]:
    """:func:`divergence_rows` and :func:`divergence_gradient` of one block, sharing its log-probabilities."""
    config = {"temperature": temperature, "divergence": divergence, "beta": beta, "hard_weight": hard_weight}
    heads = (student_logits, teacher_logits)
    lse = [torch.logsumexp(logits.to(accumulation_dtype(logits.dtype)), dim=-1) for logits in heads]
    raise_non_finite(*lse, None, first_row)
    log_probs = tempered_log_probs(student_logits, teacher_logits, temperature)
    losses = divergence_rows(student_logits, teacher_logits, targets, **config, log_probs=log_probs)
    raise_non_finite(*lse, losses, first_row)
    if not gradient:
        return losses, None
    return losses, divergence_gradient(student_logits, teacher_logits, targets, **config, log_probs=log_probs)


def block_loss_and_gradient(
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
    """The math of :func:`chunk_loss_and_gradient` on one block of rows, in a few passes over it, where
    :func:`few_passes` (``"jsd"`` with ``0 < beta < 1``).

    Both chunks are the caller's own products and are overwritten. With ``z = logits / T`` and the rows'
    log-sum-exps ``a = lse(s)``, ``b = lse(t)``, and ``d = t - s``: ``log p - log q = d + a - b``, so

        forward_kl     sum p d + a - b                    gradient (q - p) / T
        reverse_kl     -sum q d + b - a                   gradient q (-d + b - a - KL) / T
        cross_entropy  a - sum p s                        gradient (q - p) / T
        jsd            beta KL(p || m) + (1 - beta) KL(q || m), with log m = log(beta p + (1 - beta) q)
                       gradient (1 - beta) q (log q - log m - KL(q || m)) / T

    ``p d`` and ``q d`` are 0 where the probability is 0 (a ``-inf`` logit), not ``0 * inf = NaN``.
    A non-finite row loss is a ValueError naming the head (``first_row``: the chunk's first counted row).
    """
    dtype = accumulation_dtype(student_logits.dtype)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if temperature != 1.0:
        s.div_(temperature)
        t.div_(temperature)
    # Three (n, V) tensors live at once: s (then q, in place), t (then d = t - s, in place) and p; four for
    # the JSD (s and t become log q and log p). Each softmax is one shift, one exp, one sum and one scale;
    # the log-sum-exps come from the same sums.
    student_max, teacher_max = s.amax(dim=-1), t.amax(dim=-1)  # (n,)
    p = torch.sub(t, teacher_max.unsqueeze(1)).exp_()
    teacher_sum = p.sum(dim=-1)
    b = teacher_max + teacher_sum.log()
    p.mul_(teacher_sum.reciprocal().unsqueeze(1))
    hard = -s.gather(-1, targets.unsqueeze(-1)).squeeze(-1) if hard_weight else None  # + a below
    soft_dot = None
    if divergence == "cross_entropy":
        soft_dot = _weighted_row_sums(p, torch.mul(p, s, out=t))  # sum p s; t is free and s still needed
    elif divergence in ("forward_kl", "reverse_kl"):
        # d = t - s: -inf where t = -inf (p = 0), +inf where s = -inf (q = 0), NaN where both; a term counts 0
        # where its probability is 0, and an infinite term where it is not is an infinite divergence
        d = t.sub_(s)
    if divergence == "jsd":  # s and t stay for log q and log p
        q = torch.sub(s, student_max.unsqueeze(1)).exp_()
    else:
        q = s.sub_(student_max.unsqueeze(1)).exp_()
    student_sum = q.sum(dim=-1)
    a = student_max + student_sum.log()
    q.mul_(student_sum.reciprocal().unsqueeze(1))
    raise_non_finite(a, b, None, first_row)
    if divergence == "jsd":
        teacher_kl, student_kl, q_ratio = _jsd_terms(p, q, t.sub_(b.unsqueeze(1)), s.sub_(a.unsqueeze(1)), beta)
        loss = beta * teacher_kl + (1.0 - beta) * student_kl
    if hard is not None:
        hard += a
    if divergence == "cross_entropy":
        loss = a - soft_dot
    if divergence == "forward_kl":
        loss = _weighted_row_sums(p, d.mul_(p)) + a - b
    elif divergence == "reverse_kl":
        q_d = d.mul_(q)  # q (t - s), reused by the gradient (its q = 0 terms zeroed where a row needed it)
        loss = b - a - _weighted_row_sums(q, q_d)
    grad = None
    if gradient:  # (1 - w) * soft + w * (q - onehot), with T = 1 whenever w > 0
        w = hard_weight
        if divergence in ("reverse_kl", "jsd"):  # q (log q - log p - KL) / T, KL = loss; JSD: see below
            if divergence == "jsd":  # (1 - beta) q (log q - log m - KL(q || m)) / T; log beta cancels
                kl_shifted = student_kl + math.log(beta)
                grad = q_ratio.addcmul_(q, kl_shifted.neg().unsqueeze(1)).mul_((1.0 - beta) * (1.0 - w) / temperature)
            else:
                grad = q_d.neg_().addcmul_(q, (b - a - loss).unsqueeze(1)).mul_((1.0 - w) / temperature)
            if w:
                grad.add_(q, alpha=w)
        else:  # (q - p) / T; with w: q - (1 - w) p
            grad = q.sub_(p, alpha=1.0 - w)
            if not w and temperature != 1.0:
                grad.div_(temperature)
        if w:
            grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(grad[:, :1], -w))
    if hard_weight:
        loss = (1.0 - hard_weight) * loss + hard_weight * hard
    raise_non_finite(a, b, loss, first_row)
    return loss, grad


# float32's smallest normal number: below it a probability has lost precision (subnormal) or is 0
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _jsd_terms(p: Tensor, q: Tensor, log_p: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """KL(p || m), KL(q || m) ``(n,)`` and ``q (log q - log m - log beta)`` ``(n, V)`` for the mixture
    ``m = beta p + (1 - beta) q``, ``0 < beta < 1``, in place over ``log_p`` and ``log_q`` (both consumed).

    ``log m - log beta = log(p + c q)`` with ``c = (1 - beta) / beta``: one sum and one log per element;
    the constant ``log beta`` leaves the KLs as ``sum p (log p - log(p + c q)) - log beta`` (p and q each
    sum to 1) and cancels from ``log q - log m - KL(q || m)``. Where ``p + c q`` is not a normal float (both
    probabilities tiny) the log is taken from ``log p`` and ``log q`` instead (``logaddexp``), so it is
    never ``-inf`` where either has mass. A term whose probability is 0 contributes 0, not ``0 * inf``.
    """
    scale = (1.0 - beta) / beta
    log_mix = torch.add(p, q, alpha=scale)
    tiny = log_mix < _SMALLEST_NORMAL
    log_mix.log_()
    if tiny.any():
        log_mix[tiny] = torch.logaddexp(log_p[tiny], log_q[tiny] + math.log(scale))
    p_ratio, q_ratio = log_p.sub_(log_mix).mul_(p), log_q.sub_(log_mix).mul_(q)
    log_beta = math.log(beta)
    return _weighted_row_sums(p, p_ratio) - log_beta, _weighted_row_sums(q, q_ratio) - log_beta, q_ratio


def _weighted_row_sums(probs: Tensor, products: Tensor) -> Tensor:
    """``products.sum(-1)`` ``(n,)`` for ``products = probs * values`` (computed in place by the caller), a
    term counting 0 where ``probs_j = 0`` even if ``values_j`` is infinite or NaN there (a ``-inf`` logit):
    those terms are zeroed in ``products`` only when a row needs it (its sum is NaN), so the common case
    costs one sum and no temporary."""
    sums = products.sum(dim=-1)
    if sums.isnan().any():
        sums = products.masked_fill_(probs == 0, 0.0).sum(dim=-1)
    return sums


def raise_non_finite(student_lse: Tensor, teacher_lse: Tensor, loss: Tensor | None, first_row: int) -> None:
    """ValueError naming the head whose log-sum-exp is not finite in some row (NaN or inf logits), or, with
    ``loss``, saying why a row's loss is infinite; ``first_row``: the chunk's first counted row."""
    for name, lse in (("student", student_lse), ("teacher", teacher_lse)):
        bad = ~torch.isfinite(lse)
        if bool(bad.any()):
            raise ValueError(
                f"the {name} logits contain NaN or infinite values in a counted row (first: counted row "
                f"{first_row + int(bad.nonzero()[0, 0])}); the loss would be NaN. Fix the model's output"
            )
    if loss is None:
        return
    bad = ~torch.isfinite(loss)
    if bool(bad.any()):
        raise ValueError(
            f"the loss is infinite in a counted row (first: counted row {first_row + int(bad.nonzero()[0, 0])}): a "
            "head gives a -inf logit (probability 0) where the divergence needs mass (forward KL, cross-entropy: the "
            "student where the teacher has some; reverse KL: the teacher where the student has some)"
        )


class _ChunkBuffers:
    """The student's and the teacher's ``(n, V)`` logits of each chunk, written into two buffers reused
    chunk after chunk (fresh tensors from oneDNN where it computes the products: the loops drop each
    chunk before the next), so at most two chunks of logits are held."""

    def __init__(self, student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], chunk: int) -> None:
        self.heads = (student, teacher)  # each (hidden, weight, bias or None)
        self.buffers = tuple(logits_buffer(hidden, weight, chunk) for hidden, weight, _ in self.heads)

    def logits(self, part: slice) -> tuple[Tensor, Tensor]:
        """The student's and the teacher's logits of rows ``part``, ``(n, V)`` each."""
        student, teacher = (
            chunk_logits(hidden[part], weight, bias, buffer)
            for (hidden, weight, bias), buffer in zip(self.heads, self.buffers)
        )
        return student, teacher


def _chunk_math(triton: bool, config: dict):
    """:func:`chunk_loss_and_gradient`, or its Triton kernels' version where they cover ``config`` (every
    divergence; a hard term at temperature 1 only)."""
    if not triton or not few_passes(config["temperature"], config["hard_weight"]):
        return chunk_loss_and_gradient
    from tokenloss.ops.triton.distillation import chunk_loss_and_gradient as kernels

    return kernels


class _GradientSinks:
    """The student's gradients, accumulated chunk by chunk: ``(M, D)`` hidden rows, ``(V, D)`` weight and
    ``(V,)`` bias in the accumulation dtype, each only where wanted."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]) -> None:
        acc = accumulation_dtype(weight.dtype)
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros_like(weight, dtype=acc) if needs[1] else None
        self.bias = torch.zeros_like(bias, dtype=acc) if needs[2] and bias is not None else None
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    def add(self, part: slice, grad: Tensor, hidden: Tensor, weight: Tensor, scale: Tensor | None = None) -> None:
        """Adds the chunk whose gradient w.r.t. the student's logits is ``scale * grad``: ``grad`` ``(n, V)``,
        ``scale`` a 0-dim or ``(n,)`` tensor (None: 1), applied to the ``(n, D)`` sides of the products
        rather than to the ``(n, V)`` gradient (a pass over the chunk saved)."""
        row_scale = None if scale is None else scale.to(grad.dtype).reshape(-1, 1)
        if self.hidden is not None:
            rows = grad @ weight.to(grad.dtype)
            self.hidden[part] = (rows if row_scale is None else rows.mul_(row_scale)).to(self.hidden.dtype)
        if self.weight is not None:
            self.weight.addmm_(grad.t(), hidden.to(grad.dtype) if row_scale is None else hidden * row_scale)
        if self.bias is not None:
            self.bias += grad.sum(0) if row_scale is None else row_scale.reshape(-1).expand(grad.shape[0]) @ grad

    def gradients(self, scale: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grads = (self.hidden, self.weight, self.bias)
        # in place (the sums are ours): a scaled copy would hold a second (V, D) weight gradient at the peak;
        # loss.backward() passes 1, which on the CPU costs nothing to read and skips a pass over (V, D)
        if scale is not None and (scale.device.type != "cpu" or scale.item() != 1):
            grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, self.dtypes))


class _FusedDistillation(torch.autograd.Function):
    """Student rows ``(M, D)``, head, bias; teacher rows, head, bias (constants) -> the per-row losses
    ``(M,)``, or, with ``reduce_scale``, their sum times it (0-dim) with the gradients computed in the
    forward pass (one pass over both heads instead of two)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, chunk, config, reduce_scale,
        needs, triton,
    ):  # fmt: skip
        rows = hidden.shape[0]
        losses = torch.empty(rows, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
        sinks = _GradientSinks(hidden, weight, bias, needs) if reduce_scale is not None else None
        chunk_math = _chunk_math(triton, config)
        buffers = _ChunkBuffers((hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias), chunk)
        with torch.no_grad():
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                student, teacher = buffers.logits(part)
                part_targets = targets[part] if targets is not None else None
                losses[part], grad = chunk_math(
                    student, teacher, part_targets, **config, gradient=sinks is not None, first_row=start
                )
                if sinks is not None:
                    sinks.add(part, grad, hidden[part], weight, reduce_scale)
                del student, teacher, grad  # before the next chunk's products
        ctx.chunk, ctx.config, ctx.sinks, ctx.triton = chunk, config, sinks, triton
        if sinks is not None:
            return losses.sum() * reduce_scale.to(losses.dtype)
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets)
        return losses

    @staticmethod
    @eager_under_compile
    @backward_without_autocast
    def backward(ctx, grad_output):
        refuse_double_backward("linear_distillation_loss")
        if ctx.sinks is not None:
            if ctx.sinks == "used":
                raise RuntimeError(
                    "linear_distillation_loss computes its gradients during the forward pass and hands them out "
                    "once: a second backward through the same graph is not supported; run the forward again"
                )
            sinks, ctx.sinks = ctx.sinks, "used"
            return (*sinks.gradients(grad_output.reshape(())), *([None] * 9))
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets = ctx.saved_tensors
        sinks = _GradientSinks(hidden, weight, bias, ctx.needs_input_grad[:3])
        chunk_math = _chunk_math(ctx.triton, ctx.config)
        buffers = _ChunkBuffers((hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias), ctx.chunk)
        with torch.no_grad():  # the gradient written out: no autograd graph of (n, V) tensors
            for start in range(0, hidden.shape[0], ctx.chunk):
                part = slice(start, start + ctx.chunk)
                student, teacher = buffers.logits(part)
                part_targets = targets[part] if targets is not None else None
                _, grad = chunk_math(student, teacher, part_targets, **ctx.config, gradient=True, first_row=start)
                sinks.add(part, grad, hidden[part], weight, grad_output[part])
                del student, teacher, grad
        return (*sinks.gradients(), *([None] * 9))


@eager_under_compile
def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    shift: bool | int = False,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """The distillation loss between a teacher and a student, fused with both LM heads (see the module doc).

    Both distributions are taken at ``temperature``; the result is *not* multiplied by
    ``temperature ** 2``: multiply it yourself where Hinton-style scaling is wanted (it keeps the
    gradient's size as ``temperature`` changes).

    Args:
        student_hidden: ``(..., D_s)`` the student's last hidden states (float32, bfloat16, float16, float64).
        student_weight: ``(V, D_s)`` the student's LM head, in the dtype of ``student_hidden``.
        teacher_hidden: ``(..., D_t)`` the teacher's, with the same leading shape (``D_t`` may differ).
        teacher_weight: ``(V, D_t)`` the teacher's LM head: the same vocabulary ``V``.
        targets: ``(...)`` int64 next tokens or ``ignore_index``: positions with ``ignore_index``
            do not count; needed for ``hard_weight > 0``. None: every position counts.
        student_bias, teacher_bias: optional ``(V,)`` biases.
        temperature: ``T > 0``; both heads' logits are divided by it.
        divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"cross_entropy"``.
        beta: the JSD's interpolation in ``[0, 1]`` (used by ``"jsd"`` only).
        hard_weight: ``a`` in ``[0, 1]``: ``(1 - a) * divergence + a * cross-entropy on targets``.
        shift: ``True`` (or ``k``): position ``i`` is compared at ``targets[i + k]`` (and
            ``mask[i + k]``); the last ``k`` positions of each sequence do not count.
        mask: optional bool tensor shaped like the leading shape; True marks positions that count.
        ignore_index: the target value of positions that do not count.
        reduction: ``"mean"`` (over counted positions, of each position's divergence summed over
            the vocabulary), ``"sum"``, or ``"none"`` (per position, 0 where it does not count,
            shaped like the leading shape, less the shift).
        chunk_size: rows per chunk (default: :func:`chunk_rows`, 128 MiB of both heads' float32 logits).
        impl: ``"auto"`` (Triton for CUDA tensors when it is installed), ``"torch"`` or ``"triton"``: the
            per-chunk math in two kernels (:mod:`tokenloss.ops.triton.distillation`); the products,
            and a hard term at ``temperature != 1``, stay torch's.

    Returns:
        A float32 tensor (float64 for float64 inputs): 0-dim for ``"mean"``/``"sum"``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes or devices of either head; vocabularies that
            differ; an unknown divergence; ``temperature`` not a finite number > 0; ``beta`` or
            ``hard_weight`` outside ``[0, 1]``; ``hard_weight > 0`` without ``targets``; NaN or
            infinite logits in a counted row.

    Examples:
        >>> import torch, tokenloss as tl
        >>> student, teacher = torch.randn(4, 8, requires_grad=True), torch.randn(4, 16)
        >>> head_s, head_t = torch.randn(10, 8, requires_grad=True), torch.randn(10, 16)
        >>> loss = tl.linear_distillation_loss(student, head_s, teacher, head_t, temperature=2.0)
        >>> loss.backward()
        >>> loss.item() >= 0 and student.grad.shape == (4, 8)
        True
    """
    # as nn.Linear heads under torch.autocast
    student_hidden, student_weight, student_bias = autocast_inputs(student_hidden, student_weight, student_bias)
    teacher_hidden, teacher_weight, teacher_bias = autocast_inputs(teacher_hidden, teacher_weight, teacher_bias)
    check_linear_inputs(student_hidden, student_weight, student_bias, weight_name="student_weight",
                        bias_name="student_bias", hidden_name="student_hidden")  # fmt: skip
    check_linear_inputs(teacher_hidden, teacher_weight, teacher_bias, weight_name="teacher_weight",
                        bias_name="teacher_bias", hidden_name="teacher_hidden")  # fmt: skip
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the teacher and the student must share a vocabulary: student_weight has V = {student_weight.shape[0]} "
            f"rows, teacher_weight has {teacher_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} must "
            "have the same leading shape (one teacher position per student position)"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden must be on the device of student_hidden ({student_hidden.device})")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    config = {
        "temperature": _check_temperature(temperature),
        "divergence": divergence,
        "beta": _check_unit_interval("beta", beta),
        "hard_weight": _check_unit_interval("hard_weight", hard_weight),
    }
    if config["hard_weight"] > 0 and targets is None:
        raise ValueError("hard_weight > 0 mixes in the cross-entropy on targets: pass targets")
    options = LossOptions(ignore_index=ignore_index, shift=shift, reduction=reduction, chunk_size=chunk_size)
    leading = tuple(student_hidden.shape[:-1])
    given = targets if targets is not None else torch.zeros(leading, dtype=torch.long, device=student_hidden.device)
    prepared = prepare_targets(
        leading, given, student_weight.shape[0], options, mask=mask, input_name="student_hidden",
        device=student_hidden.device,
    )  # fmt: skip
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    index = counted_row_index(prepared.counted)
    rows_targets = prepared.targets
    if index is not None:
        hidden, teacher, rows_targets = hidden[index], teacher[index], rows_targets[index]
    vocab = student_weight.shape[0]
    chunk = chunk_rows(hidden.shape[0], vocab, chunk_size)
    needs = gradients_needed(hidden, student_weight, student_bias)
    reduce_scale = None
    if options.reduction != "none" and any(needs):
        one = torch.ones((), dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
        reduce_scale = one / prepared.denominator.to(one.dtype) if options.reduction == "mean" else one
    with autocast_off(hidden.device):
        losses = _FusedDistillation.apply(
            hidden, student_weight, student_bias, teacher, teacher_weight.detach(),
            teacher_bias.detach() if teacher_bias is not None else None,
            rows_targets if config["hard_weight"] else None, chunk, config, reduce_scale, needs,
            resolve_impl(impl, hidden.device) == "triton",
        )  # fmt: skip
    if reduce_scale is not None:
        return losses
    if index is not None:
        losses = losses.new_zeros(prepared.counted.shape[0]).index_put((index,), losses)
    return prepared.reduce(losses, options.reduction)
