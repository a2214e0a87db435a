"""tl.cross_entropy: parity with F.cross_entropy and the reference, every option, extremes, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenloss as tl
from tokenloss.reference import reference_cross_entropy

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 11), (3, 7, 11)]  # 2-D (N, V) and 3-D (B, T, V), awkward sizes on purpose


def torch_cross_entropy(logits, targets, **kwargs):
    """F.cross_entropy on ``(..., V)`` logits (PyTorch wants the class dimension second)."""
    return F.cross_entropy(logits.movedim(-1, 1) if logits.ndim >= 3 else logits, targets, **kwargs)


def loss_and_grad(fn, logits, targets, upstream_seed=7, **kwargs):
    """``(loss, dloss/dlogits)`` of ``fn``; a "none" loss is back-propagated with fixed random weights."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kwargs)
    upstream = torch.ones_like(loss)
    if loss.ndim:
        gen = torch.Generator().manual_seed(upstream_seed)
        upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    loss.backward(upstream)
    return loss.detach(), x.grad


def assert_no_worse_than_torch(ours, theirs, truth, margin):
    """ml-cross-entropy's rule: our error against the float64 truth is at most PyTorch's own plus ``margin``."""
    ours_error = (ours.double() - truth).abs().max().item()
    torch_error = (theirs.double() - truth).abs().max().item()
    assert ours_error <= torch_error + margin, f"ours {ours_error:.3g} vs F.cross_entropy {torch_error:.3g}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 4])
def test_parity_with_torch(
    dtype, shape, reduction, label_smoothing, ignore_index, make_logits, make_targets, tolerances, margins
):
    """Loss and gradient match F.cross_entropy (float64 truth, and no worse than PyTorch in the same dtype)."""
    logits = make_logits(*shape, dtype=dtype, scale=5.0)
    targets = make_targets(shape[:-1], shape[-1], ignore_every=3, ignore_index=ignore_index)
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing, "ignore_index": ignore_index}

    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets, **kwargs)
    true_loss, true_grad = loss_and_grad(torch_cross_entropy, logits.double(), targets, **kwargs)
    torch_loss, torch_grad = loss_and_grad(torch_cross_entropy, logits, targets, **kwargs)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert loss.shape == true_loss.shape
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad.double(), true_grad, **tolerances[dtype])
    assert_no_worse_than_torch(loss, torch_loss, true_loss, margins[dtype])
    assert_no_worse_than_torch(grad, torch_grad, true_grad, margins[dtype])


def test_float64_input_is_computed_in_float64(make_logits, make_targets, tolerances):
    """float64 logits give a float64-exact loss and gradient (what gradcheck relies on)."""
    logits = make_logits(5, 9, dtype=torch.float64)
    targets = make_targets((5,), 9)
    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets)
    true_loss, true_grad = loss_and_grad(torch_cross_entropy, logits, targets)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad, true_grad, **tolerances[torch.float64])


# Our options beyond PyTorch's, checked against tokenloss.reference (the formulas, in float64).
OPTION_CASES = {
    "mask": {"mask": True},
    "shift": {"shift": True},
    "shift_mask": {"shift": True, "mask": True},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "focal": {"focal_gamma": 2.0},
    "focal_below_one": {"focal_gamma": 0.5},
    "token_weights": {"token_weights": True},
    "num_items": {"num_items": 50},
    "num_items_tensor": {"num_items": torch.tensor(17.0)},
    "smoothing_focal": {"label_smoothing": 0.2, "focal_gamma": 1.5},
    "smoothing_softcap_zloss": {"label_smoothing": 0.1, "softcap": 2.0, "z_loss": 1e-3},
    "everything": {
        "mask": True,
        "shift": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 4.0,
        "focal_gamma": 0.7,
        "token_weights": True,
        "num_items": 30,
    },
}


def expand(options, targets, seed=3):
    """Replaces the ``True`` placeholders of ``mask``/``token_weights`` with tensors shaped like ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    options = dict(options)
    if options.get("mask") is True:
        options["mask"] = torch.rand(targets.shape, generator=gen) > 0.3
    if options.get("token_weights") is True:
        options["token_weights"] = torch.rand(targets.shape, generator=gen, dtype=torch.float64) * 2
    return options


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_options_match_reference(case, reduction, dtype, make_logits, make_targets, tolerances):
    """Every option and combination: loss and gradient equal the float64 reference formulas."""
    logits = make_logits(3, 7, 11, dtype=dtype, scale=5.0)
    targets = make_targets((3, 7), 11, ignore_every=4)
    options = expand(OPTION_CASES[case], targets)

    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets, reduction=reduction, **options)
    true_loss, true_grad = loss_and_grad(
        reference_cross_entropy, logits.double(), targets, reduction=reduction, **options
    )

    assert loss.dtype == torch.float32 and grad.dtype == dtype and loss.shape == true_loss.shape
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad.double(), true_grad, **tolerances[dtype])


@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(case, reduction, make_logits, make_targets):
    """float64 gradcheck (and gradgradcheck-free first order) of every option."""
    logits = make_logits(2, 4, 5, dtype=torch.float64, scale=2.0).requires_grad_()
    targets = make_targets((2, 4), 5, ignore_every=5)
    options = expand(OPTION_CASES[case], targets)
    if "token_weights" in options:
        options["token_weights"] = options["token_weights"].double()
    assert torch.autograd.gradcheck(
        lambda x: tl.cross_entropy(x, targets, reduction=reduction, **options), (logits,), eps=1e-6, atol=1e-7
    )


def test_chunking_does_not_change_the_result(make_logits, make_targets):
    """One row per chunk, an odd chunk size and one chunk give bit-identical losses and gradients."""
    logits = make_logits(3, 7, 11, scale=5.0)
    targets = make_targets((3, 7), 11, ignore_every=3)
    results = [
        loss_and_grad(tl.cross_entropy, logits, targets, chunk_size=size, label_smoothing=0.1, softcap=3.0)
        for size in (1, 5, None)
    ]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


# --- the causal shift ------------------------------------------------------------------------


def test_shift_counts_after_the_shift(make_logits, make_targets):
    """shift=True divides by the number of counted targets[..., 1:], not of targets (the off-by-one)."""
    logits = make_logits(2, 6, 5)
    targets = make_targets((2, 6), 5)
    targets[:, 1] = -100  # one ignored position per sequence after the shift: 2 * (5 - 1) = 8 count
    loss = tl.cross_entropy(logits, targets, shift=True)
    total = tl.cross_entropy(logits, targets, shift=True, reduction="sum")
    torch.testing.assert_close(loss, total / 8)
    sliced = F.cross_entropy(logits[:, :-1].reshape(-1, 5), targets[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, sliced)


def test_shift_ignores_first_target_and_last_logits(make_logits, make_targets):
    """With shift=True nothing depends on targets[..., 0] or on the logits of the last position."""
    logits = make_logits(2, 6, 5)
    targets = make_targets((2, 6), 5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    base = tl.cross_entropy(logits, targets, shift=True, mask=mask, reduction="none")
    logits2, targets2, mask2 = logits.clone(), targets.clone(), mask.clone()
    logits2[:, -1] = float("nan")  # never read as a counted row
    targets2[:, 0] = (targets2[:, 0] + 1) % 5
    mask2[:, 0] = False
    changed = tl.cross_entropy(logits2, targets2, shift=True, mask=mask2, reduction="none")
    assert base.shape == (2, 5)
    torch.testing.assert_close(changed, base, rtol=0, atol=0)


def test_shift_mask_and_weights_move_with_targets(make_logits, make_targets):
    """The mask and the token weights are shifted like the targets: mask[..., t + 1] gates position t."""
    logits = make_logits(1, 4, 3)
    targets = make_targets((1, 4), 3)
    mask = torch.tensor([[True, True, False, True]])
    weights = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    per_token = tl.cross_entropy(logits, targets, shift=True, mask=mask, token_weights=weights, reduction="none")
    plain = tl.cross_entropy(logits[:, :-1], targets[:, 1:], reduction="none")
    torch.testing.assert_close(per_token, plain * torch.tensor([[1.0, 0.0, 3.0]]))


# --- token weights and num_items -------------------------------------------------------------


def test_num_items_weights_micro_batches_like_one_batch(make_logits, make_targets):
    """Summing micro-batch means with the global num_items equals the mean of the whole batch."""
    logits = make_logits(10, 7)
    targets = make_targets((10,), 7, ignore_every=3)
    whole = tl.cross_entropy(logits, targets)
    count = int((targets != -100).sum())
    parts = tl.cross_entropy(logits[:3], targets[:3], num_items=count) + tl.cross_entropy(
        logits[3:], targets[3:], num_items=count
    )
    torch.testing.assert_close(parts, whole)


def test_token_weights_mean_divides_by_counted_positions(make_logits, make_targets):
    """A mean with token weights is sum(weight * loss) / number of counted positions (not / sum of weights)."""
    logits = make_logits(6, 5)
    targets = make_targets((6,), 5, ignore_every=4)  # positions 0 and 4 ignored: 4 count
    weights = torch.tensor([5.0, 0.5, 2.0, 1.0, 7.0, 3.0])
    per_token = tl.cross_entropy(logits, targets, reduction="none")
    mean = tl.cross_entropy(logits, targets, token_weights=weights)
    torch.testing.assert_close(mean, (per_token * weights).sum() / 4)


# --- the worked numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(("p", "expected"), [(0.7, 0.357), (0.95, 0.051), (0.05, 2.996), (0.5, 0.693), (0.001, 6.9)])
def test_worked_example_single_token(p, expected):
    """-log p of the course material: a target predicted with probability p costs -log p nats."""
    logits = torch.tensor([[math.log(p), math.log(1 - p)]])
    loss = tl.cross_entropy(logits, torch.tensor([0]))
    assert round(loss.item(), 3 if expected < 6 else 1) == expected


def test_worked_example_sentence():
    """'The quick brown fox': p = 0.02, 0.15, 0.40, 0.60 cost 3.91, 1.90, 0.92, 0.51 and average 1.81."""
    p = torch.tensor([0.02, 0.15, 0.40, 0.60], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1).float()  # (4, 2)
    targets = torch.zeros(4, dtype=torch.long)
    per_token = tl.cross_entropy(logits, targets, reduction="none")
    assert [round(v, 2) for v in per_token.tolist()] == [3.91, 1.90, 0.92, 0.51]
    assert round(tl.cross_entropy(logits, targets).item(), 2) == 1.81


@pytest.mark.parametrize(("vocab_size", "expected"), [(5, 1.609), (256, 5.545)])
def test_uniform_logits_cost_log_vocab(vocab_size, expected):
    """A uniform guess over V classes costs log V nats: 1.609 for V = 5, 5.545 for V = 256."""
    loss = tl.cross_entropy(torch.zeros(3, vocab_size), torch.tensor([0, 1, vocab_size - 1]))
    assert round(loss.item(), 3) == expected


# --- extreme inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits(dtype, tolerances):
    """Logits of +-1e4: no overflow; losses of 0 and 2e4 and the exact softmax - onehot."""
    logits = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    targets = torch.tensor([0, 1, 2])
    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets, reduction="sum")
    true_loss, true_grad = loss_and_grad(torch_cross_entropy, logits.double(), targets, reduction="sum")
    if dtype == torch.float32:
        assert true_loss.item() == pytest.approx(2e4 + math.log(3))
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad.double(), true_grad, **tolerances[dtype])


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6, 1e8])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_as_accurate_as_pytorch_at_every_magnitude(offset, entry):
    """float32 logits offset by up to 1e8: per-row losses and the gradient are as close to float64 as
    F.cross_entropy's (statistics relative to the row maximum, not an absolute log-sum-exp)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(512, 300, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 300, (512,), generator=gen)
    logits = (base + offset).float()

    def per_row_and_grad(fn, x):
        x = x.clone().requires_grad_()
        rows = fn(x)
        rows.sum().backward()
        return rows.detach().double(), x.grad.double()

    truth = per_row_and_grad(lambda x: F.cross_entropy(x, targets, reduction="none"), logits.double())
    torch_32 = per_row_and_grad(lambda x: F.cross_entropy(x, targets, reduction="none"), logits)
    if entry == "cross_entropy":
        ours = per_row_and_grad(lambda x: tl.cross_entropy(x, targets, reduction="none"), logits)
    else:  # the logits as hidden @ I: the fused path sees the same numbers
        eye = torch.eye(300)
        ours = per_row_and_grad(lambda x: tl.linear_cross_entropy(x, eye, targets, reduction="none"), logits)
    # Mean absolute error over the rows (the max of either is one ulp of a loss near 10, noisy).
    for name, want, got, theirs in zip(("loss", "gradient"), truth, ours, torch_32):
        our_error, their_error = (got - want).abs().mean().item(), (theirs - want).abs().mean().item()
        assert our_error <= 1.25 * their_error + 1e-9, f"{name}: ours {our_error:.2e} vs PyTorch {their_error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equal_logits_near_the_float_maximum_cost_log_two(dtype):
    """Two equal logits of 3e38 (near bf16's and float32's largest): log 2, not 0."""
    logits = torch.full((1, 2), 3e38, dtype=dtype)
    torch.testing.assert_close(tl.cross_entropy(logits, torch.tensor([0])), torch.tensor(math.log(2)))


@pytest.mark.parametrize("options", [{}, {"softcap": 5.0}, {"focal_gamma": 2.0}, {"z_loss": 1e-2}], ids=str)
def test_minus_inf_on_non_target_classes(options, tolerances):
    """-inf logits on non-target classes (a masked vocabulary) give finite losses and zero gradient there."""
    logits = torch.tensor([[2.0, -math.inf, 0.5, -math.inf], [-math.inf, -math.inf, -math.inf, 1.0]])
    targets = torch.tensor([2, 3])
    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets, **options)
    true_loss, true_grad = loss_and_grad(reference_cross_entropy, logits.double(), targets, **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[logits == -math.inf] == 0).all()
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad.double(), true_grad, **tolerances[torch.float32])


def test_vocabulary_of_one():
    """V = 1: the only class has probability 1, so the loss and its gradient are exactly 0."""
    logits = torch.randn(4, 1).requires_grad_()
    loss = tl.cross_entropy(logits, torch.zeros(4, dtype=torch.long), label_smoothing=0.3)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


def test_vocabulary_of_262144(make_logits, tolerances):
    """V = 262144 (Gemma 3's vocabulary) on a few rows matches F.cross_entropy."""
    logits = make_logits(3, 262144, scale=3.0)
    targets = torch.tensor([0, 131071, 262143])
    loss, grad = loss_and_grad(tl.cross_entropy, logits, targets)
    true_loss, true_grad = loss_and_grad(torch_cross_entropy, logits.double(), targets)
    torch.testing.assert_close(loss.double(), true_loss, **tolerances[torch.float32])
    torch.testing.assert_close(grad.double(), true_grad, **tolerances[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_tokens(reduction):
    """An empty batch gives 0.0 (mean/sum) or an empty tensor (none), and an empty gradient."""
    logits = torch.randn(0, 7, requires_grad=True)
    loss = tl.cross_entropy(logits, torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0
    loss.sum().backward()
    assert logits.grad.shape == (0, 7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("how", ["ignore_index", "mask", "shift_length_one"])
def test_nothing_counts_gives_exact_zero(how, reduction):
    """All positions ignored: the loss is exactly 0.0 (not NaN) and the gradient exactly 0, even with NaN logits."""
    logits = torch.full((2, 1 if how == "shift_length_one" else 3, 5), float("nan"), requires_grad=True)
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3, "focal_gamma": 2.0}
    if how == "ignore_index":
        targets.fill_(-100)
    elif how == "mask":
        kwargs["mask"] = torch.zeros(targets.shape, dtype=torch.bool)
    else:
        kwargs["shift"] = True
    loss = tl.cross_entropy(logits, targets, **kwargs)
    assert not torch.isnan(loss).any() and (loss == 0).all()
    loss.sum().backward()
    assert (logits.grad == 0).all()


def test_check_inputs_false_skips_the_nan_check():
    """check_inputs=False opts out of the NaN check (for speed): the loss is then NaN, as the user asked."""
    logits = torch.tensor([[0.0, float("nan")]])
    assert torch.isnan(tl.cross_entropy(logits, torch.tensor([0]), check_inputs=False))


# --- inplace backward ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0, "label_smoothing": 0.1}], ids=str)
def test_inplace_backward_writes_the_same_gradient_into_the_logits(dtype, options, make_logits, make_targets):
    """inplace_backward=True: the gradient equals the normal one and lives in the logits' storage."""
    weight = make_logits(3, 7, 11, dtype=dtype).requires_grad_()
    targets = make_targets((3, 7), 11, ignore_every=3)
    _, expected = loss_and_grad(tl.cross_entropy, weight.detach(), targets, **options)

    logits = weight * 1  # a non-leaf, like the output of an lm_head
    seen = {}
    logits.register_hook(lambda grad: seen.setdefault("grad", grad))
    tl.cross_entropy(logits, targets, inplace_backward=True, **options).backward()

    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)
    assert seen["grad"].data_ptr() == logits.data_ptr()
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=0)


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    # (name, kwargs override, error type, the argument the message must name)
    ("logits not a tensor", {"logits": [[0.0, 1.0]]}, TypeError, "logits"),
    ("integer logits", {"logits": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "logits"),
    ("mismatched shapes", {"targets": torch.zeros(4, dtype=torch.long)}, ValueError, "targets"),
    # floating targets are probability targets (as in PyTorch): shaped like the logits or refused
    ("float targets of another shape", {"targets": torch.zeros(3)}, ValueError, "probability targets must have"),
    ("bool targets", {"targets": torch.zeros(3, dtype=torch.bool)}, TypeError, "targets"),
    ("target too large", {"targets": torch.tensor([0, 4, 1])}, ValueError, "targets"),
    ("negative target", {"targets": torch.tensor([0, -1, 1])}, ValueError, "targets"),
    ("mask wrong shape", {"mask": torch.ones(4, dtype=torch.bool)}, ValueError, "mask"),
    ("mask wrong dtype", {"mask": torch.ones(3)}, TypeError, "mask"),
    ("token_weights wrong shape", {"token_weights": torch.ones(2)}, ValueError, "token_weights"),
    ("token_weights integer", {"token_weights": torch.ones(3, dtype=torch.long)}, TypeError, "token_weights"),
    ("unknown reduction", {"reduction": "avg"}, ValueError, "reduction"),
    ("negative label_smoothing", {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ("label_smoothing above one", {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ("negative softcap", {"softcap": -1.0}, ValueError, "softcap"),
    ("zero softcap", {"softcap": 0.0}, ValueError, "softcap"),
    ("negative z_loss", {"z_loss": -1e-4}, ValueError, "z_loss"),
    ("negative focal_gamma", {"focal_gamma": -1.0}, ValueError, "focal_gamma"),
    ("string z_loss", {"z_loss": "0.1"}, TypeError, "z_loss"),
    ("float ignore_index", {"ignore_index": -100.0}, TypeError, "ignore_index"),
    ("negative num_items", {"num_items": -3}, ValueError, "num_items"),
    ("num_items of several elements", {"num_items": torch.tensor([1, 2])}, ValueError, "num_items"),
    ("unknown impl", {"impl": "cuda"}, ValueError, "impl"),
    (
        "nan logits",
        {"logits": torch.tensor([[0.0, float("nan"), 0.0, 0.0]] + [[0.0, 1.0, 2.0, 3.0]] * 2)},
        ValueError,
        "logits",
    ),
    (
        "inf logits",
        {"logits": torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, float("inf"), 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])},
        ValueError,
        "logits",
    ),
    (
        "shift without sequence",
        {"shift": True, "logits": torch.zeros(4), "targets": torch.tensor(0)},
        ValueError,
        "shift",
    ),
]


@pytest.mark.parametrize(("case", "override", "error", "argument"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case, override, error, argument):
    """Each kind of bad input raises a clear TypeError/ValueError whose message starts with the argument's name."""
    kwargs = {"logits": torch.zeros(3, 4), "targets": torch.tensor([0, 3, -100])}
    kwargs.update(override)
    with pytest.raises(error, match=rf"^{argument}\b"):
        tl.cross_entropy(kwargs.pop("logits"), kwargs.pop("targets"), **kwargs)


# --- layouts ---------------------------------------------------------------------------------


def test_int32_targets_and_a_single_position(make_logits):
    """int32 targets equal int64 ones; (V,) logits with a 0-dim target give a 0-dim "none" loss."""
    logits = make_logits(4, 6)
    targets = torch.tensor([0, 5, 2, 3])
    torch.testing.assert_close(tl.cross_entropy(logits, targets.int()), tl.cross_entropy(logits, targets))
    single = tl.cross_entropy(logits[1], targets[1], reduction="none")
    assert single.shape == ()
    torch.testing.assert_close(single, F.cross_entropy(logits[1], targets[1]))


def test_non_contiguous_logits(make_logits, make_targets):
    """Strided logits (a transpose, then a slice) give the same loss and gradient as a contiguous copy."""
    base = make_logits(7, 3, 11).requires_grad_()
    logits = base.transpose(0, 1)[:, :-1]  # (3, 6, 11), non-contiguous
    assert not logits.is_contiguous()
    targets = make_targets((3, 6), 11, ignore_every=4)
    loss = tl.cross_entropy(logits, targets, label_smoothing=0.1)
    loss.backward()
    expected_loss, expected_grad = loss_and_grad(tl.cross_entropy, logits.contiguous(), targets, label_smoothing=0.1)
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(base.grad.transpose(0, 1)[:, :-1], expected_grad)
    assert (base.grad[-1] == 0).all()
