"""The Triton log-probability kernels give the torch path's logp, entropy, is_top1 and gradients, from logits and
fused with the head, for every dtype."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import tokenloss as tl  # noqa: E402

pytestmark = pytest.mark.triton_kernels

N, D, V = 3, 8, 203  # V: three tiles of 64 (conftest lowers MAX_BLOCK_V) and 11 more columns

# Both paths accumulate in float32 (float64 for float64); gradients are rounded once to the input dtype.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


def _case(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    logits = (hidden @ weight.T) * 2
    logits[0, 1, 150] = float("-inf")  # a -inf logit: no NaN in the entropy or its gradient
    tokens = torch.randint(0, V, (2, N), generator=gen)
    tokens[1, 0] = -100
    tokens[0, 2] = int(logits[0, 2].argmax())  # a token that is the argmax
    g = torch.randn(2, N, generator=gen, dtype=torch.float64)
    h = torch.randn(2, N, generator=gen, dtype=torch.float64)
    return tuple(t.to(device) for t in (hidden.to(dtype), weight.to(dtype), logits.to(dtype), tokens, g, h))


def _run(function, inputs, tokens, g, h, **options):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    logp, ent, top1 = function(*inputs, tokens, return_top1=True, **options)
    (logp * g.to(logp.dtype)).sum().add((ent * h.to(ent.dtype)).sum()).backward()
    return logp.detach(), ent.detach(), top1, [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_from_logits_equals_torch(device, dtype, temperature) -> None:
    _, _, logits, tokens, g, h = _case(dtype, device)
    results = [_run(tl.token_logprobs, [logits], tokens, g, h, temperature=temperature, impl=impl)
               for impl in ("torch", "triton")]  # fmt: skip
    (logp, ent, top1, grads), (t_logp, t_ent, t_top1, t_grads) = results
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert_close(t_logp, logp, **tol)
    assert_close(t_ent, ent, **tol)
    assert torch.equal(t_top1, top1) and bool(top1.any())
    assert_close(t_grads[0], grads[0], **TOL[dtype])
    assert torch.isfinite(t_grads[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [False, True])
def test_fused_equals_torch(device, dtype, shift) -> None:
    hidden, weight, _, tokens, g, h = _case(dtype, device, seed=1)
    g, h = (g[:, :-1], h[:, :-1]) if shift else (g, h)
    results = [_run(tl.linear_token_logprobs, [hidden, weight], tokens, g, h, temperature=0.8, shift=shift,
                    chunk_size=2, impl=impl) for impl in ("torch", "triton")]  # fmt: skip
    (logp, ent, top1, grads), (t_logp, t_ent, t_top1, t_grads) = results
    assert_close(t_logp, logp, **TOL[dtype])
    assert_close(t_ent, ent, **TOL[dtype])
    assert torch.equal(t_top1, top1)
    for got, want in zip(t_grads, grads):
        assert_close(got, want, **TOL[dtype])


def test_ties_and_all_but_one_minus_inf(device) -> None:
    """argmax ties go to the first index across tiles; a row with a single finite logit has logp 0, entropy 0."""
    logits = torch.full((2, V), float("-inf"), device=device)
    logits[0, 10] = logits[0, 130] = 2.0  # a tie in two different tiles
    logits[1, 170] = 0.5
    tokens = torch.tensor([130, 170], device=device)
    logp, ent, top1 = tl.token_logprobs(logits, tokens, return_top1=True, impl="triton")
    assert top1.tolist() == [False, True]
    assert_close(logp, torch.tensor([-0.6931471805599453, 0.0], device=device), rtol=1e-6, atol=1e-7)
    assert_close(ent, torch.tensor([0.6931471805599453, 0.0], device=device), rtol=1e-6, atol=1e-7)
