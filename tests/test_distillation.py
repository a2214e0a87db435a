"""Tests of tokenloss.linear_distillation_loss against float64 references built from full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import tokenloss as tl

V, D_STUDENT, D_TEACHER = 37, 8, 12


def reference_rows(student_logits, teacher_logits, targets, *, temperature, divergence, beta, hard_weight):
    """Per-row losses in float64, written with F.kl_div as TRL's generalized_jsd_loss writes them."""
    s, t = student_logits.double(), teacher_logits.double()
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if divergence == "forward_kl" or divergence == "jsd" and beta == 0:
        soft = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl" or divergence == "jsd" and beta == 1:
        soft = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
        kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        soft = beta * kl_teacher + (1 - beta) * kl_student
    else:
        soft = -(log_p.exp() * log_q).sum(-1)
    if hard_weight:
        hard = F.cross_entropy(s, targets.clamp(min=0), reduction="none")
        return (1 - hard_weight) * soft + hard_weight * hard
    return soft


def make_inputs(leading, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    inputs = {
        "student_hidden": randn(*leading, D_STUDENT).requires_grad_(),
        "student_weight": randn(V, D_STUDENT, scale=0.7).requires_grad_(),
        "teacher_hidden": randn(*leading, D_TEACHER),
        "teacher_weight": randn(V, D_TEACHER, scale=0.7),
        "student_bias": randn(V).requires_grad_() if bias else None,
        "teacher_bias": randn(V) if bias else None,
    }
    targets = torch.randint(0, V, leading, generator=generator)
    return inputs, targets


def reference_loss(inputs, targets, *, shift=False, mask=None, ignore_index=-100, reduction="mean", **config):
    """The full-logits float64 loss (differentiable w.r.t. the float64 copies of the student inputs)."""
    s_h, s_w = inputs["student_hidden"].double(), inputs["student_weight"].double()
    s_b = inputs["student_bias"].double() if inputs["student_bias"] is not None else None
    t_b = inputs["teacher_bias"].double() if inputs["teacher_bias"] is not None else None
    student = F.linear(s_h, s_w, s_b)
    teacher = F.linear(inputs["teacher_hidden"].double(), inputs["teacher_weight"].double(), t_b)
    targets = targets.clone()
    if shift:
        student, teacher, targets = student[..., :-1, :], teacher[..., :-1, :], targets[..., 1:]
        mask = mask[..., 1:] if mask is not None else None
    counted = targets != ignore_index
    if mask is not None:
        counted = counted & mask
    rows = reference_rows(student.reshape(-1, V), teacher.reshape(-1, V), targets.reshape(-1), **config)
    rows = torch.where(counted.reshape(-1), rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.view(targets.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp(min=1)


def student_grads(loss, inputs):
    wanted = [inputs[name] for name in ("student_hidden", "student_weight", "student_bias") if inputs[name] is not None]
    return torch.autograd.grad(loss, wanted)


CONFIGS = [
    {"divergence": "forward_kl", "temperature": 1.0, "beta": 0.5, "hard_weight": 0.0},
    {"divergence": "forward_kl", "temperature": 2.5, "beta": 0.5, "hard_weight": 0.3},
    {"divergence": "reverse_kl", "temperature": 0.7, "beta": 0.5, "hard_weight": 0.0},
    {"divergence": "jsd", "temperature": 1.0, "beta": 0.5, "hard_weight": 0.0},
    {"divergence": "jsd", "temperature": 2.0, "beta": 0.1, "hard_weight": 0.5},
    {"divergence": "jsd", "temperature": 1.0, "beta": 0.0, "hard_weight": 0.0},
    {"divergence": "jsd", "temperature": 1.0, "beta": 1.0, "hard_weight": 0.0},
    {"divergence": "cross_entropy", "temperature": 3.0, "beta": 0.5, "hard_weight": 1.0},
    # at T = 1 the hard term is folded into the few-pass chunk math
    {"divergence": "forward_kl", "temperature": 1.0, "beta": 0.5, "hard_weight": 0.4},
    {"divergence": "reverse_kl", "temperature": 1.0, "beta": 0.5, "hard_weight": 0.2},
    {"divergence": "cross_entropy", "temperature": 1.0, "beta": 0.5, "hard_weight": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_student_gradients_equal_float64(config, reduction, cache_blocks):
    inputs, targets = make_inputs((3, 7))
    targets[0, 2] = targets[2, 5] = -100
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 3] = False
    options = {"reduction": reduction, "mask": mask, "shift": True}
    loss = tl.linear_distillation_loss(**inputs, targets=targets, chunk_size=4, **options, **config)
    expected = reference_loss(inputs, targets, **options, **config)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert_close(loss.double(), expected, rtol=2e-5, atol=2e-6)
    upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = student_grads((loss.double() * upstream).sum(), inputs)
    want = student_grads((expected * upstream).sum(), inputs)
    for g, w in zip(got, want):
        assert_close(g.double(), w.double(), rtol=2e-5, atol=2e-6)


def test_without_targets_every_position_counts():
    inputs, _ = make_inputs((5, 4), bias=False)
    loss = tl.linear_distillation_loss(**inputs, divergence="reverse_kl", temperature=1.5)
    everything = torch.zeros(5, 4, dtype=torch.long)
    config = {"divergence": "reverse_kl", "temperature": 1.5, "beta": 0.5, "hard_weight": 0.0}
    assert_close(loss.double(), reference_loss(inputs, everything, **config), rtol=2e-5, atol=2e-6)


def test_the_teacher_gets_no_gradient_and_chunks_do_not_matter():
    inputs, targets = make_inputs((2, 9))
    inputs["teacher_hidden"].requires_grad_()
    whole = tl.linear_distillation_loss(**inputs, targets=targets, divergence="jsd")
    chunked = tl.linear_distillation_loss(**inputs, targets=targets, divergence="jsd", chunk_size=1)
    assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    whole.backward()
    assert inputs["teacher_hidden"].grad is None and inputs["student_hidden"].grad is not None


def test_identical_distributions_give_zero_divergence():
    inputs, _ = make_inputs((4,), bias=False)
    same = {**inputs, "teacher_hidden": inputs["student_hidden"].detach(), "teacher_weight": inputs["student_weight"]}
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = tl.linear_distillation_loss(**same, divergence=divergence)
        assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_track_float64(dtype, cache_blocks):
    inputs, targets = make_inputs((2, 6), dtype=dtype)
    config = {"divergence": "jsd", "temperature": 2.0, "beta": 0.3, "hard_weight": 0.2}
    loss = tl.linear_distillation_loss(**inputs, targets=targets, **config)
    expected = reference_loss(inputs, targets, **config)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 3e-2, "atol": 3e-3}
    assert_close(loss.double(), expected, **tolerance)
    grad = student_grads(loss, inputs)[0]
    assert grad.dtype == dtype
    assert_close(grad.double(), student_grads(expected, inputs)[0].double(), **tolerance)


def test_no_counted_position_gives_zero_and_zero_gradients():
    inputs, targets = make_inputs((2, 3))
    loss = tl.linear_distillation_loss(**inputs, targets=torch.full_like(targets, -100))
    loss.backward()
    assert loss.item() == 0.0 and not inputs["student_hidden"].grad.any()


def test_matches_trl_generalized_jsd_when_installed():
    """TRL's own GKD loss on the same full logits (skipped when TRL is not installed)."""
    trl = pytest.importorskip("trl")
    trainer = getattr(trl, "GKDTrainer", None)
    if trainer is None:
        trainer = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    inputs, targets = make_inputs((2, 5))
    student = F.linear(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
    teacher = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"])
    for beta in (0.0, 0.4, 1.0):
        theirs = trainer.generalized_jsd_loss(student, teacher, labels=targets, beta=beta, temperature=2.0)
        ours = tl.linear_distillation_loss(**inputs, targets=targets, divergence="jsd", beta=beta, temperature=2.0)
        assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"teacher_weight": torch.randn(V + 1, D_TEACHER)}, ValueError, "share a vocabulary"),
        ({"teacher_hidden": torch.randn(3, D_TEACHER)}, ValueError, "same leading shape"),
        ({"divergence": "kl"}, ValueError, "divergence must be one of forward_kl, reverse_kl, jsd"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": math.nan}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": "1"}, TypeError, "temperature must be a number"),
        ({"beta": 1.5}, ValueError, r"beta must be in \[0, 1\]"),
        ({"hard_weight": -0.1}, ValueError, r"hard_weight must be in \[0, 1\]"),
        ({"hard_weight": 0.5, "targets": None}, ValueError, "pass targets"),
        ({"student_weight": torch.randn(V, D_STUDENT + 1)}, ValueError, "student_weight must have shape"),
        ({"teacher_hidden": torch.randn(2, 4, D_TEACHER).double()}, TypeError, "teacher_weight must have the dtype"),
        ({"reduction": "avg"}, ValueError, "reduction"),
    ],
)
def test_bad_input_is_named(change, error, match):
    inputs, targets = make_inputs((2, 4), bias=False)
    arguments = {**inputs, "targets": targets, **change}
    with pytest.raises(error, match=match):
        tl.linear_distillation_loss(**arguments)


@pytest.mark.parametrize("head", ["student", "teacher"])
def test_nan_in_a_counted_row_raises(head):
    inputs, targets = make_inputs((2, 4), bias=False)
    inputs[f"{head}_hidden"] = inputs[f"{head}_hidden"].detach().clone()
    inputs[f"{head}_hidden"][1, 2, 0] = math.nan
    with pytest.raises(ValueError, match=f"the {head} logits contain NaN"):
        tl.linear_distillation_loss(**inputs, targets=targets)
    targets[1, 2] = -100  # the same row, not counted: fine
    assert torch.isfinite(tl.linear_distillation_loss(**inputs, targets=targets))


def test_gradients_are_handed_out_once():
    """With "mean"/"sum" the gradients are computed in the forward pass: a second backward through the same
    graph is a clear error, not a silent second copy."""
    inputs, targets = make_inputs((2, 5))
    loss = tl.linear_distillation_loss(**inputs, targets=targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="hands them out once"):
        loss.backward()


FEW_PASS_CONFIGS = [c for c in CONFIGS if c["divergence"] != "jsd" and not (c["hard_weight"] and c["temperature"] != 1)]


@pytest.mark.parametrize("config", FEW_PASS_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_few_pass_chunk_math_equals_the_plain_formulas(config, cache_blocks):
    """chunk_loss_and_gradient (the fused path's per-chunk math) equals divergence_rows / divergence_gradient in
    float64, with -inf teacher logits (banned tokens: probability 0, no NaN) and -inf student logits where the
    teacher has no mass."""
    from tokenloss.distillation import chunk_loss_and_gradient, divergence_gradient, divergence_rows

    gen = torch.Generator().manual_seed(11)
    student = torch.randn(6, 17, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(6, 17, generator=gen, dtype=torch.float64) * 3
    teacher[:, 5] = float("-inf")
    student[:, 5] = float("-inf")  # the teacher has no mass there either
    teacher[2, 9] = student[2, 9] = float("-inf")
    # student probability 0 at [3, 2]: finite for reverse KL (q = 0 there) while the teacher keeps mass;
    # forward KL and cross-entropy are finite only if the teacher has none there either
    student[3, 2] = float("-inf")
    teacher[3, 2] = float("-inf") if config["divergence"] != "reverse_kl" else teacher[3, 2]
    targets = torch.randint(0, 17, (6,), generator=gen)
    targets[(targets == 5) | (targets == 9) | (targets == 2)] = 4
    loss, grad = chunk_loss_and_gradient(student.clone(), teacher.clone(), targets, **config, gradient=True)
    expected_loss = divergence_rows(student, teacher, targets, **config)
    expected_grad = divergence_gradient(student, teacher, targets, **config)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_chunk_gradient_equals_autograd_of_the_row_losses(config, cache_blocks):
    """The gradient chunk_loss_and_gradient writes out (every divergence, the JSD's included) equals autograd
    through divergence_rows in float64, with banned tokens (-inf in both heads) and rows of large logits."""
    from tokenloss.distillation import chunk_loss_and_gradient, divergence_rows

    gen = torch.Generator().manual_seed(12)
    student = torch.randn(5, 23, generator=gen, dtype=torch.float64) * 4
    teacher = torch.randn(5, 23, generator=gen, dtype=torch.float64) * 4
    student[:, 3] = teacher[:, 3] = float("-inf")
    student[1] += 1e4
    targets = torch.randint(4, 23, (5,), generator=gen)
    upstream = torch.rand(5, generator=gen, dtype=torch.float64)
    kept = [j for j in range(23) if j != 3]  # autograd through 0 * -inf is NaN: the reference drops the column
    x = student[:, kept].clone().requires_grad_()
    rows = divergence_rows(x, teacher[:, kept], targets - 1, **config)
    (want,) = torch.autograd.grad(rows, x, grad_outputs=upstream)
    loss, grad = chunk_loss_and_gradient(student.clone(), teacher.clone(), targets, **config, gradient=True)
    assert_close(loss, rows.detach(), rtol=1e-10, atol=1e-12)
    assert_close(grad[:, kept] * upstream.unsqueeze(1), want, rtol=1e-10, atol=1e-12)
    assert (grad[:, 3] == 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_with_subnormal_probabilities_stays_finite_and_exact(beta):
    """float32 probabilities below e^-87 are subnormal, and beta p + (1 - beta) q underflows to 0 where one is
    about e^-102.5 and the other 0: the JSD and its gradient stay finite and equal the float64 computation."""
    from tokenloss.distillation import chunk_loss_and_gradient

    student = torch.tensor([[0.0, -95.0, -101.0, 3.0], [-95.0, 0.0, -20.0, -99.0], [0.0, -100.8, 1.0, 0.5],
                            [0.0, -200.0, 1.0, 0.5]])  # fmt: skip
    teacher = torch.tensor([[-95.0, 0.0, -99.0, -101.0], [0.0, -101.0, -95.0, 1.0], [0.0, -200.0, 1.0, 0.5],
                            [0.0, -100.8, 1.0, 0.5]])  # fmt: skip
    config = {"divergence": "jsd", "temperature": 1.0, "beta": beta, "hard_weight": 0.0}
    loss, grad = chunk_loss_and_gradient(student.clone(), teacher.clone(), None, **config, gradient=True)
    want_loss, want_grad = chunk_loss_and_gradient(student.double(), teacher.double(), None, **config, gradient=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("head", "divergence", "infinite"), [
    ("student", "forward_kl", True), ("student", "cross_entropy", True), ("student", "reverse_kl", False),
    ("teacher", "reverse_kl", True), ("teacher", "forward_kl", False),
])  # fmt: skip
def test_an_infinite_divergence_raises(head, divergence, infinite):
    """A head gives probability 0 (a -inf logit through its bias) where the divergence needs mass: an infinite
    loss is a ValueError, not a silent inf; where it does not need mass, the loss and its gradient are finite."""
    inputs, targets = make_inputs((2, 4), bias=False)
    bias = torch.zeros(inputs[f"{head}_weight"].shape[0])
    bias[3] = float("-inf")
    inputs[f"{head}_bias"] = bias
    if not infinite:
        loss = tl.linear_distillation_loss(**inputs, targets=targets, divergence=divergence)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(inputs["student_hidden"].grad).all()
        return
    with pytest.raises(ValueError, match="loss is infinite .* -inf logit"):
        tl.linear_distillation_loss(**inputs, targets=targets, divergence=divergence)


def test_an_upstream_gradient_scales_the_gradients_computed_in_the_forward_pass():
    """(2.5 * loss).backward() gives 2.5 times the gradients of loss.backward() (scaled in place)."""
    grads = []
    for factor in (1.0, 2.5):
        inputs, targets = make_inputs((2, 5))
        (factor * tl.linear_distillation_loss(**inputs, targets=targets, hard_weight=0.2)).backward()
        grads.append((inputs["student_hidden"].grad, inputs["student_weight"].grad))
    for plain, scaled in zip(*grads):
        assert_close(scaled, 2.5 * plain)


@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn", "mkl-mm"])
def test_holds_one_chunk_of_each_heads_logits(onednn, peak_rss_growth):
    """Peak RSS growth of a fused step with N x V = 512 MiB of float32 logits per head stays below the two
    heads' chunks (one of each) plus the gradients: each chunk's logits are dropped before the next's."""
    chunk = 256
    setup = """
        n, d, v = 4096, 16, 32768
        hidden = torch.randn(n, d).requires_grad_()
        weight = (torch.randn(v, d) * 0.25).requires_grad_()
        teacher_hidden, teacher_weight = torch.randn(n, d), torch.randn(v, d) * 0.25
    """
    step = f"tl.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, chunk_size={chunk}).backward()"
    growth = peak_rss_growth(setup, step, env={"TOKENLOSS_ONEDNN": onednn})
    chunk_buffer = chunk * 32768 * 4  # 32 MiB per head
    grads = (4096 * 16 + 32768 * 16) * 4
    assert growth < 2 * chunk_buffer + grads + (24 << 20), f"peak grew by {growth / 2**20:.0f} MiB"
