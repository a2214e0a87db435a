"""Public API of the fused linear + cross-entropy: parity with the unfused composition, the Module, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import tokenloss as tl

V, D = 13, 6

# Option sets shared by the parity tests; each covers one feature of tl.cross_entropy.
OPTION_CASES = {
    "plain": {},
    "ignore_index": {"ignore_index": 3},
    "mask": {"mask": True},
    "shift": {"shift": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "focal": {"focal_gamma": 2.0},
    "focal_half": {"focal_gamma": 0.5},
    "token_weights": {"token_weights": True},
    "num_items": {"num_items": 40},
    "everything": {
        "mask": True,
        "shift": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 4.0,
        "focal_gamma": 1.5,
        "token_weights": True,
    },
    "everything_none": {"reduction": "none", "softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3, "mask": True},
}


def make_inputs(shape, dtype=torch.float32, *, bias=True, seed=0, scale=3.0):
    """hidden ``(*shape, D)``, weight ``(V, D)``, bias ``(V,)``, targets ``(*shape)`` with some ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, D, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, D, generator=gen, dtype=torch.float64) / D**0.5).to(dtype)
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, V, shape, generator=gen)
    targets.view(-1)[::4] = -100
    return hidden, weight, b, targets


def expand_options(options, targets, seed=1):
    """Replaces the ``True`` placeholders of mask/token_weights with tensors shaped like ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    options = dict(options)
    if "ignore_index" in options:
        targets.masked_fill_(targets == -100, options["ignore_index"])
    if options.get("mask"):
        options["mask"] = torch.rand(targets.shape, generator=gen) > 0.3
    if options.get("token_weights"):
        options["token_weights"] = torch.rand(targets.shape, generator=gen) + 0.5
    return options


def run_both(hidden, weight, bias, targets, options, *, fused_kwargs=None, upstream=None):
    """Loss and gradients of the fused call and of ``tl.cross_entropy(hidden @ weight.T + bias)``."""
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
        h, w = leaves[0], leaves[1]
        b = leaves[2] if bias is not None else None
        if fused:
            loss = tl.linear_cross_entropy(h, w, targets, bias=b, **options, **(fused_kwargs or {}))
        else:
            logits = h @ w.T if b is None else h @ w.T + b
            loss = tl.cross_entropy(logits, targets, **options)
        weighting = torch.ones_like(loss) if upstream is None else upstream(loss)
        (loss * weighting).sum().backward()
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    return results


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("chunk_size", [4, None], ids=["chunk4", "auto"])
def test_matches_unfused_float32_for_every_option(case, chunk_size):
    """Loss and all three gradients equal the unfused composition in float32 (awkward N=2*11, chunk 4)."""
    hidden, weight, bias, targets = make_inputs((2, 11))
    options = expand_options(OPTION_CASES[case], targets)
    upstream = (lambda loss: torch.linspace(0.5, 2.0, loss.numel()).view_as(loss)) if loss_is_none(options) else None
    (loss, grads), (ref_loss, ref_grads) = run_both(
        hidden, weight, bias, targets, options, fused_kwargs={"chunk_size": chunk_size}, upstream=upstream
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def loss_is_none(options):
    return options.get("reduction") == "none"


@pytest.mark.parametrize("case", ["plain", "everything", "none"])
def test_bfloat16_error_no_worse_than_unfused_bfloat16(case):
    """In bf16 the fused loss and gradients are at least as close to float64 as the unfused bf16 composition."""
    hidden, weight, bias, targets = make_inputs((3, 17), torch.bfloat16)
    options = expand_options(OPTION_CASES[case], targets)
    (loss, grads), (bf_loss, bf_grads) = run_both(
        hidden, weight, bias, targets, options, fused_kwargs={"chunk_size": 5}
    )
    truth_loss, truth_grads = run_both(hidden.double(), weight.double(), bias.double(), targets, options)[1]
    assert loss.dtype == torch.float32
    err = (loss.double() - truth_loss).abs().max()
    bf_err = (bf_loss.double() - truth_loss).abs().max()
    assert err <= bf_err + 1e-3 * truth_loss.abs().max(), (err, bf_err)
    for grad, bf_grad, truth in zip(grads, bf_grads, truth_grads):
        assert grad.dtype == torch.bfloat16
        rel = (grad.double() - truth).norm() / truth.norm()
        bf_rel = (bf_grad.double() - truth).norm() / truth.norm()
        assert rel <= bf_rel * 1.1 + 1e-3, (rel, bf_rel)


@pytest.mark.parametrize(
    ("n_rows", "chunk_size"),
    [(10, 3), (2, 16), (0, 4), (1, 1), (7, 7)],
    ids=["not_multiple", "n_below_chunk", "empty", "single", "exact"],
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_shapes_and_bias(n_rows, chunk_size, with_bias):
    """N not a multiple of the chunk, N < chunk, N = 0, with and without bias: same as unfused."""
    hidden, weight, bias, targets = make_inputs((n_rows,), bias=with_bias)
    (loss, grads), (ref_loss, ref_grads) = run_both(
        hidden, weight, bias, targets, {}, fused_kwargs={"chunk_size": chunk_size}
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_nothing_counts_gives_zero_loss_and_zero_gradients():
    """All rows ignored: loss exactly 0, gradients exactly 0 (like the unfused loss)."""
    hidden, weight, bias, targets = make_inputs((5,))
    targets.fill_(-100)
    (loss, grads), _ = run_both(hidden, weight, bias, targets, {}, fused_kwargs={"chunk_size": 2})
    assert loss.item() == 0.0
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]
)
def test_requires_grad_combinations(requires):
    """Only the inputs that require grad get one, and it matches the unfused gradient."""
    hidden, weight, bias, targets = make_inputs((9,))
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    tl.cross_entropy(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], targets).backward()
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip((hidden, weight, bias), requires)]
    tl.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=4).backward()
    for leaf, ref, flag in zip(leaves, ref_leaves, requires):
        if flag:
            torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)
        else:
            assert leaf.grad is None


def test_no_grad_and_frozen_inputs_give_a_plain_loss():
    """Under no_grad (or with nothing requiring grad) the loss is still exact and has no graph."""
    hidden, weight, bias, targets = make_inputs((2, 5))
    ref = tl.cross_entropy(hidden @ weight.T + bias, targets)
    with torch.no_grad():
        loss = tl.linear_cross_entropy(hidden.requires_grad_(), weight, targets, bias=bias)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref)


def test_upstream_gradient_scales_mean_gradients():
    """The gradients computed in the forward pass are scaled by the upstream gradient (here 3 * loss)."""
    hidden, weight, bias, targets = make_inputs((8,))
    (_, grads), (_, ref_grads) = run_both(
        hidden, weight, bias, targets, {}, fused_kwargs={"chunk_size": 3}, upstream=lambda loss: torch.tensor(3.0)
    )
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_uniform_logits_give_log_v():
    """Zero weights give uniform logits: the loss is exactly log V (1.609 for V = 5)."""
    loss = tl.linear_cross_entropy(torch.randn(4, 3), torch.zeros(5, 3), torch.tensor([0, 1, 2, 4]))
    torch.testing.assert_close(loss, torch.tensor(1.6094379))


def test_module_passes_every_option_through():
    """LinearCrossEntropyLoss(**options)(...) equals linear_cross_entropy(..., **options)."""
    hidden, weight, bias, targets = make_inputs((2, 7))
    targets.masked_fill_(targets == -100, 2)
    options = dict(
        ignore_index=2, shift=True, reduction="sum", label_smoothing=0.1, z_loss=1e-3, softcap=3.0, focal_gamma=1.0
    )
    mask = torch.rand(targets.shape) > 0.2
    crit = tl.LinearCrossEntropyLoss(**options, impl="torch", check_inputs=True, chunk_size=3)
    got = crit(hidden, weight, targets, bias=bias, mask=mask, num_items=5)
    want = tl.linear_cross_entropy(hidden, weight, targets, bias=bias, mask=mask, num_items=5, **options)
    torch.testing.assert_close(got, want)
    assert "softcap=3.0" in repr(crit)


def test_module_and_function_take_the_same_options_in_the_same_order():
    """The Module's constructor options are the function's options, in the function's order."""
    import inspect

    fn = [p for p in inspect.signature(tl.linear_cross_entropy).parameters if p not in ("hidden", "weight", "targets")]
    per_batch = ("bias", "mask", "token_weights", "num_items")
    module = list(inspect.signature(tl.LinearCrossEntropyLoss.__init__).parameters)[1:]
    assert [p for p in fn if p not in per_batch] == module


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden": torch.ones(3, D, dtype=torch.long)}, TypeError, "hidden must be float32"),
        ({"weight": torch.ones(V, D + 1)}, ValueError, r"weight must have shape \(V, D\)"),
        ({"weight": torch.ones(V * D)}, ValueError, r"weight must have shape \(V, D\)"),
        ({"weight": torch.ones(V, D, dtype=torch.float64)}, TypeError, "weight must have the dtype of hidden"),
        ({"bias": torch.ones(V + 1)}, ValueError, r"bias must have shape \(V,\)"),
        ({"bias": torch.ones(V, dtype=torch.bfloat16)}, TypeError, "bias must have the dtype of hidden"),
        ({"bias": [0.0] * V}, TypeError, "bias must be a torch.Tensor"),
        ({"targets": torch.zeros(4, dtype=torch.long)}, ValueError, "the shape of hidden without its last dimension"),
        ({"targets": torch.full((3,), V)}, ValueError, r"targets must be in \[0, 13\)"),
        ({"shift": True}, ValueError, r"shift=True needs hidden shaped \(..., T, D\)"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"hidden": torch.full((3, D), float("nan"))}, ValueError, "NaN or infinite"),
    ],
    ids=lambda value: None,
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    """Wrong dtypes, shapes, devices and options name the argument and what was expected."""
    args = {"hidden": torch.ones(3, D), "weight": torch.ones(V, D), "targets": torch.zeros(3, dtype=torch.long)}
    args.update(kwargs)
    if kwargs.get("shift"):
        args["hidden"] = torch.ones(D)
        args["targets"] = torch.zeros((), dtype=torch.long)
    with pytest.raises(error, match=match):
        tl.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    """On CUDA the torch path gives the CPU result (float32)."""
    hidden, weight, bias, targets = make_inputs((3, 9))
    options = expand_options(OPTION_CASES["everything"], targets)
    cpu = tl.linear_cross_entropy(hidden, weight, targets, bias=bias, **options)
    cuda_options = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    gpu = tl.linear_cross_entropy(
        hidden.cuda(), weight.cuda(), targets.cuda(), bias=bias.cuda(), impl="torch", **cuda_options
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
