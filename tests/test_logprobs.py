"""tokenloss.token_logprobs / linear_token_logprobs: per-token log-probs and entropy for RL, against float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl

# Outputs are accumulated in float32 (float64 for float64); gradients come back in the input dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def reference(logits, tokens, *, temperature=1.0, shift=False, mask=None, ignore_index=-100):
    """logp and entropy from full float64 log-softmax (0 where a position does not count)."""
    x = logits.double() / temperature
    if shift:
        x, tokens = x[..., :-1, :], tokens[..., 1:]
        mask = None if mask is None else mask[..., 1:]
    counted = tokens != ignore_index
    if mask is not None:
        counted = counted & mask
    log_p = torch.log_softmax(x, dim=-1)
    logp = log_p.gather(-1, torch.where(counted, tokens, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(counted, logp, zero), torch.where(counted, entropy, zero)


def _inputs(dtype, seed=0, shape=(3, 7), vocab=11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 5, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, shape, generator=gen)
    tokens[0, 2] = -100
    mask = torch.rand(shape, generator=gen) < 0.8
    upstream = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    return [t.to(dtype) for t in (hidden, weight, bias)], tokens, mask, upstream


CASES = {
    "plain": {},
    "temperature": dict(temperature=0.6),
    "shift": dict(shift=True),
    "mask": dict(use_mask=True),
    "all": dict(temperature=1.7, shift=True, use_mask=True, chunk_size=2),
}


@pytest.mark.parametrize("entry", ["token_logprobs", "linear_token_logprobs"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_independent_gradients_match_float64(entry, dtype, case, cache_blocks):
    """logp and entropy, and the gradients of g * logp + h * entropy (independent g, h per token),
    equal the float64 reference built from full logits."""
    options = dict(CASES[case])
    (hidden, weight, bias), tokens, mask, (g, h) = _inputs(dtype)
    if options.pop("use_mask", False):
        options["mask"] = mask
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias)]
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    want = reference(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], tokens, **ref_options)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    if entry == "token_logprobs":
        got = tl.token_logprobs(leaves[0] @ leaves[1].T + leaves[2], tokens, **options)
    else:
        got = tl.linear_token_logprobs(leaves[0], leaves[1], tokens, bias=leaves[2], **options)
    out_tol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    if dtype == torch.bfloat16:
        out_tol = TOLERANCES[torch.bfloat16]
    for ours, theirs in zip(got, want):
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert ours.shape == theirs.shape
        assert_close(ours.double(), theirs, **out_tol)
    gs = [u[..., 1:] if options.get("shift") else u for u in (g, h)]
    (sum((o * u.to(o.dtype)).sum() for o, u in zip(got, gs))).backward()
    (sum((o * u).sum() for o, u in zip(want, gs))).backward()
    for ours, theirs in zip(leaves, ref_leaves):
        assert ours.grad.dtype == dtype
        if dtype == torch.bfloat16:  # bf16 products: compare the whole gradient, relative to its norm
            error = (ours.grad.double() - theirs.grad).norm() / theirs.grad.norm()
            assert error < 2e-2, f"relative gradient error {error:.3g}"
        else:
            assert_close(ours.grad.double(), theirs.grad, **TOLERANCES[dtype])


def test_uniform_logits_give_minus_log_v_and_log_v():
    logp, entropy = tl.token_logprobs(torch.zeros(2, 3, 256), torch.randint(0, 256, (2, 3)))
    assert_close(logp, torch.full((2, 3), -math.log(256)))
    assert_close(entropy, torch.full((2, 3), math.log(256)))


def test_logp_alone_and_positions_that_do_not_count():
    logits = torch.randn(2, 4, 9)
    tokens = torch.tensor([[1, -100, 3, 4], [5, 6, -100, 8]])
    logp = tl.token_logprobs(logits, tokens, return_entropy=False)
    assert isinstance(logp, torch.Tensor) and logp.shape == (2, 4)
    assert logp[0, 1] == 0 and logp[1, 2] == 0 and (logp[tokens != -100] < 0).all()


def test_fused_rows_that_do_not_count_never_reach_a_product(monkeypatch):
    from tokenloss import logprobs

    seen = []
    original = logprobs.chunk_logits
    monkeypatch.setattr(
        logprobs, "chunk_logits", lambda h, w, b, buffer: seen.append(h.shape[0]) or original(h, w, b, buffer)
    )
    tokens = torch.randint(0, 11, (100,))
    mask = torch.arange(100) >= 70  # a prompt of 70 tokens
    hidden = torch.randn(100, 4, requires_grad=True)
    logp, entropy = tl.linear_token_logprobs(hidden, torch.randn(11, 4), tokens, mask=mask, chunk_size=8)
    (logp.sum() + entropy.sum()).backward()
    assert sum(seen) == 2 * 30  # forward and the recomputing backward, counted rows only
    assert hidden.grad[:70].abs().sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=math.nan), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a number"),
        (dict(shift=-1), TypeError, "shift must be"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        tl.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 2]), **kwargs)
    with pytest.raises(error, match=match):
        tl.linear_token_logprobs(torch.zeros(2, 3), torch.zeros(5, 3), torch.tensor([1, 2]), **kwargs)


def test_bad_tokens_and_non_finite_logits_raise():
    with pytest.raises(ValueError, match="targets must be in"):
        tl.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="targets must have shape"):
        tl.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 2, 3]))
    logits = torch.zeros(2, 5)
    logits[1, 2] = -math.inf
    with pytest.raises(ValueError, match="non-finite log-probability in 1 counted row"):
        tl.token_logprobs(logits, torch.tensor([1, 2]))
    logits[1, 2] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        tl.token_logprobs(logits, torch.tensor([1, 3]))
    assert tl.token_logprobs(logits, torch.tensor([1, -100]), return_entropy=False)[1] == 0  # ignored: fine


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip=0.2, beta=0.04):
    """GRPO's clipped surrogate with a k3 KL penalty to a reference policy, per token, then the mean."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # the k3 estimator, >= 0
    per_token = -(surrogate - beta * kl)
    return (per_token * mask).sum() / mask.sum()


def test_grpo_objective_on_fused_logprobs_equals_full_float64_logits():
    """The README's GRPO example: loss and gradients through linear_token_logprobs equal those through
    full float64 logits."""
    gen = torch.Generator().manual_seed(0)
    batch, length, dim, vocab = 4, 9, 8, 50
    hidden = torch.randn(batch, length, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.5
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    completion = (torch.arange(length) >= 3).expand(batch, length)  # the first 3 tokens are the prompt
    advantages = torch.randn(batch, 1, generator=gen)
    with torch.no_grad():
        old = reference(hidden @ (weight * 1.01).T, tokens, shift=True, mask=completion)[0].float()
        ref = reference(hidden @ (weight * 0.99).T, tokens, shift=True, mask=completion)[0].float()
    mask = completion[:, 1:].float()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = tl.linear_token_logprobs(h, w, tokens, shift=True, mask=completion)
    loss = grpo_loss(logp, old, ref, advantages, mask) - 0.01 * (entropy * mask).sum() / mask.sum()
    loss.backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, entropy64 = reference(h64 @ w64.T, tokens, shift=True, mask=completion)
    m64 = mask.double()
    want = (
        grpo_loss(logp64, old.double(), ref.double(), advantages.double(), m64)
        - 0.01 * (entropy64 * m64).sum() / m64.sum()
    )
    want.backward()
    assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["token_logprobs", "linear_token_logprobs"])
@pytest.mark.parametrize("shift", [False, True])
def test_return_top1_is_argmax_equal_to_token(fused, shift, cache_blocks) -> None:
    """is_top1 equals (argmax of the full logits == token) at counted positions, False elsewhere; ties go to the
    first index as torch.argmax; logp and entropy are unchanged by asking for it."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 5, generator=gen)
    weight = torch.randn(11, 5, generator=gen)
    weight[4] = weight[3]  # classes 3 and 4 always tie: 4 is never the argmax
    logits = hidden @ weight.T
    tokens = torch.roll(logits.argmax(-1), 1 if shift else 0, dims=-1)
    tokens[:, ::3] = torch.randint(0, 11, tokens[:, ::3].shape, generator=gen)
    tokens[0, 4] = 4
    tokens[1, 1] = -100
    mask = torch.rand(2, 9, generator=gen) < 0.8
    common = dict(shift=shift, mask=mask, temperature=0.7)
    if fused:
        logp, ent, top1 = tl.linear_token_logprobs(hidden, weight, tokens, return_top1=True, chunk_size=4, **common)
        expected = tl.linear_token_logprobs(hidden, weight, tokens, chunk_size=4, **common)
    else:
        logp, ent, top1 = tl.token_logprobs(logits, tokens, return_top1=True, chunk_size=4, **common)
        expected = tl.token_logprobs(logits, tokens, chunk_size=4, **common)
    assert_close((logp, ent), expected, rtol=0, atol=0)
    z, t, m = (logits[:, :-1], tokens[:, 1:], mask[:, 1:]) if shift else (logits, tokens, mask)
    want = (z.argmax(-1) == t) & (t != -100) & m
    assert top1.dtype == torch.bool and torch.equal(top1, want)
    assert 0 < int(want.sum()) < want.numel()
    with pytest.raises(TypeError, match="return_top1 must be True or False"):
        tl.token_logprobs(logits, tokens, return_top1=1)


@pytest.mark.parametrize("fused", [False, True])
def test_minus_inf_logits_give_finite_gradients(fused, cache_blocks) -> None:
    """A -inf logit (a banned token, p = 0) with both logp and entropy differentiated: its gradient is 0, not
    NaN (e^x * x is 0 * -inf there), and the others equal those of the same row without that column."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    logits[:, 4] = float("-inf")
    tokens = torch.tensor([0, 2, 5])
    g, h = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    if fused:  # -inf through the bias
        bias = torch.zeros(6, dtype=torch.float64)
        bias[4] = float("-inf")
        logp, ent = tl.linear_token_logprobs(torch.eye(3, dtype=torch.float64), x.nan_to_num(neginf=0.0).T.contiguous(),
                                             tokens, bias=bias)  # fmt: skip
    else:
        logp, ent = tl.token_logprobs(x, tokens)
    ((logp * g).sum() + (ent * h).sum()).backward()
    kept = [0, 1, 2, 3, 5]
    y = logits[:, kept].clone().requires_grad_()
    logp_ref, ent_ref = tl.token_logprobs(y, torch.tensor([0, 2, 4]))
    ((logp_ref * g).sum() + (ent_ref * h).sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert_close(logp, logp_ref)
    if not fused:
        assert (x.grad[:, 4] == 0).all()
        assert_close(x.grad[:, kept], y.grad)
