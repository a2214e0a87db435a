"""Triton kernels behind ``impl="triton"``: plain cross-entropy and the fused linear cross-entropy.

The same functions as the torch implementations, with the same arguments and results:

- :func:`cross_entropy_rows` (:mod:`tokenloss.ops.triton.cross_entropy`): per-row losses of
  ``(N, V)`` logits, one read of the logits forward, gradient written once backward.
- :func:`linear_cross_entropy_loss` (:mod:`tokenloss.ops.triton.linear_cross_entropy`): the loss of
  ``hidden @ weight.T + bias``, each logits tile living in on-chip memory only.

Beside them, :mod:`tokenloss.ops.triton.logprobs` (per-token log-probabilities, entropy, argmax) and
:mod:`tokenloss.ops.triton.distillation` (the distillation loss's per-chunk math) serve
``impl="triton"`` of :func:`tokenloss.token_logprobs`, :func:`tokenloss.linear_token_logprobs` and
:func:`tokenloss.linear_distillation_loss`.

They need CUDA tensors, or CPU tensors when the kernels were loaded under ``TRITON_INTERPRET=1``
(Triton's interpreter; how the test suite runs them without a GPU).
"""

from tokenloss.ops.triton.cross_entropy import cross_entropy_rows
from tokenloss.ops.triton.linear_cross_entropy import linear_cross_entropy_loss

__all__ = ["cross_entropy_rows", "linear_cross_entropy_loss"]
