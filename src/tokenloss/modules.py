"""``torch.nn.Module`` wrappers: they store the options and call the functions, nothing more."""

from __future__ import annotations

from torch import Tensor, nn

from tokenloss import functional
from tokenloss.options import LossOptions, takes_loss_options
from tokenloss.side_outputs import CrossEntropyOutput


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`tokenloss.cross_entropy`: same options, same order, same meaning.

    The constructor takes the options (each :class:`~tokenloss.options.LossOptions` field, plus
    ``impl``, ``inplace_backward``, the ``return_*`` side outputs and the per-class ``weight``, kept as a
    buffer that moves with ``.to()``, as in ``nn.CrossEntropyLoss``) and checks them at once;
    ``forward`` takes the per-batch tensors (``logits``, ``targets`` and optionally ``mask``,
    ``token_weights``, ``num_items``).

    Examples:
        >>> import torch, tokenloss as tl
        >>> crit = tl.CrossEntropyLoss(shift=True, label_smoothing=0.1)
        >>> round(crit(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]])).item(), 3)  # log 5
        1.609
    """

    @takes_loss_options
    def __init__(
        self,
        *,
        weight: Tensor | None = None,
        options: LossOptions,
        impl: str = "auto",
        inplace_backward: bool = False,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        self.options, self.impl, self.inplace_backward = options, impl, inplace_backward
        self.returns = dict(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                            return_lse=return_lse)  # fmt: skip
        _register_class_weight(self, "weight", weight)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        mask: Tensor | None = None,
        token_weights: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor | CrossEntropyOutput:
        return functional.cross_entropy(
            logits,
            targets,
            mask=mask,
            token_weights=token_weights,
            num_items=num_items,
            weight=self.weight,
            options=self.options,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            **self.returns,
        )

    def extra_repr(self) -> str:
        return _repr(self.options, impl=self.impl, inplace_backward=self.inplace_backward, **_asked(self.returns))


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`tokenloss.linear_cross_entropy`: same options, same order, same meaning.

    The constructor takes the options (each :class:`~tokenloss.options.LossOptions` field, plus
    ``impl``, the ``return_*`` side outputs and the per-class ``class_weight``, a buffer); ``forward``
    takes the per-batch tensors (``hidden`` ``(..., D)``, ``weight`` ``(V, D)``, ``targets`` and
    optionally ``bias``, ``mask``, ``token_weights``, ``num_items``).
    The module holds no parameters: pass the LM head's weight.

    Examples:
        >>> import torch, tokenloss as tl
        >>> crit = tl.LinearCrossEntropyLoss(z_loss=1e-4)
        >>> round(crit(torch.zeros(2, 3), torch.zeros(5, 3), torch.tensor([1, 3])).item(), 4)
        1.6097
    """

    @takes_loss_options
    def __init__(
        self,
        *,
        class_weight: Tensor | None = None,
        options: LossOptions,
        impl: str = "auto",
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        self.options, self.impl = options, impl
        self.returns = dict(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                            return_lse=return_lse)  # fmt: skip
        _register_class_weight(self, "class_weight", class_weight)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        *,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        token_weights: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor | CrossEntropyOutput:
        return functional.linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            mask=mask,
            token_weights=token_weights,
            num_items=num_items,
            class_weight=self.class_weight,
            options=self.options,
            impl=self.impl,
            **self.returns,
        )

    def extra_repr(self) -> str:
        return _repr(self.options, impl=self.impl, **_asked(self.returns))


def _register_class_weight(module: nn.Module, name: str, weight: Tensor | None) -> None:
    """Keeps per-class weights as a buffer (None allowed), after checking that they are a 1-D floating tensor."""
    bad = not isinstance(weight, Tensor) or not weight.dtype.is_floating_point or weight.ndim != 1
    if weight is not None and bad:
        got = f"{weight.dtype} of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{name} must be a 1-D floating tensor of per-class weights (V,), got {got}")
    module.register_buffer(name, weight)


def _asked(returns: dict[str, bool]) -> dict[str, bool]:
    """The side outputs a module was asked for (for its repr)."""
    return {name: value for name, value in returns.items() if value}


def _repr(options: LossOptions, **extra: object) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in {**options.as_kwargs(), **extra}.items())
