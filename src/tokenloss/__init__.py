"""tokenloss: the cross-entropy loss of language models, exact, fast, lean on memory.

The public API::

    tl.cross_entropy(logits, targets, ...)            # loss from (..., V) logits
    tl.CrossEntropyLoss(...)                          # the same as an nn.Module

The formulas, written plainly, are in :mod:`tokenloss.reference`; the per-row math of the fast
paths in :mod:`tokenloss.ops.rowwise`.
"""

from tokenloss import metrics  # noqa: F401  (tl.metrics: perplexity, bits per byte, ECE; torch only)
from tokenloss.functional import cross_entropy, linear_cross_entropy
from tokenloss.modules import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "cross_entropy", "linear_cross_entropy", "__version__"]
