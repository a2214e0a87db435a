"""Scores every token of a text with a causal LM, in sliding windows, each token exactly once.

A text of ``N`` tokens longer than the model's context is read in windows of at most ``L`` inputs
(``max_length``). With ``bos`` the tokenizer's BOS token opens every window (as
lm-evaluation-harness does), so a window holds ``C = L - 1`` text tokens and every token, the first
included, is scored; without it a window holds ``C = L`` text tokens and the first token of the
text, which has no context, is not scored (it is reported separately). The first window covers
tokens ``[0, min(C, N))``; each later window moves its end ``S`` tokens on (``stride``) and scores
only those ``S`` new tokens, with the ``C - S`` to ``C - 1`` tokens before each as context::

    tokens      0 1 2 3 4 5 6 7 8 9          L = 6, S = 2, no BOS
    window 1   [0 1 2 3 4 5]                 scores 1..5
    window 2       [2 3 4 5 6 7]             scores 6, 7 (context 4 and 5 tokens)
    window 3           [4 5 6 7 8 9]         scores 8, 9

This is the sliding window of the Hugging Face guide "Perplexity of fixed-length models", counted
exactly: each scored token is counted once, with its own loss, instead of a per-window mean
weighted by the window's target length. ``S`` must be at most ``L - 1`` (so that the first new token
of a window has at least one token of context, or BOS). Every window has the same length
``min(C, N)``, so windows batch without padding.

Under ``torch.distributed`` (:func:`evaluate` with a process group) the windows are dealt out to the
ranks round-robin, each rank scores its own, the :class:`~tokenloss.evaluation.meter.LossMeter` sums are
all-reduced, and rank 0 can gather the per-token scores: the result equals the one-process run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenloss.evaluation.meter import LossMeter
from tokenloss.evaluation.metrics import DEFAULT_BINS, DEFAULT_TOP_K, LN2, TokenStatistics, count_bytes, count_words
from tokenloss.models import CausalLM


@dataclass(frozen=True)
class Window:
    """One model input: text tokens ``[begin, end)`` (after BOS if used); tokens ``[score_from, end)`` scored."""

    begin: int
    end: int
    score_from: int


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def check_window(max_length: int, stride: int) -> None:
    """Checks a window length and stride.

    Raises:
        TypeError: not ints.
        ValueError: ``max_length < 2``, ``stride < 1`` or ``stride > max_length - 1``.
    """
    _check_int("max_length", max_length, 2)
    _check_int("stride", stride, 1)
    if stride > max_length - 1:
        raise ValueError(
            f"stride ({stride}) must be smaller than max_length ({max_length}): each window must keep "
            f"at least one token of context for the first token it scores; use a stride of at most {max_length - 1}"
        )


def plan_windows(num_tokens: int, *, max_length: int, stride: int, bos: bool) -> list[Window]:
    """The windows that score each token of an ``num_tokens``-token text once (see the module doc).

    Returns:
        The windows in order; empty when there is nothing to score (no tokens, or a single
        token without BOS).

    Raises:
        TypeError, ValueError: as :func:`check_window`; a negative ``num_tokens``.
    """
    check_window(max_length, stride)
    _check_int("num_tokens", num_tokens, 0)
    capacity = max_length - 1 if bos else max_length
    first = 0 if bos else 1
    if num_tokens <= first:
        return []
    end = min(capacity, num_tokens)
    windows = [Window(begin=0, end=end, score_from=first)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        windows.append(Window(begin=new_end - capacity, end=new_end, score_from=end))
        end = new_end
    return windows


@dataclass
class TextScores:
    """Per-token scores of a text. Arrays run over all ``N`` tokens; rows not scored hold NaN / 0 / -1.

    Attributes:
        text: the text.
        token_ids: ``N`` token ids.
        offsets: ``N`` character spans ``(start, end)`` in ``text``.
        token_text: ``N`` display texts of the tokens.
        scored: ``(N,)`` bool; False for the first token without BOS (and, in one rank's shard,
            for the tokens other ranks scored).
        log_prob: ``(N,)`` float32, ``log p(token | context)`` in nats (NaN where not scored).
        rank: ``(N,)`` int64, rank of the token among the predictions (1 = top; 0 where not scored).
        entropy: ``(N,)`` float32, entropy of the prediction in nats (NaN where not scored).
        top_ids: ``(N, k)`` int64, the k most likely tokens (-1 where not scored).
        top_probs: ``(N, k)`` float32, their probabilities (NaN where not scored).
        top_text: display texts of ``top_ids`` (empty lists where not scored).
        context: ``(N,)`` int64, text tokens of context each token was scored with (BOS not
            counted; -1 where not scored).
        bos: whether a BOS token opened every window.
        bos_token_id: the BOS id used, or None.
        max_length: ``L``, inputs per window (BOS included).
        stride: ``S``.
        num_windows: windows scored (in a shard: by this rank).
        vocab_size: V.
        model_name: the model's name.
        shard: ``(rank, world_size)`` of the windows scored here.
        bytes_per_token: 1 for a byte-level tokenizer (then the first token is exactly one byte),
            else None.
    """

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    token_text: list[str]
    scored: Tensor
    log_prob: Tensor
    rank: Tensor
    entropy: Tensor
    top_ids: Tensor
    top_probs: Tensor
    top_text: list[list[str]]
    context: Tensor
    bos: bool
    bos_token_id: int | None
    max_length: int
    stride: int
    num_windows: int
    vocab_size: int
    model_name: str
    shard: tuple[int, int] = (0, 1)
    bytes_per_token: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def surprisal_bits(self) -> Tensor:
        """``(N,)`` float32, ``-log2 p`` of each token (NaN where not scored)."""
        return -self.log_prob / LN2

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def scored_bytes(self) -> int:
        """UTF-8 bytes of the text whose tokens are scored: all of it with BOS, less the first token's without."""
        total = count_bytes(self.text)
        if self.bos or not self.token_ids:
            return total
        return total - self._first_token_bytes()

    @property
    def scored_words(self) -> int:
        """Words (lm-evaluation-harness count) of the scored text: without BOS, the text after the first token."""
        if self.bos or len(self.token_ids) < 2:
            return count_words(self.text)
        return count_words(self.text[self.offsets[1][0] :])

    @property
    def scored_words_whitespace(self) -> int:
        """Whitespace-separated words of the same scored text (``len(text.split())``), for comparison:
        lm-evaluation-harness's count adds one for leading or trailing whitespace."""
        if self.bos or len(self.token_ids) < 2:
            return len(self.text.split())
        return len(self.text[self.offsets[1][0] :].split())

    def _first_token_bytes(self) -> int:
        if self.bytes_per_token:
            return self.bytes_per_token
        second_start = self.offsets[1][0] if len(self.offsets) > 1 else len(self.text)
        return count_bytes(self.text[:second_start])

    def statistics(self) -> TokenStatistics:
        """The scored rows as :class:`~tokenloss.evaluation.metrics.TokenStatistics`."""
        index = self.scored
        return TokenStatistics(
            log_prob=self.log_prob[index],
            rank=self.rank[index],
            entropy=self.entropy[index],
            confidence=self.top_probs[index, 0],
            top_ids=self.top_ids[index],
            top_probs=self.top_probs[index],
            vocab_size=self.vocab_size,
        )

    def meter(
        self,
        *,
        n_bins: int = DEFAULT_BINS,
        top_k: tuple[int, ...] = DEFAULT_TOP_K,
        count_text: bool = True,
    ) -> LossMeter:
        """A :class:`~tokenloss.evaluation.meter.LossMeter` of the scored tokens.

        Args:
            count_text: also count the scored text's bytes and words (:attr:`scored_bytes`,
                :attr:`scored_words`); in a sharded run pass True on one rank only.
        """
        meter = LossMeter(n_bins=n_bins, top_k=top_k, vocab_size=self.vocab_size)
        if self.num_scored:
            meter.update_statistics(self.statistics())
        if count_text:
            meter.count_text(num_bytes=self.scored_bytes, num_words=self.scored_words)
        return meter

    def first_token(self) -> dict:
        """The first token of the text and how it was treated (scored after BOS, or not scored)."""
        if not self.token_ids:
            return {}
        scored = bool(self.scored[0])
        log_prob = float(self.log_prob[0]) if scored else None
        return {
            "id": self.token_ids[0],
            "text": self.token_text[0],
            "scored": scored,
            "log_prob_nats": log_prob,
            "surprisal_bits": -log_prob / LN2 if log_prob is not None else None,
            "why": "scored after BOS" if self.bos else "not scored: no context (the tokenizer has no BOS, or --no-bos)",
        }

    def rows(self):
        """One dict per token: index, start, end, token_id, token, scored, log_prob_nats,
        surprisal_bits, probability, rank, entropy_nats, context_tokens, top (list of id/token/p)."""
        log_prob = self.log_prob.tolist()
        rank = self.rank.tolist()
        entropy = self.entropy.tolist()
        top_ids = self.top_ids.tolist()
        top_probs = self.top_probs.tolist()
        context = self.context.tolist()
        scored = self.scored.tolist()
        for i, token_id in enumerate(self.token_ids):
            ok = scored[i]
            yield {
                "index": i,
                "start": self.offsets[i][0],
                "end": self.offsets[i][1],
                "token_id": token_id,
                "token": self.token_text[i],
                "scored": ok,
                "log_prob_nats": log_prob[i] if ok else None,
                "surprisal_bits": -log_prob[i] / LN2 if ok else None,
                "probability": math.exp(log_prob[i]) if ok else None,
                "rank": rank[i] if ok else None,
                "entropy_nats": entropy[i] if ok else None,
                "context_tokens": context[i] if ok else None,
                "top": [
                    {"id": tid, "token": ttext, "p": p}
                    for tid, ttext, p in zip(top_ids[i], self.top_text[i], top_probs[i])
                ]
                if ok
                else [],
            }

    @staticmethod
    def combine(parts: list[TextScores]) -> TextScores:
        """The scores of a whole text from the shards that ranks scored (each row from the shard that scored it).

        Raises:
            ValueError: no parts, or parts of different texts or settings.
        """
        if not parts:
            raise ValueError("TextScores.combine needs at least one part")
        base = parts[0]
        for part in parts[1:]:
            if part.token_ids != base.token_ids or (part.bos, part.max_length, part.stride) != (
                base.bos,
                base.max_length,
                base.stride,
            ):
                raise ValueError("TextScores.combine: the parts score different texts or use different settings")
        whole = TextScores(
            text=base.text,
            token_ids=base.token_ids,
            offsets=base.offsets,
            token_text=base.token_text,
            scored=torch.zeros_like(base.scored),
            log_prob=torch.full_like(base.log_prob, math.nan),
            rank=torch.zeros_like(base.rank),
            entropy=torch.full_like(base.entropy, math.nan),
            top_ids=torch.full_like(base.top_ids, -1),
            top_probs=torch.full_like(base.top_probs, math.nan),
            top_text=[[] for _ in base.token_ids],
            context=torch.full_like(base.context, -1),
            bos=base.bos,
            bos_token_id=base.bos_token_id,
            max_length=base.max_length,
            stride=base.stride,
            num_windows=sum(part.num_windows for part in parts),
            vocab_size=base.vocab_size,
            model_name=base.model_name,
            shard=(0, 1),
            bytes_per_token=base.bytes_per_token,
        )
        for part in parts:
            index = part.scored
            if bool((whole.scored & index).any()):
                raise ValueError("TextScores.combine: two parts scored the same token")
            whole.scored |= index
            for name in ("log_prob", "rank", "entropy", "top_ids", "top_probs", "context"):
                getattr(whole, name)[index] = getattr(part, name)[index]
            for i in index.nonzero().flatten().tolist():
                whole.top_text[i] = part.top_text[i]
        return whole


def resolve_settings(
    model: CausalLM,
    *,
    max_length: int | None,
    stride: int | None,
    bos: bool | None,
) -> tuple[int, int, bool]:
    """The ``(max_length, stride, bos)`` a run uses: defaults filled in from the model, then checked.

    Defaults: ``max_length`` = the model's context; ``stride`` = ``max_length // 2``; ``bos`` =
    whether the tokenizer defines a BOS token.

    Raises:
        ValueError: ``max_length`` beyond the model's context or below 2; a stride out of
            ``[1, max_length - 1]``; ``bos=True`` for a tokenizer without BOS.
    """
    if max_length is None:
        max_length = model.max_length
    _check_int("max_length", max_length, 2)
    if max_length > model.max_length:
        raise ValueError(f"max_length ({max_length}) exceeds the model's context of {model.max_length} tokens")
    if stride is None:
        stride = max(1, max_length // 2)
    check_window(max_length, stride)
    if bos is None:
        bos = model.bos_token_id is not None
    elif bos and model.bos_token_id is None:
        raise ValueError(f"bos=True, but the tokenizer of {model.name} defines no BOS token: use no BOS")
    return max_length, stride, bool(bos)


def score_text(
    model: CausalLM,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    top_k: int = 5,
    shard: tuple[int, int] = (0, 1),
) -> TextScores:
    """Scores each token of ``text`` once with ``model``, in sliding windows (see the module doc).

    Args:
        model: the :class:`~tokenloss.models.CausalLM`.
        text: the text (non-empty).
        max_length: ``L``, inputs per window, BOS included (default: the model's context).
        stride: ``S``, new tokens scored per window after the first (default ``L // 2``).
        bos: put the BOS token before every window (default: when the tokenizer defines one).
        batch_size: windows per forward pass.
        progress: show a tqdm progress bar (on stderr).
        top_k: alternatives kept per token.
        shard: ``(rank, world_size)``: score only windows ``rank, rank + world_size, ...``.

    Returns:
        :class:`TextScores` (in a shard, only this rank's tokens are marked scored).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: an empty text, a text of one token without BOS, or bad settings
            (:func:`resolve_settings`).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty: there is nothing to score")
    _check_int("batch_size", batch_size, 1)
    _check_int("top_k", top_k, 1)
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    max_length, stride, bos = resolve_settings(model, max_length=max_length, stride=stride, bos=bos)
    ids, offsets = model.encode_with_offsets(text)
    if not ids:
        raise ValueError("the text has no tokens: there is nothing to score")
    if len(ids) < 2 and not bos:
        raise ValueError("the text is a single token and there is no BOS: nothing can be scored (give a longer text)")
    windows = plan_windows(len(ids), max_length=max_length, stride=stride, bos=bos)[rank::world_size]

    n, k = len(ids), min(top_k, model.vocab_size)
    scores = TextScores(
        text=text,
        token_ids=ids,
        offsets=offsets,
        token_text=[model.decode_token(i) for i in ids],
        scored=torch.zeros(n, dtype=torch.bool),
        log_prob=torch.full((n,), math.nan),
        rank=torch.zeros(n, dtype=torch.int64),
        entropy=torch.full((n,), math.nan),
        top_ids=torch.full((n, k), -1, dtype=torch.int64),
        top_probs=torch.full((n, k), math.nan),
        top_text=[[] for _ in range(n)],
        context=torch.full((n,), -1, dtype=torch.int64),
        bos=bos,
        bos_token_id=model.bos_token_id if bos else None,
        max_length=max_length,
        stride=stride,
        num_windows=len(windows),
        vocab_size=model.vocab_size,
        model_name=model.name,
        shard=(rank, world_size),
        bytes_per_token=model.bytes_per_token,
    )
    _score_windows(model, ids, windows, scores, batch_size=batch_size, progress=progress)
    return scores


def _score_windows(
    model: CausalLM,
    ids: list[int],
    windows: list[Window],
    scores: TextScores,
    *,
    batch_size: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    prefix = [model.bos_token_id] if scores.bos else []
    shift = len(prefix)
    token_ids = torch.tensor(ids, dtype=torch.int64)
    k = scores.top_ids.shape[1]
    display: dict[int, str] = {}
    bar = tqdm(total=len(windows), desc="scoring", unit="window", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            inputs = torch.tensor([prefix + ids[w.begin : w.end] for w in batch], dtype=torch.int64)  # (B, T)
            logits = model.logits(inputs.to(model.device))  # (B, T, V) float32
            if logits.shape[:2] != inputs.shape or logits.shape[-1] != model.vocab_size:
                raise ValueError(
                    f"the model returned logits of shape {tuple(logits.shape)} for inputs of shape "
                    f"{tuple(inputs.shape)}; expected (B, T, {model.vocab_size})"
                )
            # Token i sits at input position i - begin + shift and is predicted one position earlier.
            rows = torch.cat(
                [
                    logits[b, w.score_from - w.begin + shift - 1 : w.end - w.begin + shift - 1]
                    for b, w in enumerate(batch)
                ]
            )  # (n, V)
            positions = torch.cat([torch.arange(w.score_from, w.end) for w in batch])  # (n,)
            begins = torch.cat([torch.full((w.end - w.score_from,), w.begin) for w in batch])  # (n,)
            stats = token_stats_cpu(rows, token_ids[positions].to(rows.device), k)
            scores.scored[positions] = True
            scores.log_prob[positions] = stats.log_prob
            scores.rank[positions] = stats.rank
            scores.entropy[positions] = stats.entropy
            scores.top_ids[positions] = stats.top_ids
            scores.top_probs[positions] = stats.top_probs
            scores.context[positions] = positions - begins
            for position, alternatives in zip(positions.tolist(), stats.top_ids.tolist()):
                texts = []
                for token in alternatives:
                    if token not in display:
                        display[token] = model.decode_token(token)
                    texts.append(display[token])
                scores.top_text[position] = texts
            bar.update(len(batch))


def token_stats_cpu(rows: Tensor, targets: Tensor, k: int) -> TokenStatistics:
    """:func:`tokenloss.evaluation.metrics.token_statistics` of ``(n, V)`` rows, moved to the CPU."""
    from tokenloss.evaluation.metrics import token_statistics

    stats = token_statistics(rows, targets, top_k=k)
    return TokenStatistics(
        log_prob=stats.log_prob.float().cpu(),
        rank=stats.rank.cpu(),
        entropy=stats.entropy.float().cpu(),
        confidence=stats.confidence.float().cpu(),
        top_ids=stats.top_ids.cpu(),
        top_probs=stats.top_probs.float().cpu(),
        vocab_size=stats.vocab_size,
    )


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        scores: per-token scores of the whole text (on every rank without a process group; on
            rank 0 only when gathered, None elsewhere).
        meter: the loss meter of all scored tokens (all-reduced across ranks).
        result: ``meter.compute()`` plus the run's settings (``model``, ``bos``, ``first_token``,
            ``max_length``, ``stride``, ``windows``, ``world_size``, ``text_tokens``).
    """

    scores: TextScores | None
    meter: LossMeter
    result: dict


def evaluate(
    model: CausalLM,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    n_bins: int = DEFAULT_BINS,
    top_k: tuple[int, ...] = DEFAULT_TOP_K,
    group=None,
    gather: bool = True,
) -> Evaluation:
    """Scores ``text`` and computes every metric; with a process group, shards the windows across ranks.

    Args:
        model, text, max_length, stride, bos, batch_size, progress: as :func:`score_text`.
        n_bins: calibration bins.
        top_k: the k of each top-k accuracy.
        group: a ``torch.distributed`` process group to shard over (None: the default group if
            torch.distributed is initialised, else no sharding).
        gather: gather the per-token scores on rank 0 (else each rank keeps its shard's).

    Returns:
        :class:`Evaluation`; every rank gets the same ``result``.

    Raises:
        ValueError, TypeError: as :func:`score_text`.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    scores = score_text(
        model,
        text,
        max_length=max_length,
        stride=stride,
        bos=bos,
        batch_size=batch_size,
        progress=progress and rank == 0,
        top_k=max(5, max(top_k)),
        shard=(rank, world_size),
    )
    meter = scores.meter(n_bins=n_bins, top_k=top_k, count_text=rank == 0)
    settings = {
        "model": model.name,
        "bos": scores.bos,
        "first_token": scores.first_token(),  # rank 0 always scores window 0
        "max_length": scores.max_length,
        "stride": scores.stride,
        "windows": scores.num_windows,
        "text_tokens": len(scores),
        "world_size": world_size,
        "words_whitespace": scores.scored_words_whitespace,
    }
    if world_size > 1:
        meter.all_reduce(group)
        on_nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
        counts = torch.tensor([scores.num_windows], dtype=torch.int64, device=device)
        dist.all_reduce(counts, group=group)
        settings["windows"] = int(counts[0])
        src = dist.get_global_rank(group, 0) if group is not None else 0
        first = [settings["first_token"]]
        dist.broadcast_object_list(first, src=src, group=group)
        settings["first_token"] = first[0]
        if gather:
            parts = [None] * world_size if rank == 0 else None
            dist.gather_object(scores, parts, dst=src, group=group)
            scores = TextScores.combine(parts) if rank == 0 else None
    result = meter.compute()
    result.update(settings)
    return Evaluation(scores=scores, meter=meter, result=result)
