"""The public losses under ``torch.compile``: run eagerly, as one opaque call, never traced.

The fused paths select the rows that count (their number depends on the data) and check inputs on
the host; traced by dynamo, each new number of counted tokens would be a new graph (a recompile per
batch, seconds each, until ``recompile_limit``). Decorated with :func:`eager_under_compile`, a loss
is a single graph break in the caller's compiled function: the model before it and the gradient
after it stay compiled, and batches with different numbers of counted tokens reuse the same graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["eager_under_compile"]

F = TypeVar("F", bound=Callable)


def eager_under_compile(function: F) -> F:
    """``function``, which dynamo calls as it is instead of tracing it (``torch.compiler.disable``,
    which keeps its name, docstring and signature). Used on the public losses and on the backward of
    every autograd Function, which the autograd engine may call from inside a compiled frame."""
    return torch.compiler.disable(function, recursive=True)
