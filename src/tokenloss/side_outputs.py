"""What a trainer logs beside the loss, taken from the same pass over the logits: token accuracy, the
z-loss term alone, and the log-sum-exp (Liger's ``return_token_accuracy`` / ``return_z_loss``, Cut
Cross-Entropy's ``return_lse``).

The losses record, per counted row, the log-sum-exp of its (soft-capped) logits and the index of its
largest logit (:class:`SideRows`, filled by the forward pass when asked); :func:`side_outputs` turns
them into a :class:`CrossEntropyOutput`. Side outputs carry no gradient (they are for logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tokenloss.options import LossOptions, PreparedTargets

__all__ = ["CrossEntropyOutput", "SideRows", "side_outputs"]


class CrossEntropyOutput(NamedTuple):
    """The loss and the side outputs asked for (None for those not asked for).

    Attributes:
        loss: the loss, as without side outputs (differentiable).
        z_loss: the z-loss term alone, ``z_loss * logsumexp(z) ** 2`` weighted and reduced as the loss
            is (a part of ``loss``; 0 when the ``z_loss`` option is 0).
        token_accuracy: whether the largest logit is the target's (``argmax == target``, ties to the
            first index as ``torch.argmax``), over the counted positions: their fraction for ``"mean"``
            (unweighted, over the local count, 0.0 when nothing counts, as TRL's mean token accuracy),
            their number for ``"sum"``, 1.0/0.0 per position for ``"none"``.
        lse: ``logsumexp(z)`` per position of the (soft-capped) logits, shaped like the ``"none"`` loss,
            0.0 where a position does not count.
    """

    loss: Tensor
    z_loss: Tensor | None
    token_accuracy: Tensor | None
    lse: Tensor | None


@dataclass
class SideRows:
    """The side outputs asked for, and the per-row quantities a loss's forward pass records for them (detached).

    Attributes:
        z_loss, token_accuracy, lse_out: which side outputs were asked for.
        lse: ``(R,)`` the rows' log-sum-exp in the accumulation dtype, filled by the forward pass.
        predicted: ``(R,)`` int64 index of each row's largest (capped) logit, filled when ``argmax``.
    """

    z_loss: bool
    token_accuracy: bool
    lse_out: bool
    lse: Tensor | None = None
    predicted: Tensor | None = None

    @property
    def argmax(self) -> bool:
        """Whether the forward pass records ``predicted`` (one ``max`` with indices instead of ``amax``)."""
        return self.token_accuracy


def side_outputs(loss: Tensor, rows: SideRows, prepared: PreparedTargets, options: LossOptions) -> CrossEntropyOutput:
    """The :class:`CrossEntropyOutput` of a loss whose forward filled ``rows``.

    Args:
        loss: the reduced loss.
        rows: what was asked for, filled by the forward pass for the N rows of ``prepared`` (any
            value where a row does not count).
        prepared: the loss's targets and weights.
        options: the loss options (``z_loss`` and ``reduction``).
    """
    lse, predicted = rows.lse.detach(), rows.predicted
    lse = torch.where(prepared.counted, lse, torch.zeros_like(lse))
    z_term = accuracy = None
    if rows.z_loss:
        z_rows = options.z_loss * lse.square() * prepared.weights.to(lse.dtype)
        z_term = prepared.reduce(z_rows, options.reduction)
    if rows.token_accuracy:
        correct = ((predicted == prepared.targets) & prepared.counted).to(lse.dtype)
        if options.reduction == "mean":
            accuracy = correct.sum() / prepared.counted.sum().clamp(min=1).to(lse.dtype)
        else:
            accuracy = prepared.reduce(correct, options.reduction)
    return CrossEntropyOutput(loss, z_term, accuracy, prepared.reduce(lse, "none") if rows.lse_out else None)
