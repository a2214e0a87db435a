"""Where the Triton kernel tests run: compiled on a CUDA machine, else in a child process under Triton's interpreter.

Triton decides once per process whether kernels are compiled or interpreted: ``TRITON_INTERPRET=1``
must be set before ``triton`` is first imported (its own library functions such as ``tl.max`` are
``@triton.jit`` objects defined at that import), and setting it later breaks kernel launches. So the
switch cannot be scoped to a few test modules inside one pytest process. Tests that launch kernels
carry the ``triton_kernels`` marker and run in this process only when it can launch them (CUDA, or
``TRITON_INTERPRET=1`` set from the start); otherwise they are skipped here and
``test_interpreter_runner.py`` runs their modules in a fresh ``python -m pytest`` with
``TRITON_INTERPRET=1``, leaving this process (and every other test module) untouched.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS_RUN_HERE = HAS_TRITON and (HAS_CUDA or INTERPRETED)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_kernels: launches Triton kernels (CUDA, or TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(
        reason="launches Triton kernels: no CUDA here and TRITON_INTERPRET is not 1 in this process; "
        "tests/ops/triton/test_interpreter_runner.py runs them in a child process under the interpreter"
    )
    if not KERNELS_RUN_HERE:
        for item in items:
            if item.get_closest_marker("triton_kernels") is not None:
                item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where the kernels run: ``"cuda"`` (compiled) or ``"cpu"`` (Triton's interpreter)."""
    return "cuda" if HAS_CUDA and not INTERPRETED else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles far smaller than the GPU defaults, so the tile loops and their edges run on small shapes
    (and the interpreter stays fast). Still >= 16 per dot dimension, which compiled ``tl.dot`` needs."""
    if not HAS_TRITON:
        return
    from tokenloss.ops.triton import cross_entropy, distillation, linear_cross_entropy, logprobs

    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 128)
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(distillation, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(linear_cross_entropy, "BLOCK_M", 16)
    monkeypatch.setattr(linear_cross_entropy, "BLOCK_N", 32)
    monkeypatch.setattr(linear_cross_entropy, "BLOCK_K", 16)
    monkeypatch.setattr(linear_cross_entropy, "GROUP_M", 2)
