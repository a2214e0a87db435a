"""Shared test helpers: seeded random inputs with large logits, and the per-dtype tolerances."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Tolerances (torch.testing.assert_close keyword arguments) for a result *in this dtype* compared
# with a float64 truth computed from the same input values. A loss is accumulated in float32
# whatever the input dtype, so losses use the float32 entry; gradients come back in the input's
# dtype, so they use the input dtype's entry (half an ulp of relative rounding, plus the float32
# error of the softmax).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-6},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-5},
}

# Margin over PyTorch's own error in the low-precision dtype (the ml-cross-entropy rule): our
# result may be at most this much further from the float64 truth than F.cross_entropy's is.
MARGINS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


@pytest.fixture
def tolerances() -> dict[torch.dtype, dict[str, float]]:
    """Per-dtype ``assert_close`` tolerances against a float64 truth (see :data:`TOLERANCES`)."""
    return TOLERANCES


@pytest.fixture
def margins() -> dict[torch.dtype, float]:
    """Per-dtype margin over PyTorch's own low-precision error (see :data:`MARGINS`)."""
    return MARGINS


@pytest.fixture
def make_logits() -> Callable[..., torch.Tensor]:
    """Factory ``make_logits(*shape, dtype=float32, scale=4.0, seed=0)``: normal logits times
    ``scale`` (so that large logits and peaked softmaxes are exercised), drawn in float64 and
    rounded once to ``dtype``."""

    def make(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return make


@pytest.fixture
def make_targets() -> Callable[..., torch.Tensor]:
    """Factory ``make_targets(shape, vocab_size, ignore_every=0, ignore_index=-100, seed=1)``:
    int64 targets in ``[0, V)``, with every ``ignore_every``-th position set to ``ignore_index``."""

    def make(
        shape: tuple[int, ...], vocab_size: int, *, ignore_every: int = 0, ignore_index: int = -100, seed: int = 1
    ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        targets = torch.randint(0, vocab_size, shape, generator=gen)
        if ignore_every:
            targets.view(-1)[::ignore_every] = ignore_index
        return targets

    return make


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with 1234, for tests that draw their own tensors."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, busy CPU: one intra-op thread avoids OpenMP spin-waits (seconds become ms).

    Test modules of tiny models take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
