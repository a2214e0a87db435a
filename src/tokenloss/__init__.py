"""tokenloss: the cross-entropy loss of language models, exact, fast, lean on memory.

The public API::

    tl.cross_entropy(logits, targets, ...)                  # loss from (..., V) logits
    tl.linear_cross_entropy(hidden, weight, targets, ...)   # fused with the LM head: no (N, V) logits
    tl.CrossEntropyLoss(...), tl.LinearCrossEntropyLoss(...)  # the same as nn.Modules
    tl.LossOptions(...)                                     # the options, listed and checked once
    tl.cross_entropy(..., return_token_accuracy=True, return_z_loss=True, return_lse=True)  # + what trainers log
    tl.token_logprobs(logits, tokens), tl.linear_token_logprobs(hidden, weight, tokens)  # RL: logp, entropy
    tl.linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight)  # KD, fused

The formulas, written plainly, are in :mod:`tokenloss.reference`; the options, listed once, in
:mod:`tokenloss.options`; the per-row math of the fast paths in :mod:`tokenloss.ops.rowwise`.
Everything else lives in packages that depend on the loss and never the reverse:
:mod:`tokenloss.evaluation`, :mod:`tokenloss.training`, :mod:`tokenloss.models`,
:mod:`tokenloss.integrations`, :mod:`tokenloss.explain` and :mod:`tokenloss.cli`.
"""

from tokenloss.distillation import linear_distillation_loss
from tokenloss.functional import cross_entropy, linear_cross_entropy
from tokenloss.logprobs import linear_token_logprobs, token_logprobs
from tokenloss.modules import CrossEntropyLoss, LinearCrossEntropyLoss
from tokenloss.options import LossOptions
from tokenloss.side_outputs import CrossEntropyOutput

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyOutput",
    "LinearCrossEntropyLoss",
    "LossOptions",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_token_logprobs",
    "token_logprobs",
    "__version__",
]
