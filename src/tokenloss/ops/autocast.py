"""Following ``torch.autocast`` as ``nn.Linear`` does, for the fused head-and-loss functions.

Under ``torch.autocast(device_type, dtype=bfloat16)`` an ``nn.Linear`` head multiplies in bf16
whatever its inputs' dtypes (float64 excepted), and the model's loss then upcasts the bf16 logits to
float32. The fused functions do the same: :func:`autocast_inputs` casts ``hidden``, ``weight`` and
``bias`` to the autocast dtype (differentiably, so the float32 master weights receive float32
gradients as they do through ``nn.Linear``), and the fused computation itself runs with autocast
off (:func:`autocast_off`), taking its statistics and accumulations in float32 as for any bf16
input. Without autocast, nothing changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["autocast_inputs", "autocast_off", "backward_without_autocast"]


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype of the first one's device type when autocast is on there.

    As autocast casts a matmul's operands: floating tensors other than float64 are cast; None,
    float64, non-floating tensors and anything that is not a tensor (left for the argument checks
    to refuse) are returned as they are.
    """
    first = tensors[0]
    if not isinstance(first, Tensor):
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_off(device: torch.device) -> torch.autocast:
    """A context in which autocast is off for ``device``'s type (the fused code picks its own dtypes)."""
    return torch.autocast(device.type, enabled=False)


def backward_without_autocast(backward: Callable) -> Callable:
    """Decorates an ``autograd.Function.backward(ctx, *grads)`` to run with autocast off: a backward
    called inside an autocast region (on the CPU it runs in the caller's thread) would otherwise
    recast the float32 gradient products of the fused code."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device for g in grads if isinstance(g, Tensor)), torch.device("cpu"))
        with autocast_off(device):
            return backward(ctx, *grads)

    return wrapped
