"""The fused linear + cross-entropy op: its in-place kernels, chunk rule, gradients, memory and bf16 accuracy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokenloss as tl
from tokenloss.ops import linear_cross_entropy as lce
from tokenloss.ops.rowwise import chunk_gradient, chunk_statistics, loss_and_coefficients, scale_coefficients
from tokenloss.options import LossOptions, prepare_targets
from tokenloss.reference import reference_cross_entropy

KERNEL_OPTIONS = [
    LossOptions(),
    LossOptions(label_smoothing=0.3),
    LossOptions(softcap=3.0),
    LossOptions(softcap=30.0, label_smoothing=0.1, z_loss=1e-2, focal_gamma=2.0),
]
KERNEL_TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}


def _logits(n, v, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 4
    logits[0, :] += 1e4  # large logits stay finite after the max shift
    logits[1, : v // 2] = float("-inf")  # masked-out vocabulary entries
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCES), ids=str)
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=lambda o: f"eps{o.label_smoothing}-cap{o.softcap}")
def test_inplace_kernels_equal_the_rowwise_kernels(dtype, options):
    """_statistics_inplace + _gradient_inplace give rowwise.chunk_statistics + chunk_gradient's values,
    computed in float64 on the same input (large, -inf and ordinary logits)."""
    logits = _logits(6, 23, dtype)
    if options.softcap is not None and options.softcap < 10:
        logits = logits[2:]  # soft-capping 1e4 by 3 saturates tanh: keep the ordinary rows
    if options.label_smoothing > 0:
        logits = logits.clamp(min=-50)  # label smoothing sums every logit: -inf rows are infinite losses
    targets = torch.tensor([3, 20, 0, 22, 7, 11])[: logits.shape[0]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.linspace(0.5, 1.5, logits.shape[0], dtype=acc)
    want = chunk_statistics(logits.double(), targets, options)
    probs, got, row_sum = lce._statistics_inplace(logits.clone(), targets, options)
    rtol, atol = KERNEL_TOLERANCES[dtype]
    for name in ("lse", "target_logit", "logit_sum"):
        if getattr(want, name) is not None:
            torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=rtol, atol=atol, msg=name)

    _, *coefficients = loss_and_coefficients(got, weights, logits.shape[1], options)
    alpha, beta, delta = scale_coefficients(*coefficients, weights)
    want_grad = chunk_gradient(
        logits.double(), targets, want.shift, want.log_sum, alpha.double(), beta.double(), delta.double(), options
    )
    got_grad, factor = lce._gradient_inplace(probs, row_sum, logits.clone(), targets, coefficients, weights, options)
    assert got_grad.dtype == acc
    assert (factor is None) == (options.z_loss > 0 or options.focal_gamma > 0)  # alpha == 1 folds the row factor
    if factor is not None:
        got_grad = got_grad * factor.unsqueeze(1)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("n_rows", "vocab", "chunk_size", "expected"),
    [
        (4096, 32000, None, 820),  # ceil(N / 5)
        (2048, 128256, None, 410),
        (16384, 128256, None, 523),  # 256 MiB / (4 * 128256)
        (8192, 262144, None, 256),
        (300, 32000, None, 128),  # raised to MIN_CHUNK_ROWS
        (100, 32000, None, 100),  # never more than N
        (0, 32000, None, 1),
        (4096, 32000, 77, 77),
    ],
)
def test_chunk_rule(n_rows, vocab, chunk_size, expected):
    """fused_chunk_rows follows the documented rule (memory-free cap not binding on this machine)."""
    assert lce.fused_chunk_rows(n_rows, vocab, chunk_size=chunk_size) == expected


def test_chunk_rule_respects_free_memory(monkeypatch):
    """With little free memory the chunk shrinks to 1/16 of it."""
    monkeypatch.setattr(lce, "_available_bytes", lambda device: 16 * 4 * 32000 * 10)
    assert lce.fused_chunk_rows(4096, 32000, device=torch.device("cpu")) == 10


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_chunk_rule_rejects_bad_chunk_size(bad, entry):
    """Every entry point checks chunk_size alike (LossOptions), the plain path included."""
    import tokenloss as tl

    inputs = (torch.zeros(2, 5),) if entry == "cross_entropy" else (torch.zeros(2, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        getattr(tl, entry)(*inputs, torch.tensor([1, 2]), chunk_size=bad)


@pytest.fixture
def gradient_sinks(monkeypatch) -> list:
    """Every ``GradientSink`` the fused loss creates during the test, in order."""
    sinks = []
    original = lce.GradientSink.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sinks.append(self)

    monkeypatch.setattr(lce.GradientSink, "__init__", spy)
    return sinks


def _prepared(targets, options, vocab_size=11, **kwargs):
    return prepare_targets(tuple(targets.shape), targets, vocab_size, options, **kwargs)


@pytest.mark.parametrize(
    "options",
    [
        LossOptions(reduction="none"),
        LossOptions(reduction="none", softcap=2.0, label_smoothing=0.2, focal_gamma=1.5, z_loss=0.1),
    ],
    ids=["plain", "everything"],
)
def test_gradcheck_float64_recomputing_path(options):
    """float64 gradcheck of hidden, weight and bias through the "none" path (recomputed backward)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 10, 0, 5, -100, 3])
    prepared = _prepared(targets, options)

    def fn(h, w, b):
        return lce.linear_cross_entropy_loss(h, w, b, prepared, replace(options, chunk_size=3))

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "label_smoothing": 0.2, "focal_gamma": 0.5, "z_loss": 0.1}])
def test_gradients_in_forward_equal_float64_reference(reduction, options):
    """The gradients computed during the forward pass equal autograd through tokenloss.reference (float64)."""
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((9, 5), (11, 5), (11,))]
    targets = torch.tensor([1, -100, 10, 0, 5, -100, 3, 3, 2])
    mask = torch.tensor([True] * 8 + [False])
    opts = LossOptions(reduction=reduction, **options)
    fused = [t.clone().requires_grad_() for t in leaves]
    loss = lce.linear_cross_entropy_loss(*fused, _prepared(targets, opts, mask=mask), replace(opts, chunk_size=2))
    (loss * 1.7).backward()
    ref = [t.clone().requires_grad_() for t in leaves]
    ref_loss = reference_cross_entropy(ref[0] @ ref[1].T + ref[2], targets, mask=mask, reduction=reduction, **options)
    (ref_loss * 1.7).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_none_returns_zero_for_rows_that_do_not_count():
    """linear_cross_entropy_loss with "none" returns (N,) with exact zeros at ignored rows."""
    opts = LossOptions(reduction="none")
    targets = torch.tensor([1, -100, 10, -100])
    rows = lce.linear_cross_entropy_loss(torch.randn(4, 3), torch.randn(11, 3), None, _prepared(targets, opts), opts)
    assert rows.shape == (4,) and rows.dtype == torch.float32
    assert rows[1].item() == 0.0 and rows[3].item() == 0.0 and (rows[[0, 2]] > 0).all()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl-mm"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_both_logits_products_equal_the_unfused_loss(monkeypatch, onednn, reduction, bias):
    """float32 CPU chunks get their logits from oneDNN's linear (fresh tensor per chunk) or from
    torch.mm into one buffer (TOKENLOSS_ONEDNN=0); both give the unfused loss and gradients."""
    monkeypatch.setenv("TOKENLOSS_ONEDNN", "1" if onednn else "0")
    if onednn and lce._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN linear")
    probe = torch.empty(1, 1)
    assert lce._uses_onednn(probe) == onednn
    assert (lce.logits_buffer(probe, torch.empty(5, 1), 1) is None) == onednn
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    weight = torch.randn(37, 8, generator=gen, requires_grad=True)
    b = torch.randn(37, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, 37, (11,), generator=gen)
    opts = LossOptions(reduction=reduction, label_smoothing=0.1)
    fused = lce.linear_cross_entropy_loss(hidden, weight, b, _prepared(targets, opts, 37), replace(opts, chunk_size=4))
    leaves = [t for t in (hidden, weight, b) if t is not None]
    upstream = torch.linspace(0.5, 1.5, 11) if reduction == "none" else torch.tensor(1.0)
    got = torch.autograd.grad(fused, leaves, upstream)
    logits = hidden @ weight.t() if b is None else torch.addmm(b, hidden, weight.t())
    unfused = tl.cross_entropy(logits, targets, reduction=reduction, label_smoothing=0.1)
    want = torch.autograd.grad(unfused, leaves, upstream)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_works_inside_torch_compile(backend):
    """A compiled function that calls the fused loss gives the eager loss and gradients (Inductor
    included: the oneDNN product, which it cannot lower, is left out while compiling)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (3, 5), generator=gen)

    def step(h, w, t):
        return tl.linear_cross_entropy(torch.tanh(h), w, t, shift=True, z_loss=1e-3, chunk_size=4)

    want = step(hidden, weight, targets)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = torch.compile(step, backend=backend)(hidden, weight, targets)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_second_backward_raises_clear_error():
    """Gradients computed in the forward pass are handed out once; a second backward says why it fails."""
    opts = LossOptions()
    hidden = torch.randn(4, 3, requires_grad=True)
    loss = lce.linear_cross_entropy_loss(
        hidden, torch.randn(11, 3), None, _prepared(torch.tensor([1, 2, 3, 4]), opts), opts
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_rows_that_do_not_count_never_reach_a_product(monkeypatch):
    """Only counted rows are multiplied: an SFT batch with 70% prompt tokens does 30% of the products."""
    seen = []
    original = lce.chunk_logits

    def spy(hidden, weight, bias, out):
        seen.append(hidden.shape[0])
        return original(hidden, weight, bias, out)

    monkeypatch.setattr(lce, "chunk_logits", spy)
    targets = torch.randint(0, 11, (100,))
    mask = torch.arange(100) >= 70  # 70 prompt tokens
    opts = LossOptions()
    hidden = torch.randn(100, 3, requires_grad=True)
    lce.linear_cross_entropy_loss(
        hidden, torch.randn(11, 3), None, _prepared(targets, opts, mask=mask), replace(opts, chunk_size=8)
    ).backward()
    assert sum(seen) == 30
    assert hidden.grad[:70].abs().sum() == 0 and hidden.grad[70:].abs().sum() > 0


def test_frozen_weight_costs_no_weight_gradient(gradient_sinks):
    """With a frozen head no (V, D) gradient accumulator is allocated and weight.grad stays None."""
    opts = LossOptions()
    hidden, weight = torch.randn(6, 3, requires_grad=True), torch.randn(11, 3)
    lce.linear_cross_entropy_loss(hidden, weight, None, _prepared(torch.arange(6), opts), opts).backward()
    assert len(gradient_sinks) == 1 and gradient_sinks[0].weight is None and gradient_sinks[0].bias is None
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn", "mkl-mm"])
def test_never_allocates_an_n_by_v_tensor(onednn, peak_rss_growth):
    """Peak RSS growth of a fused step with N x V = 512 MiB of float32 logits stays far below N x V,
    and below two chunks, whichever product computes the logits (a fresh tensor per chunk or one buffer)."""
    chunk = 256
    setup = """
        n, d, v = 4096, 16, 32768
        hidden = torch.randn(n, d).requires_grad_()
        weight = (torch.randn(v, d) * 0.25).requires_grad_()
        targets = torch.randint(0, v, (n,))
    """
    step = f"tl.linear_cross_entropy(hidden, weight, targets, chunk_size={chunk}).backward()"
    growth = peak_rss_growth(setup, step, env={"TOKENLOSS_ONEDNN": onednn})
    n_by_v = 4096 * 32768 * 4
    chunk_buffer = chunk * 32768 * 4  # 32 MiB
    grads = (4096 * 16 + 32768 * 16) * 4
    assert growth < n_by_v / 4, f"peak grew by {growth / 2**20:.0f} MiB; N x V is {n_by_v / 2**20:.0f} MiB"
    assert growth < 2 * chunk_buffer + grads + (16 << 20), f"peak grew by {growth / 2**20:.0f} MiB"


@pytest.mark.slow
def test_bfloat16_gradients_at_262144_words_no_worse_than_pytorch():
    """At V = 262144 in bf16, the fused gradients (float32 accumulation over 8 chunks) are at least as
    close to float64 as PyTorch's unfused bf16 ``F.cross_entropy(hidden @ weight.T)``."""
    n, d, v = 32, 16, 262144
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).bfloat16()
    weight = (torch.randn(v, d, generator=gen) * 0.5).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)

    def grads(fn, dtype):
        h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        fn(h, w).backward()
        return h.grad.double(), w.grad.double()

    import tokenloss as tl

    truth = grads(lambda h, w: torch.nn.functional.cross_entropy(h @ w.T, targets), torch.float64)
    torch_bf16 = grads(lambda h, w: torch.nn.functional.cross_entropy(h @ w.T, targets), torch.bfloat16)
    fused = grads(lambda h, w: tl.linear_cross_entropy(h, w, targets, chunk_size=4), torch.bfloat16)
    for name, want, ours, theirs in zip(("hidden", "weight"), truth, fused, torch_bf16):
        ours_err = ((ours - want).norm() / want.norm()).item()
        theirs_err = ((theirs - want).norm() / want.norm()).item()
        assert ours_err <= theirs_err * 1.05, f"grad_{name}: fused {ours_err:.2e} vs PyTorch bf16 {theirs_err:.2e}"


@pytest.mark.parametrize(
    ("dtype", "accumulator"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32)],
    ids=str,
)
def test_low_precision_gradients_accumulate_in_float32(gradient_sinks, dtype, accumulator):
    """bf16/fp16: grad_weight and grad_bias accumulate across chunks in float32; grads come back in the input dtype."""
    opts = LossOptions()
    leaves = [torch.randn(*shape).to(dtype).requires_grad_() for shape in ((6, 3), (11, 3), (11,))]
    lce.linear_cross_entropy_loss(*leaves, _prepared(torch.arange(6), opts), replace(opts, chunk_size=2)).backward()
    assert gradient_sinks[0].weight.dtype == accumulator and gradient_sinks[0].bias.dtype == accumulator
    assert all(leaf.grad.dtype == dtype for leaf in leaves)
