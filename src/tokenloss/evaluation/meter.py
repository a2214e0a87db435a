"""A streaming loss meter: sums over batches, merges, all-reduces across ranks, divides once at the end.

:class:`LossMeter` keeps only sums (loss in nats, tokens, bytes, words, top-k hits, entropy,
calibration bins), so that updating batch by batch, merging meters, or all-reducing them over a
``torch.distributed`` process group gives exactly the numbers of one pass over all the data. Its
update and compute steps are the private ``_loss_update`` / ``_loss_compute`` below, which
:func:`summarize` (the functional form) uses too. :mod:`tokenloss.evaluation.metrics` holds the
pure functions they are built from.

The collective: :meth:`LossMeter.all_reduce` packs the floating sums into one float64 vector and the
counts into one int64 vector and sums each over the group (two ``all_reduce`` calls); every state
reduces with ``"sum"`` (:data:`LossMeter.REDUCE`), never with a mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenloss.evaluation.metrics import (
    DEFAULT_BINS,
    DEFAULT_TOP_K,
    LN2,
    TokenStatistics,
    _calibration_compute,
    _calibration_update,
    _check_bins,
    bits_per_byte,
    count_bytes,
    count_words,
    token_statistics,
)

_FLOAT_STATES = ("loss_sum_nats", "entropy_sum_nats", "bin_confidence_sum")
_INT_STATES = ("tokens", "bytes", "words", "correct", "bin_count", "bin_correct")


class LossMeter:
    """Accumulates the sums behind perplexity, bits per byte, accuracy, entropy and calibration.

    Args:
        n_bins: equal-width calibration bins of the top-1 probability.
        top_k: the k of each top-k accuracy kept (positive ints; 1 is always included).
        vocab_size: V of the model, for ``log_vocab`` (set by the first :meth:`update` if None).

    Examples:
        >>> import torch
        >>> meter = LossMeter()
        >>> meter.update(torch.zeros(4, 256), torch.tensor([1, 2, 3, 4]))  # uniform over 256 bytes
        >>> meter.count_text(num_bytes=4, num_words=1)
        >>> result = meter.compute()
        >>> round(result["bits_per_byte"], 6), round(result["perplexity"], 3)
        (8.0, 256.0)
    """

    #: How each state combines across meters and ranks.
    REDUCE = {name: "sum" for name in _FLOAT_STATES + _INT_STATES}

    def __init__(
        self,
        *,
        n_bins: int = DEFAULT_BINS,
        top_k: tuple[int, ...] = DEFAULT_TOP_K,
        vocab_size: int | None = None,
    ) -> None:
        _check_bins(n_bins)
        ks = tuple(top_k)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"top_k must be positive ints, got {top_k!r}")
        self.n_bins = n_bins
        self.top_k = tuple(sorted(set(ks) | {1}))
        self.vocab_size = vocab_size
        self.reset()

    def reset(self) -> None:
        """Sets every sum back to zero."""
        n_k = len(self.top_k)
        self.loss_sum_nats = torch.zeros((), dtype=torch.float64)
        self.entropy_sum_nats = torch.zeros((), dtype=torch.float64)
        self.bin_confidence_sum = torch.zeros(self.n_bins, dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.int64)
        self.bytes = torch.zeros((), dtype=torch.int64)
        self.words = torch.zeros((), dtype=torch.int64)
        self.correct = torch.zeros(n_k, dtype=torch.int64)
        self.bin_count = torch.zeros(self.n_bins, dtype=torch.int64)
        self.bin_correct = torch.zeros(self.n_bins, dtype=torch.int64)

    # ----------------------------------------------------------------------------------------
    # Updates.

    def update(self, logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> None:
        """Adds a batch of predictions: row ``i`` of ``logits`` predicts ``targets[i]`` (no shift).

        Args:
            logits: ``(..., V)`` float32, bfloat16, float16 or float64.
            targets: ``(...)`` integer class indices; positions equal to ``ignore_index`` do not count.

        Raises:
            TypeError, ValueError: as :func:`tokenloss.evaluation.metrics.token_statistics`; a V that
            differs from the meter's.
        """
        self.update_statistics(token_statistics(logits, targets, top_k=1, ignore_index=ignore_index))

    def update_statistics(self, stats: TokenStatistics) -> None:
        """Adds per-token statistics already computed (:func:`tokenloss.evaluation.metrics.token_statistics`).

        Raises:
            ValueError: ``stats.vocab_size`` differs from the meter's V.
        """
        self._set_vocab(stats.vocab_size)
        sums = _loss_update(stats, n_bins=self.n_bins, top_k=self.top_k)
        for name, value in sums.items():
            state = getattr(self, name)
            state += value.to(state.device)

    def count_text(self, *, num_bytes: int = 0, num_words: int = 0) -> None:
        """Adds the UTF-8 bytes and words of text whose tokens were (or will be) scored.

        Count each piece of text once (in a sharded run: on one rank only); see
        :func:`tokenloss.evaluation.metrics.count_bytes` and :func:`tokenloss.evaluation.metrics.count_words`.

        Raises:
            ValueError: a negative count.
        """
        for name, value in (("num_bytes", num_bytes), ("num_words", num_words)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.bytes += num_bytes
        self.words += num_words

    def _set_vocab(self, vocab_size: int | None) -> None:
        if vocab_size is None:
            return
        if self.vocab_size is None:
            self.vocab_size = int(vocab_size)
        elif self.vocab_size != vocab_size:
            raise ValueError(f"this meter counts V = {self.vocab_size} classes, got statistics with V = {vocab_size}")

    # ----------------------------------------------------------------------------------------
    # Combining.

    def _check_compatible(self, other: LossMeter) -> None:
        if not isinstance(other, LossMeter):
            raise TypeError(f"can only merge another LossMeter, got {type(other).__name__}")
        if (other.n_bins, other.top_k) != (self.n_bins, self.top_k):
            raise ValueError(
                f"meters differ: n_bins {self.n_bins} vs {other.n_bins}, top_k {self.top_k} vs {other.top_k}"
            )

    def merge(self, other: LossMeter) -> LossMeter:
        """Adds ``other``'s sums into this meter (in place) and returns this meter.

        Raises:
            TypeError: ``other`` is not a LossMeter.
            ValueError: the meters differ in bins, top-k or V.
        """
        self._check_compatible(other)
        self._set_vocab(other.vocab_size)
        for name in self.REDUCE:
            state = getattr(self, name)
            state += getattr(other, name).to(state.device)
        return self

    def all_reduce(self, group=None) -> LossMeter:
        """Sums every state over the ranks of ``group`` (default: the world), in place; returns self.

        Call it on every rank of the group. The sums travel on the CPU for gloo and on the
        current CUDA device for NCCL. Afterwards every rank holds the totals and :meth:`compute`
        gives the numbers of the whole evaluation. Without an initialised ``torch.distributed``
        (one process) there is nothing to sum over and the meter is left as it is, so the same
        evaluation loop runs with and without ``torchrun``.

        Raises:
            ValueError: the ranks' meters hold different vocab sizes.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self  # one process: its sums are already the totals
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        floats = torch.cat([getattr(self, name).reshape(-1) for name in _FLOAT_STATES]).to(device)
        ints = torch.cat([getattr(self, name).reshape(-1) for name in _INT_STATES]).to(device)
        vocab = torch.tensor([self.vocab_size or 0, -(self.vocab_size or 0)], dtype=torch.int64, device=device)
        dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(ints, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(vocab, op=dist.ReduceOp.MAX, group=group)
        largest, smallest = int(vocab[0]), -int(vocab[1])
        if largest and smallest not in (0, largest):
            raise ValueError(f"the ranks' meters count different vocab sizes ({smallest} and {largest})")
        self.vocab_size = largest or None
        self._unpack(floats.cpu(), _FLOAT_STATES)
        self._unpack(ints.cpu(), _INT_STATES)
        return self

    def _unpack(self, flat: Tensor, names: tuple[str, ...]) -> None:
        offset = 0
        for name in names:
            state = getattr(self, name)
            size = state.numel()
            setattr(self, name, flat[offset : offset + size].reshape(state.shape).clone())
            offset += size

    # ----------------------------------------------------------------------------------------
    # Results.

    def compute(self) -> dict:
        """The numbers, each one division of the sums.

        Returns:
            A dict with ``tokens``, ``loss_sum_nats``, ``loss_nats`` (mean per token),
            ``perplexity`` (``exp(loss_nats)``), ``bits_per_token``, ``perplexity_base2``
            (``2 ** bits_per_token``), ``bytes``, ``words``, ``bits_per_byte``,
            ``byte_perplexity``, ``word_perplexity`` (None without bytes / words),
            ``accuracy`` (top-1), ``top{k}_accuracy`` for each k, ``entropy_nats`` (mean
            predictive entropy), ``ece``, ``n_bins``, ``vocab_size``, ``log_vocab`` (the loss of
            a uniform guess) and ``reliability`` (:meth:`ReliabilityDiagram.to_dict`). A number
            too large for a float (a perplexity that overflows) is None.

        Raises:
            ValueError: nothing was counted yet.
        """
        sums = {name: getattr(self, name) for name in self.REDUCE}
        return _loss_compute(
            sums,
            num_bytes=int(self.bytes),
            num_words=int(self.words),
            top_k=self.top_k,
            vocab_size=self.vocab_size,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The sums, as tensors (a copy)."""
        return {name: getattr(self, name).clone() for name in self.REDUCE}

    def __repr__(self) -> str:
        tokens = int(self.tokens)
        mean = float(self.loss_sum_nats) / tokens if tokens else math.nan
        return f"LossMeter(tokens={tokens}, loss_nats={mean:.4f}, bytes={int(self.bytes)}, words={int(self.words)})"


# --------------------------------------------------------------------------------------------
# The sums a loss meter keeps, and the numbers computed from them.


def _loss_update(stats: TokenStatistics, *, n_bins: int, top_k: tuple[int, ...]) -> dict[str, Tensor]:
    """Sufficient statistics of a batch of :class:`TokenStatistics`: sums only, all reducible by "sum"."""
    count, confidence_sum, hits = _calibration_update(stats.confidence, stats.rank == 1, n_bins)
    return {
        "loss_sum_nats": -stats.log_prob.double().sum(),
        "tokens": torch.tensor(len(stats), dtype=torch.int64, device=stats.log_prob.device),
        "correct": torch.stack([(stats.rank <= k).sum() for k in top_k]).long(),
        "entropy_sum_nats": stats.entropy.double().sum(),
        "bin_count": count,
        "bin_confidence_sum": confidence_sum,
        "bin_correct": hits,
    }


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _loss_compute(
    sums: dict[str, Tensor],
    *,
    num_bytes: int,
    num_words: int,
    top_k: tuple[int, ...],
    vocab_size: int | None,
) -> dict:
    """The reported numbers from the sums; every mean is one division of a sum.

    Raises:
        ValueError: no token was counted.
    """
    tokens = int(sums["tokens"])
    if tokens == 0:
        raise ValueError("no token was scored: call update() with at least one counted position first")
    loss_sum = float(sums["loss_sum_nats"])
    loss = loss_sum / tokens
    bits = loss / LN2
    correct = [int(c) for c in sums["correct"].tolist()]
    diagram = _calibration_compute(sums["bin_count"], sums["bin_confidence_sum"], sums["bin_correct"])
    result = {
        "tokens": tokens,
        "loss_sum_nats": loss_sum,
        "loss_nats": loss,
        "perplexity": _clean(math.exp(loss)) if loss < 700 else None,
        "bits_per_token": bits,
        "perplexity_base2": _clean(2.0**bits) if bits < 1000 else None,
        "bytes": num_bytes,
        "words": num_words,
        "bits_per_byte": bits_per_byte(loss_sum, num_bytes) if num_bytes > 0 else None,
        "byte_perplexity": _clean(_safe_exp(loss_sum / num_bytes)) if num_bytes > 0 else None,
        "word_perplexity": _clean(_safe_exp(loss_sum / num_words)) if num_words > 0 else None,
        "accuracy": correct[top_k.index(1)] / tokens if 1 in top_k else None,
    }
    for k, hits in zip(top_k, correct):
        result[f"top{k}_accuracy"] = hits / tokens
    result.update(
        {
            "entropy_nats": float(sums["entropy_sum_nats"]) / tokens,
            "ece": diagram.ece,
            "n_bins": len(diagram.count),
            "vocab_size": vocab_size,
            "log_vocab": math.log(vocab_size) if vocab_size else None,
            "reliability": diagram.to_dict(),
        }
    )
    return result


def _safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


def summarize(
    logits: Tensor,
    targets: Tensor,
    *,
    text: str | None = None,
    ignore_index: int = -100,
    n_bins: int = DEFAULT_BINS,
    top_k: tuple[int, ...] = DEFAULT_TOP_K,
) -> dict:
    """All the numbers of one batch at once: the functional form of :class:`LossMeter`.

    Args:
        logits: ``(..., V)`` floating tensor; row ``i`` predicts ``targets[i]`` (no shift).
        targets: ``(...)`` integer class indices or ``ignore_index``.
        text: the text the counted targets spell, for the per-byte and per-word numbers.
        ignore_index: target value of positions that do not count.
        n_bins: calibration bins.
        top_k: the k of each top-k accuracy reported.

    Returns:
        The dict of :meth:`LossMeter.compute`.
    """
    meter = LossMeter(n_bins=n_bins, top_k=top_k)
    meter.update(logits, targets, ignore_index=ignore_index)
    if text is not None:
        meter.count_text(num_bytes=count_bytes(text), num_words=count_words(text))
    return meter.compute()
