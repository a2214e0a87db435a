"""TRL's trainers (SFT, GRPO, DPO, KTO) with tokenloss computing their per-token log-probabilities.

TRL 1.x gives the policy (and reference) model a fused LM head (``trl.trainer.utils.add_fused_lm_head``):
its trainers call ``model(..., labels=labels, fused_lm_head=True)`` and read per-token
``log_probs``, ``entropy``, ``is_top1`` and ``label_mask`` from a ``FusedCausalLMOutput``. A model
patched with :func:`tokenloss.integrations.transformers.patch` is bypassed on that path. One line
switches it to tokenloss, after the trainer is built::

    tokenloss.integrations.trl.patch_trainer(trainer)

Every call with ``fused_lm_head=True`` then runs the model's backbone and
:func:`tokenloss.linear_token_logprobs` (log-probabilities and entropy with their gradients, and
``is_top1`` for TRL's mean token accuracy, from one pass over each chunk of logits, none of them
held whole), with TRL's own temperature, logit scale, float32 head (``cast_lm_head_to_fp32``) and
MoE load-balancing loss; the output is TRL's own ``FusedCausalLMOutput``, so the trainer's loss
(completion-only or assistant-only labels, packing, DFT) and its logged metrics are computed as
before. Calls that TRL makes without the fused head (label smoothing or a ``compute_loss_func``
need the full logits) warn once that tokenloss is bypassed for them.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from typing import Any

import torch
from torch import nn

from tokenloss.integrations.heads import call_head, check_head
from tokenloss.logprobs import linear_token_logprobs

__all__ = ["is_patched", "patch_trainer", "unpatch_trainer"]

_STATE = "_tokenloss_trl"
_FIELDS = ("original_forward", "temperature", "final_logit_softcapping", "logit_scale", "cast_lm_head_to_fp32",
           "backbone_attr", "text_config")  # fmt: skip


def patch_trainer(trainer: Any) -> Any:
    """Makes a TRL trainer's fused LM head (policy and reference model) run on tokenloss.

    Args:
        trainer: a TRL 1.x trainer built with its fused LM head (``SFTTrainer``, ``GRPOTrainer``,
            ``DPOTrainer``, ``KTOTrainer``).

    Returns:
        ``trainer``.

    Raises:
        TypeError: the trainer's model carries no TRL fused LM head (an older TRL, or a model whose
            forward was replaced after the trainer was built), or its head is not a linear map.
        ValueError: the model soft-caps its final logits (Gemma 2): tokenloss's log-prob path has no
            soft-cap; TRL's own head is kept for such models.
    """
    for model in _trainer_models(trainer):
        _patch_model(model)
    return trainer


def unpatch_trainer(trainer: Any) -> Any:
    """Restores TRL's own fused LM head on the trainer's models."""
    for model in _trainer_models(trainer):
        state = model.__dict__.pop(_STATE, None)
        if state is not None:
            object.__setattr__(model, "forward", state["trl_forward"])
    return trainer


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_trainer` switched this model's TRL fused head to tokenloss."""
    return _STATE in _unwrap(model).__dict__


def is_trl_fused_forward(forward: Any) -> bool:
    """Whether ``forward`` is the bound forward that TRL's ``add_fused_lm_head`` installs."""
    code = getattr(getattr(forward, "__func__", None), "__code__", None)  # (wraps() renamed the function itself)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def _unwrap(model: nn.Module) -> nn.Module:
    """The model TRL patched: a PEFT model's base model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trainer_models(trainer: Any) -> list[nn.Module]:
    models = [_unwrap(trainer.model)]
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        models.append(_unwrap(ref_model))
    return models


def _patch_model(model: nn.Module) -> None:
    if _STATE in model.__dict__:
        return
    trl_forward = model.__dict__.get("forward")
    if not is_trl_fused_forward(trl_forward):
        raise TypeError(
            f"{type(model).__name__} carries no TRL fused LM head (model(..., fused_lm_head=True)): call "
            "tokenloss.integrations.trl.patch_trainer(trainer) on a TRL 1.x trainer after building it, and do not "
            "replace the model's forward in between"
        )
    function = trl_forward.__func__
    closure = dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))
    missing = [name for name in _FIELDS if name not in closure]
    if missing:
        raise TypeError(f"this TRL version's fused LM head is not one tokenloss knows (it lacks {missing})")
    if closure["final_logit_softcapping"] is not None:
        raise ValueError(
            f"{type(model).__name__} soft-caps its final logits, which tokenloss's log-probability path does not do: "
            "keep TRL's own fused head for this model"
        )
    check_head(model.get_output_embeddings(), type(model).__name__)
    state = {"trl_forward": trl_forward, **{name: closure[name] for name in _FIELDS}}
    object.__setattr__(model, _STATE, state)
    # TRL's signature is kept (generate() validates its keyword arguments against it)
    object.__setattr__(model, "forward", types.MethodType(functools.wraps(function)(_forward), model))


def _forward(self: nn.Module, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
             **kwargs):  # fmt: skip
    state = self.__dict__[_STATE]
    if not fused_lm_head:
        if self.training and torch.is_grad_enabled():  # a training loss from the full logits (not generation)
            _warn_bypassed(self)
        return state["trl_forward"](
            *args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch, **kwargs,
        )  # fmt: skip
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = state["text_config"]
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = getattr(self, state["backbone_attr"])(*args, **kwargs)
    hidden = backbone_outputs.last_hidden_state  # (B, T, D)
    targets = labels if shift_labels is None else shift_labels
    head = self.get_output_embeddings()
    hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
    # z = logit_scale * (h W^T + b), divided by T: one effective temperature T / logit_scale
    temperature = state["temperature"] / state["logit_scale"]
    if state["cast_lm_head_to_fp32"]:
        hidden = hidden.float()

    def logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        fp32 = state["cast_lm_head_to_fp32"]
        if fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        with torch.autocast(h.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            return linear_token_logprobs(
                h, weight, targets, bias=bias, temperature=temperature, shift=shift_labels is None, return_top1=True
            )

    log_probs, entropy, is_top1 = call_head(head, hidden, logprobs)
    label_mask = (targets[:, 1:] if shift_labels is None else targets) != -100
    count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    aux_loss = None
    if kwargs.get("output_router_logits"):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        num_experts = getattr(text_config, "num_experts", None) or getattr(self, "num_experts", None)
        aux_loss = load_balancing_loss_func(
            backbone_outputs.router_logits, num_experts, text_config.num_experts_per_tok, kwargs.get("attention_mask")
        )
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=label_mask, aux_loss=aux_loss
    )


def _warn_bypassed(model: nn.Module) -> None:
    if model.__dict__.get("_tokenloss_trl_warned"):
        return
    object.__setattr__(model, "_tokenloss_trl_warned", True)
    warnings.warn(
        f"TRL called {type(model).__name__} without its fused LM head (label smoothing, a compute_loss_func or an "
        "evaluation that needs the logits): that call builds the full logits and tokenloss is bypassed for it",
        UserWarning,
        stacklevel=3,
    )
