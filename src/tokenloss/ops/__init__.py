"""The implementations behind the public functions, chosen by name.

``"torch"``: plain, device-agnostic PyTorch (:mod:`tokenloss.ops.cross_entropy`,
:mod:`tokenloss.ops.linear_cross_entropy`). ``"triton"``: GPU kernels (:mod:`tokenloss.ops.triton`).
``"auto"`` picks Triton for CUDA tensors when Triton is installed, and torch otherwise.
"""

from __future__ import annotations

import importlib.util

import torch

IMPLEMENTATIONS = ("auto", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Maps ``impl`` (one of :data:`IMPLEMENTATIONS`) to the implementation that will run."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        on_cuda = device.type == "cuda"
        return "triton" if on_cuda and importlib.util.find_spec("triton") is not None else "torch"
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("impl='triton' needs the triton package: pip install 'tokenloss[triton]'")
    return impl


from tokenloss.ops.cross_entropy import cross_entropy_rows  # noqa: E402
from tokenloss.ops.linear_cross_entropy import linear_cross_entropy_loss  # noqa: E402

__all__ = ["IMPLEMENTATIONS", "cross_entropy_rows", "linear_cross_entropy_loss", "resolve_impl"]
