"""Patch a Hugging Face causal LM so that ``forward(labels=...)`` computes its loss without building the logits.

``patch(model)`` replaces ``model.forward`` (on this instance only; ``unpatch`` restores it) with
one that, when ``labels`` are given, runs the model's own base transformer, takes the last hidden
state and computes the loss with :func:`tokenloss.linear_cross_entropy` from it and the LM head's
weight, exactly as the model's own ``ForCausalLMLoss`` defines it:

- the causal shift (position ``t`` predicts label ``t + 1``; or the ``shift_labels`` the caller
  passes, already shifted), ``ignore_index=-100``;
- ``num_items_in_batch`` from the Trainer (the sum is divided by it instead of the local count,
  so gradient accumulation and data parallelism average over all tokens);
- the model's own final-logit soft-capping (Gemma 2's ``config.final_logit_softcapping``).

In training mode (``model.training``) the ``(batch, seq, vocab)`` logits are not built at all and
``output.logits`` is None; in eval mode they are built as before (an evaluation loop may need them)
and the loss is computed from them with :func:`tokenloss.cross_entropy`. Without ``labels`` the
original forward runs untouched (generation is unaffected).

Only model classes whose forward is known to be "base model -> LM head -> optional soft-cap ->
causal-LM loss" are accepted (:data:`SUPPORTED_MODELS`); anything else (another architecture, a
subclass that overrides ``forward``, a custom ``loss_function``, a head that is not a linear map)
is refused with a TypeError rather than silently computing something else.

The head may be an ``nn.Linear``, a PEFT LoRA layer or ``modules_to_save`` copy of one, or a head
sharded in its own FSDP2 unit (:mod:`tokenloss.integrations.heads`); the loss runs inside the
head module's own call, so the hooks of FSDP2 and DeepSpeed ZeRO-3 gather its weight and reduce its
gradient as they do for the logits. A head offloaded by accelerate's ``device_map`` (a ``meta``
weight) is refused at patch time. The Trainer's own ``label_smoothing_factor`` takes the labels
away from the model (its label smoother computes the loss from the logits): :func:`patch_trainer`
moves it into the patch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenloss.functional import cross_entropy, linear_cross_entropy
from tokenloss.integrations.heads import call_head, check_head
from tokenloss.ops import IMPLEMENTATIONS
from tokenloss.options import OPTION_NAMES, LossOptions

__all__ = ["SUPPORTED_MODELS", "apply", "is_patched", "patch", "patch_trainer", "revert", "unpatch"]

#: Causal-LM classes of ``transformers`` whose forward tokenloss reproduces (checked by the tests).
SUPPORTED_MODELS = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
    "SmolLM3ForCausalLM",  # transformers >= 4.53
    "GPTNeoXForCausalLM",
    "MixtralForCausalLM",  # mixture of experts: the router's load-balancing loss is added as the model does
    "Qwen2MoeForCausalLM",
)

# Options the patch sets itself, with the reason given when a caller passes one.
_OWNED_OPTIONS = {
    "shift": "the patch applies the causal shift of the model's own loss",
    "softcap": "the model's own config.final_logit_softcapping is used",
    "num_items": "it is taken from num_items_in_batch, which the Trainer passes to forward",
    "reduction": "the model's loss is a mean (divided by num_items_in_batch when given)",
    "mask": "set the labels of positions that must not count to -100",
    "token_weights": "per-token tensors cannot be fixed at patch time",
    "bias": "the LM head's own bias is used",
}

#: Options of :func:`tokenloss.linear_cross_entropy` that :func:`patch` accepts: every loss option
#: the patch does not set itself, and ``impl``.
LOSS_OPTIONS = tuple(name for name in OPTION_NAMES if name not in _OWNED_OPTIONS) + ("impl",)

_STATE = "_tokenloss_patch"
_CHECKED = "_tokenloss_checked"
_BYPASS_HOOK = "_tokenloss_bypass_hook"  # the forward pre-hook that notices TRL's fused head
_BYPASS_WARNED = "_tokenloss_bypass_warned"  # on an instance of an applied class, once it passed the checks


@dataclass(frozen=True)
class _PatchState:
    """What :func:`patch` stored on the model, and what :func:`unpatch` needs to undo it."""

    options: dict[str, Any]
    skip_logits: bool | None
    previous_forward: Any  # the instance attribute ``forward`` before patching, or None
    signature: inspect.Signature  # of the class forward, without ``self``
    var_keyword: str | None  # name of the forward's ``**kwargs``
    class_forward: Any  # the class's own (unpatched) forward function


def patch(model: nn.Module, *, skip_logits: bool | None = None, **loss_options: Any) -> nn.Module:
    """Makes ``model(..., labels=...)`` compute its loss with :func:`tokenloss.linear_cross_entropy`.

    The model is patched in place (this instance only) and returned. Patching an already patched
    model replaces its options. Loss and gradients equal the model's own within float32 rounding.

    Args:
        model: a causal LM of one of :data:`SUPPORTED_MODELS`.
        skip_logits: None (default): do not build the logits when ``labels`` are given in training
            mode, build them in eval mode; True: never build them when ``labels`` are given;
            False: always build them (the loss is then computed from them).
        **loss_options: any of :data:`LOSS_OPTIONS`, as in :func:`tokenloss.linear_cross_entropy`
            (``ignore_index`` defaults to -100 like the model's own loss; ``label_smoothing``,
            ``z_loss`` and ``focal_gamma`` change the loss from the model's own).

    Returns:
        ``model``.

    Raises:
        TypeError: an unsupported model (the message names the supported classes), a custom
            ``loss_function``, an LM head that is not a linear map, an unknown option or one
            that the patch sets itself (shift, softcap, num_items, ...).
        ValueError: an option out of range (as :func:`tokenloss.linear_cross_entropy`); an LM
            head whose weight is on the ``meta`` device (offloaded by accelerate).

    NaN: like :func:`tokenloss.linear_cross_entropy`, the patched model raises a ``ValueError`` on
    NaN/inf logits in a counted position, where transformers returns a NaN loss. Pass
    ``check_inputs=False`` to get the NaN loss instead (so that a Trainer's own NaN handling, such as
    ``logging_nan_inf_filter``, sees it).

    Examples:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = patch(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
        >>> _ = model.train()  # from_pretrained gives eval mode, where the logits are built as before
        >>> input_ids = torch.randint(0, 50, (2, 6))
        >>> out = model(input_ids, labels=input_ids)
        >>> out.logits is None, out.loss.shape  # no (B, T, V) logits
        (True, torch.Size([]))
    """
    model_class = _supported_class(model)
    if _trl_fused_head(model):
        raise TypeError(
            f"this {type(model).__name__} carries TRL's fused LM head (a TRL trainer built it), which computes the "
            "loss without calling this patch: use tokenloss.integrations.trl.patch_trainer(trainer) instead"
        )
    options = _check_loss_options(loss_options)
    if skip_logits is not None and not isinstance(skip_logits, bool):
        raise TypeError(f"skip_logits must be True, False or None, got {skip_logits!r}")
    unpatch(model)
    class_forward = _unpatched_forward(model_class)
    signature, var_keyword = _forward_signature(class_forward)
    state = _PatchState(options, skip_logits, model.__dict__.get("forward"), signature, var_keyword, class_forward)
    object.__setattr__(model, _STATE, state)
    # A bound method (not a closure over `model`) so that copy.deepcopy(model) rebinds it to the copy;
    # `functools.wraps` keeps the original signature visible to inspect (the Trainer reads it to pick
    # dataset columns and to decide whether to pass num_items_in_batch).
    object.__setattr__(model, "forward", types.MethodType(_forward_for(model_class), model))
    if _BYPASS_HOOK not in model.__dict__:  # warns if TRL wraps the patched model with its own fused head later
        hook = model.register_forward_pre_hook(_warn_if_bypassed_by_trl, with_kwargs=True)
        object.__setattr__(model, _BYPASS_HOOK, hook)
    return model


def patch_trainer(trainer: Any, *, skip_logits: bool | None = None, **loss_options: Any) -> Any:
    """Patches a ``transformers.Trainer``'s model, honouring the Trainer's ``label_smoothing_factor``.

    With ``args.label_smoothing_factor > 0`` the Trainer pops the labels before calling the model and
    smooths the loss itself from the logits, so a patched model would never see them. Here the factor
    becomes the patch's ``label_smoothing`` (the same definition: ``(1 - eps) * nll + eps * mean_j
    (-log p_j)``, a mean over the counted tokens) and the Trainer's label smoother is switched off, so
    the loss is computed without the logits. Call it after the Trainer is built, before ``train()``.

    Args:
        trainer: a ``transformers.Trainer`` whose ``model`` is a supported causal LM.
        skip_logits, **loss_options: as in :func:`patch` (``label_smoothing`` may not also be given
            when the Trainer sets a factor).

    Returns:
        ``trainer``.

    Raises:
        ValueError: ``label_smoothing`` given while the Trainer has its own factor; ``skip_logits=True``
            with a ``compute_metrics`` (it would receive no logits from ``evaluate()``).
        TypeError, ValueError: as :func:`patch`.
    """
    if skip_logits is True and getattr(trainer, "compute_metrics", None) is not None:
        raise ValueError(
            "skip_logits=True never builds the logits, but this Trainer's compute_metrics needs them in evaluate(): "
            "use skip_logits=None (the logits are built in eval mode only), or evaluate without compute_metrics"
        )
    factor = float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0)
    if factor > 0:
        if "label_smoothing" in loss_options:
            raise ValueError(
                f"the Trainer's label_smoothing_factor is {factor}: pass label_smoothing to patch_trainer only "
                "when the Trainer sets none"
            )
        loss_options["label_smoothing"] = factor
    patch(trainer.model, skip_logits=skip_logits, **loss_options)
    if factor > 0:
        trainer.label_smoother = None
    return trainer


def apply(*model_classes: type | str, skip_logits: bool | None = None, **loss_options: Any) -> None:
    """Patches model *classes*, so that every instance, also those that ``from_pretrained`` builds later, is patched.

    The class-level twin of :func:`patch` (as Liger Kernel's ``apply_liger_kernel_to_*``): the classes'
    ``forward`` is replaced until :func:`revert`. Each instance is checked (loss function, LM head) at
    its first forward with labels. An instance patched with :func:`patch` keeps its own options.

    Args:
        *model_classes: classes of :data:`SUPPORTED_MODELS`, or their names; none: all of them that
            this transformers has.
        skip_logits, **loss_options: as in :func:`patch`.

    Raises:
        TypeError: a class that is not in :data:`SUPPORTED_MODELS`; a bad option (as :func:`patch`).

    Examples:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> apply(GPT2LMHeadModel)
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).train()
        >>> is_patched(model), model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).logits
        (True, None)
        >>> revert(GPT2LMHeadModel)
        >>> is_patched(model)
        False
    """
    classes = _supported_classes(model_classes)
    options = _check_loss_options(loss_options)
    if skip_logits is not None and not isinstance(skip_logits, bool):
        raise TypeError(f"skip_logits must be True, False or None, got {skip_logits!r}")
    for cls in classes:
        revert(cls)
        signature, var_keyword = _forward_signature(cls.forward)
        patched = _forward_for(cls)  # made before the class's forward is replaced: it carries its signature
        type.__setattr__(cls, _STATE, _PatchState(options, skip_logits, None, signature, var_keyword, cls.forward))
        type.__setattr__(cls, "forward", patched)


def revert(*model_classes: type | str) -> None:
    """Undoes :func:`apply` for these classes (none: all); classes not applied are left as they are."""
    for cls in _supported_classes(model_classes):
        state = cls.__dict__.get(_STATE)
        if state is not None:
            type.__setattr__(cls, "forward", state.class_forward)
            type.__delattr__(cls, _STATE)


def unpatch(model: nn.Module) -> nn.Module:
    """Restores the forward that :func:`patch` replaced; a model that is not patched is returned unchanged.

    A model patched through its class (:func:`apply`) stays patched: :func:`revert` the class."""
    state = model.__dict__.get(_STATE)
    if state is None:
        return model
    del model.__dict__["forward"]
    if state.previous_forward is not None:
        object.__setattr__(model, "forward", state.previous_forward)
    del model.__dict__[_STATE]
    hook = model.__dict__.pop(_BYPASS_HOOK, None)
    if hook is not None:
        hook.remove()
    return model


def _trl_fused_head(model: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` (or tokenloss's TRL integration) replaced the model's forward."""
    from tokenloss.integrations.trl import is_trl_fused_forward

    return is_trl_fused_forward(model.__dict__.get("forward")) or _trl_patched(model)


def _warn_if_bypassed_by_trl(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched model: TRL's fused LM head computes the loss without the patch."""
    if kwargs.get("fused_lm_head") and not model.__dict__.get(_BYPASS_WARNED) and not _trl_patched(model):
        object.__setattr__(model, _BYPASS_WARNED, True)
        warnings.warn(
            f"TRL's fused LM head computes this {type(model).__name__}'s loss: tokenloss's patch is bypassed. Call "
            "tokenloss.integrations.trl.patch_trainer(trainer) after building the trainer",
            UserWarning,
            stacklevel=2,
        )


def _trl_patched(model: nn.Module) -> bool:
    from tokenloss.integrations.trl import is_patched as trl_patched

    return trl_patched(model)


def is_patched(model: nn.Module) -> bool:
    """Whether this model instance is patched, by :func:`patch` or through its class by :func:`apply`."""
    return _STATE in model.__dict__ or _class_state(type(model)) is not None


def _class_state(cls: type) -> _PatchState | None:
    """The state :func:`apply` stored on ``cls`` or a base class whose forward it inherits, or None."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return klass.__dict__.get(_STATE)
    return None


def _unpatched_forward(cls: type) -> Any:
    """``cls.forward`` as transformers defines it, also while :func:`apply` has replaced it."""
    state = _class_state(cls)
    return cls.forward if state is None else state.class_forward


def _forward_signature(forward: Any) -> tuple[inspect.Signature, str | None]:
    """The signature of a forward function without ``self``, and the name of its ``**kwargs``."""
    signature = inspect.signature(forward)
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    return signature, var_keyword


def _supported_classes(model_classes: tuple[type | str, ...]) -> list[type]:
    """The transformers classes named or given; all supported ones this transformers has when none."""
    import transformers

    available = {name: getattr(transformers, name) for name in SUPPORTED_MODELS if hasattr(transformers, name)}
    if not model_classes:
        return list(available.values())
    classes = []
    for item in model_classes:
        name = item if isinstance(item, str) else getattr(item, "__name__", repr(item))
        cls = available.get(name)
        if cls is None or (not isinstance(item, str) and item is not cls):
            raise TypeError(
                f"tokenloss.integrations.transformers.apply does not support {name}; supported: {', '.join(available)}"
            )
        classes.append(cls)
    return classes


def _supported_class(model: nn.Module) -> type:
    """The supported transformers class ``model`` is, with its forward unchanged; TypeError otherwise."""
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss

    name = type(model).__name__
    supported = ", ".join(SUPPORTED_MODELS)
    for candidate in SUPPORTED_MODELS:
        cls = getattr(transformers, candidate, None)
        if cls is not None and isinstance(model, cls):
            break
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        hint = " (for a PEFT model, patch model.get_base_model())" if hasattr(model, "get_base_model") else ""
        raise TypeError(
            f"tokenloss.integrations.transformers.patch does not support {name} (model_type {model_type!r}){hint}; "
            f"supported: {supported}. Compute the loss yourself with tokenloss.linear_cross_entropy(hidden, "
            "lm_head.weight, labels, shift=True) instead"
        )
    if _unpatched_forward(type(model)) is not _unpatched_forward(cls):
        raise TypeError(f"{name} overrides {cls.__name__}.forward; patch supports only the unmodified forward")
    if model.loss_function is not ForCausalLMLoss:
        raise TypeError(
            f"{name} uses a custom loss_function ({getattr(model.loss_function, '__name__', model.loss_function)}); "
            "patch replaces only the standard ForCausalLMLoss"
        )
    check_head(model.get_output_embeddings(), name)
    if _base_model(model) is model:
        raise TypeError(f"{name} has no base model at {model.base_model_prefix!r}")
    return cls


def _base_model(model: nn.Module) -> nn.Module:
    """The transformer under the LM head: ``model.base_model``, or ``get_decoder()`` where the class's
    ``base_model_prefix`` names no attribute (Gemma3ForCausalLM in transformers 4.51)."""
    base = model.base_model
    if base is model and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    return base


def _check_loss_options(loss_options: dict[str, Any]) -> dict[str, Any]:
    for key in loss_options:
        if key in _OWNED_OPTIONS:
            raise TypeError(f"patch() does not take the loss option {key!r}: {_OWNED_OPTIONS[key]}")
        if key not in LOSS_OPTIONS:
            raise TypeError(f"patch() got an unknown loss option {key!r}; it takes {', '.join(LOSS_OPTIONS)}")
    options = {"ignore_index": -100, **loss_options}
    # Check values now rather than at the first training step.
    LossOptions(**{key: value for key, value in options.items() if key != "impl"})
    if options.get("impl", "auto") not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {options['impl']!r}")
    return options


@functools.cache
def _forward_for(model_class: type):
    """The patched forward for ``model_class``, carrying that class's forward signature."""

    @functools.wraps(model_class.forward)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    return forward


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any):
    state: _PatchState | None = self.__dict__.get(_STATE)
    if state is None:  # patched through the class (apply): check this instance once
        state = _class_state(type(self))
        if not self.__dict__.get(_CHECKED):
            _supported_class(self)
            object.__setattr__(self, _CHECKED, True)
    original = state.previous_forward or types.MethodType(state.class_forward, self)
    arguments = dict(state.signature.bind(*args, **kwargs).arguments)
    extra = dict(arguments.pop(state.var_keyword, {})) if state.var_keyword else {}
    labels = arguments.pop("labels", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        # No loss to compute (generation, scoring), or logits of the last positions only: the model's own path.
        return original(*args, **kwargs)

    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items = extra.pop("num_items_in_batch", None)
    shift_labels = extra.pop("shift_labels", None)
    options = dict(state.options)
    options["ignore_index"] = extra.pop("ignore_index", options["ignore_index"])

    router = "output_router_logits" in state.signature.parameters  # a mixture of experts
    if router:  # resolved as the model's forward does
        wanted = arguments.get("output_router_logits")
        arguments["output_router_logits"] = wanted if wanted is not None else self.config.output_router_logits
    outputs = _base_model(self)(**arguments, **extra)
    hidden = outputs.last_hidden_state  # (B, T, D)
    head = self.get_output_embeddings()
    targets = (labels if shift_labels is None else shift_labels).to(hidden.device)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    skip = state.skip_logits if state.skip_logits is not None else self.training
    if skip:

        def loss_from(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if weight.numel() == 0:
                raise RuntimeError(
                    "the LM head's weight is empty even inside its own call (a partitioned weight that no hook "
                    "gathers?); tokenloss.integrations.transformers.patch needs the weight: unpatch the model"
                )
            return linear_cross_entropy(
                hidden, weight, targets, bias=bias, shift=shift_labels is None, softcap=softcap, num_items=num_items,
                **options,
            )  # fmt: skip

        loss = call_head(head, hidden, loss_from)
        logits = None
    else:
        logits = head(hidden)  # (B, T, V)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap  # as the model's forward does
        loss = cross_entropy(logits, targets, shift=shift_labels is None, num_items=num_items, **options)

    aux_loss = None
    if router and arguments["output_router_logits"]:
        aux_loss = _router_aux_loss(self, outputs, arguments.get("attention_mask"))
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    result = _output(outputs, loss, logits, aux_loss=aux_loss if router else _NOT_MOE)
    return result if return_dict else result.to_tuple()


_NOT_MOE = object()


def _router_aux_loss(model: nn.Module, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss of a mixture-of-experts model, computed by its own module's
    ``load_balancing_loss_func`` from the router logits, as its forward does (Mixtral, Qwen2-MoE)."""
    module = sys.modules[_unpatched_forward(type(model)).__module__]
    return module.load_balancing_loss_func(
        outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask
    )


def _output(outputs, loss, logits, *, aux_loss: Any = _NOT_MOE):
    """The model's output class filled from the base model's output, whatever this transformers
    version calls its fields (``past_key_values`` in 4.x and early 5.x, ``cache`` later); the MoE output
    class (with ``aux_loss`` and ``router_logits``) for a mixture of experts."""
    from transformers.modeling_outputs import (
        CausalLMOutputWithCrossAttentions,
        CausalLMOutputWithPast,
        MoeCausalLMOutputWithPast,
    )

    if aux_loss is not _NOT_MOE:
        output_class = MoeCausalLMOutputWithPast
    elif hasattr(outputs, "cross_attentions"):
        output_class = CausalLMOutputWithCrossAttentions
    else:
        output_class = CausalLMOutputWithPast
    values = {"loss": loss, "logits": logits}
    if aux_loss is not _NOT_MOE:
        values["aux_loss"] = aux_loss
    for field in dataclasses.fields(output_class):
        if field.name not in values:
            values[field.name] = getattr(outputs, field.name, None)
    return output_class(**values)
