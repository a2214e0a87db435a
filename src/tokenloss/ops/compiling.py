"""The public losses under ``torch.compile``: run eagerly, as one opaque call, never traced.

The fused paths select the rows that count (their number depends on the data) and check inputs on
the host; traced by dynamo, each new number of counted tokens would be a new graph (a recompile per
batch, seconds each, until ``recompile_limit``). Decorated with :func:`eager_under_compile`, a loss
is a single graph break in the caller's compiled function: the model before it and the gradient
after it stay compiled, and batches with different numbers of counted tokens reuse the same graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["eager_under_compile"]

F = TypeVar("F", bound=Callable)

_DISABLED: dict[Callable, Callable] = {}


def eager_under_compile(function: F) -> F:
    """``function``, which dynamo calls as it is instead of tracing it.

    Used on the public losses and on the backward of every autograd Function (which the autograd
    engine may call from inside a compiled frame). Outside ``torch.compile`` it is a plain call; while
    dynamo traces the wrapper, it hands the call to ``torch.compiler.disable(function)``, made on first
    need so that ``import tokenloss`` does not import dynamo (1.5 s, and Triton where installed).
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            disabled = _DISABLED.get(function)
            if disabled is None:
                disabled = _DISABLED[function] = torch.compiler.disable(function, recursive=True)
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
