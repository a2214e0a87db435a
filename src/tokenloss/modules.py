"""``torch.nn.Module`` wrappers: they store the options and call the functions, nothing more."""

from __future__ import annotations

from torch import Tensor, nn

from tokenloss import functional


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`tokenloss.cross_entropy`: same options, same order, same meaning.

    The constructor takes the options; ``forward`` takes the per-batch tensors
    (``logits``, ``targets`` and optionally ``mask``, ``token_weights``, ``num_items``).
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        shift: bool = False,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        focal_gamma: float = 0.0,
        impl: str = "auto",
        inplace_backward: bool = False,
        check_inputs: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            ignore_index=ignore_index,
            shift=shift,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            focal_gamma=focal_gamma,
            impl=impl,
            inplace_backward=inplace_backward,
            check_inputs=check_inputs,
            chunk_size=chunk_size,
        )

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        mask: Tensor | None = None,
        token_weights: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor:
        return functional.cross_entropy(
            logits, targets, mask=mask, token_weights=token_weights, num_items=num_items, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`tokenloss.linear_cross_entropy`: same options, same order, same meaning.

    The constructor takes the options; ``forward`` takes the per-batch tensors (``hidden``
    ``(..., D)``, ``weight`` ``(V, D)``, ``targets`` and optionally ``bias``, ``mask``,
    ``token_weights``, ``num_items``). The module holds no parameters: pass the LM head's weight.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        shift: bool = False,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        focal_gamma: float = 0.0,
        impl: str = "auto",
        check_inputs: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            ignore_index=ignore_index,
            shift=shift,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            focal_gamma=focal_gamma,
            impl=impl,
            check_inputs=check_inputs,
            chunk_size=chunk_size,
        )

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
    ) -> Tensor:
        return functional.linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            mask=mask,
            token_weights=token_weights,
            num_items=num_items,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
