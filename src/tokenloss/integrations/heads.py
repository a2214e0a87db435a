"""An LM head as the terms of one linear map, so that a fused loss can read it without its logits.

A patched model computes ``loss(hidden @ weight.T + bias)`` without building the product. The head
may be more than an ``nn.Linear``; each supported form is rewritten exactly as one linear map:

- ``nn.Linear``, or a subclass that keeps its forward (FSDP2's ``FSDPLinear`` after
  ``fully_shard(lm_head)``);
- PEFT's ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the active adapter's copy, or
  the original head while adapters are disabled;
- PEFT's LoRA ``Linear`` (``target_modules=[..., "lm_head"]``): ``W x + b + sum_a s_a B_a A_a
  drop_a(x)`` is the product of ``[x, A_1 drop_1(x), ...]`` with ``[W, s_1 B_1, ...]``, so hidden
  grows by the adapters' ranks and the weight by their columns. Dropout is applied as PEFT does,
  and every gradient (``W``, ``A``, ``B``) flows through the concatenation.

:func:`call_head` runs the loss *inside the head module's own call* (with its forward swapped for
the loss), so the hooks of whatever wraps the head run as they would for its logits: FSDP2 gathers
a sharded head's weight before and reduce-scatters its gradient after, DeepSpeed ZeRO-3 gathers a
partitioned weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["call_head", "check_head", "linear_terms"]


def check_head(head: nn.Module, owner: str) -> None:
    """Raises TypeError for a head that :func:`linear_terms` cannot rewrite; ValueError for a ``meta`` weight."""
    inner = _active_module(head)
    if _is_lora_linear(inner):
        base = inner.get_base_layer()
        if getattr(inner, "fan_in_fan_out", False) or not _is_plain_linear(base):
            raise TypeError(f"the LoRA adapter on the LM head of {owner} wraps a {type(base).__name__}; patch supports "
                            "LoRA over an nn.Linear head (fan_in_fan_out=False)")  # fmt: skip
        variants = [name for name in inner.active_adapters if name in getattr(inner, "lora_variant", {})]
        if variants:
            raise TypeError(
                f"the LM head of {owner} has a LoRA variant (DoRA, aLoRA, ...) in adapter(s) {variants}; patch supports"
                " plain LoRA on the head: leave lm_head out of target_modules, or do not patch this model"
            )
        inner = base
    elif not _is_plain_linear(inner):
        raise TypeError(
            f"the LM head of {owner} is a {type(inner).__name__}, not a torch.nn.Linear, PEFT LoRA Linear or "
            "modules_to_save copy (a quantized layer?); patch reads its weight and supports only those"
        )
    if inner.weight.device.type == "meta":
        raise ValueError(
            f"the LM head of {owner} has its weight on the 'meta' device (offloaded by accelerate's device_map, or not "
            "materialised yet); patch reads the weight itself: load the head onto a real device (e.g. "
            "device_map={'lm_head': 0} or 'cpu'), or do not patch this model"
        )


def linear_terms(head: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden', weight', bias')`` with ``hidden' @ weight'.T + bias'`` equal to ``head(hidden)``.

    Args:
        head: a head that :func:`check_head` accepts.
        hidden: ``(..., D)`` the head's input.

    Returns:
        ``hidden'`` ``(..., D')``, ``weight'`` ``(V, D')``, ``bias'`` ``(V,)`` or None; ``D' = D`` except
        for LoRA (``D`` plus the active adapters' ranks).
    """
    inner = _active_module(head)
    if not _is_lora_linear(inner):
        return hidden, inner.weight, inner.bias
    base = inner.get_base_layer()
    if inner.disable_adapters or inner.merged:
        return hidden, base.weight, base.bias
    features, columns, bias = [hidden], [base.weight], base.bias
    for name in inner.active_adapters:
        if name not in inner.lora_A:
            continue
        lora_a, lora_b, scaling = inner.lora_A[name], inner.lora_B[name], inner.scaling[name]
        x = hidden.to(lora_a.weight.dtype)
        features.append(lora_a(inner.lora_dropout[name](x)).to(hidden.dtype))
        columns.append((lora_b.weight * scaling).to(base.weight.dtype))
        if lora_b.bias is not None:
            extra = lora_b.bias * scaling
            bias = extra if bias is None else bias + extra
    return torch.cat(features, dim=-1), torch.cat(columns, dim=1), bias


def call_head(head: nn.Module, hidden: Tensor, loss: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """``loss(*linear_terms(head, hidden))``, run as the head module's call (its hooks run around it).

    The head's ``forward`` is swapped for the loss on this instance for the duration of the call
    (and restored after, also on error), so forward pre/post hooks and the backward hooks they
    register (FSDP2, ZeRO-3) see the loss where they would have seen the logits.
    """
    previous = head.__dict__.get("forward")
    object.__setattr__(head, "forward", lambda x: loss(*linear_terms(head, x)))
    try:
        return head(hidden)
    finally:
        if previous is None:
            del head.__dict__["forward"]
        else:
            object.__setattr__(head, "forward", previous)


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s (FSDP2's ``FSDPLinear`` is one)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _is_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return False
    return isinstance(module, LoraLinear)


def _active_module(head: nn.Module) -> nn.Module:
    """The module a PEFT ``ModulesToSaveWrapper`` forwards to now; ``head`` itself otherwise."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return head
    if not isinstance(head, ModulesToSaveWrapper):
        return head
    if head.disable_adapters or not head.active_adapters or head.active_adapters[0] not in head.modules_to_save:
        return head.original_module
    return head.modules_to_save[head.active_adapters[0]]
