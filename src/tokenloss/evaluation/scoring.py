"""Scores every token of a text with a causal LM, in windows, each token exactly once.

A text longer than the model's context is read in windows of at most ``max_length`` inputs, under
one of three schemes (:mod:`tokenloss.evaluation.windows`): ``sliding`` (the default: BOS before
every window, constant window length, ``stride`` new tokens per window), ``lm-eval`` (exactly
lm-evaluation-harness's ``loglikelihood_rolling``) and ``hf-guide`` (the Hugging Face perplexity
guide's windows). Each scored token is counted once, with its own loss.

Two ways to run it:

- :func:`score_text` / :func:`evaluate` hold the whole text and return every token's scores
  (:class:`TextScores`), for the explain page, a report, or a run sharded over
  ``torch.distributed`` ranks (the windows dealt out round-robin, the
  :class:`~tokenloss.evaluation.meter.LossMeter` sums all-reduced; rank 0 can gather the scores:
  the result equals the one-process run);
- :func:`evaluate_stream` reads the text in pieces (:mod:`tokenloss.evaluation.tokenizing`), scores
  each window as its tokens arrive and hands each token's row to a sink (a report writer) if one
  is given, so memory is bounded by a piece and a batch of windows, not by the text. Both give the
  same numbers.

The per-token alternatives (top-k ids, probabilities and their display text) are computed only
when an output needs them: ``top_k=0`` keeps the summary statistics only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenloss.evaluation.meter import LossMeter
from tokenloss.evaluation.metrics import (
    DEFAULT_BINS,
    DEFAULT_TOP_K,
    LN2,
    TextCounter,
    TokenStatistics,
    count_bytes,
    count_words,
)
from tokenloss.evaluation.windows import Window, WindowPlanner, _check_int, check_scheme, plan_windows
from tokenloss.models import CausalLM


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
        context: ``(N,)`` int64, text tokens of context each token was scored with (a prefix
            token not counted; -1 where not scored).
        bos: ``sliding``: a BOS token opened every window; ``hf-guide``: one opened the text;
            ``lm-eval``: always True (a prefix token opens the first window).
        bos_token_id: the prefix token's id (BOS, or EOS for ``lm-eval`` without BOS), or None.
        max_length: ``L``, inputs per window (the prefix token included).
        stride: ``S`` (not used by ``lm-eval``).
        num_windows: windows scored (in a shard: by this rank).
        vocab_size: V.
        model_name: the model's name.
        shard: ``(rank, world_size)`` of the windows scored here.
        bytes_per_token: 1 for a byte-level tokenizer, else None.
        scheme: the window scheme (:data:`tokenloss.evaluation.windows.SCHEMES`).
        confidence: ``(N,)`` float32, the top-1 probability (NaN where not scored).
        first_token_bytes: UTF-8 bytes of the text's first token, from its byte string where the
            tokenizer gives it (exact for a byte-level BPE token that holds part of a character),
            else from its character span.
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
    scheme: str = "sliding"
    first_token_bytes: int = 0
    confidence: Tensor | None = None

    def __post_init__(self) -> None:
        if self.confidence is None:
            n = len(self.token_ids)
            self.confidence = self.top_probs[:, 0].clone() if self.top_probs.shape[1] else torch.full((n,), math.nan)

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
    def first_scored(self) -> bool:
        """Whether the first token is scored (after BOS or the prefix token)."""
        return self.bos or self.scheme == "lm-eval"

    @property
    def scored_bytes(self) -> int:
        """UTF-8 bytes of the text whose tokens are scored: all of it, less the first token's when it is not."""
        total = count_bytes(self.text)
        if self.first_scored or not self.token_ids:
            return total
        return total - self.first_token_bytes

    @property
    def scored_words(self) -> int:
        """Words (lm-evaluation-harness count) of the scored text (after the first token if it is not scored)."""
        return count_words(self._scored_text())

    @property
    def scored_words_whitespace(self) -> int:
        """Whitespace-separated words of the same scored text (``len(text.split())``), for comparison:
        lm-evaluation-harness's count adds one for leading or trailing whitespace."""
        return len(self._scored_text().split())

    def _scored_text(self) -> str:
        if self.first_scored or len(self.token_ids) < 2:
            return self.text
        return self.text[self.offsets[1][0] :]

    def statistics(self) -> TokenStatistics:
        """The scored rows as :class:`~tokenloss.evaluation.metrics.TokenStatistics`."""
        index = self.scored
        return TokenStatistics(
            log_prob=self.log_prob[index],
            rank=self.rank[index],
            entropy=self.entropy[index],
            confidence=self.confidence[index],
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
            "why": _first_token_why(self.scheme, self.bos),
        }

    def rows(self) -> Iterator[dict]:
        """One dict per token (:func:`token_row`)."""
        log_prob = self.log_prob.tolist()
        rank = self.rank.tolist()
        entropy = self.entropy.tolist()
        top_ids = self.top_ids.tolist()
        top_probs = self.top_probs.tolist()
        context = self.context.tolist()
        scored = self.scored.tolist()
        for i, token_id in enumerate(self.token_ids):
            ok = scored[i]
            yield token_row(
                i,
                self.offsets[i],
                token_id,
                self.token_text[i],
                (log_prob[i], rank[i], entropy[i], context[i], list(zip(top_ids[i], self.top_text[i], top_probs[i])))
                if ok
                else None,
            )

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
            if part.token_ids != base.token_ids or (part.bos, part.max_length, part.stride, part.scheme) != (
                base.bos,
                base.max_length,
                base.stride,
                base.scheme,
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
            scheme=base.scheme,
            first_token_bytes=base.first_token_bytes,
        )
        for part in parts:
            index = part.scored
            if bool((whole.scored & index).any()):
                raise ValueError("TextScores.combine: two parts scored the same token")
            whole.scored |= index
            for name in ("log_prob", "rank", "entropy", "top_ids", "top_probs", "context", "confidence"):
                getattr(whole, name)[index] = getattr(part, name)[index]
            for i in index.nonzero().flatten().tolist():
                whole.top_text[i] = part.top_text[i]
        return whole


def token_row(
    index: int,
    span: tuple[int, int],
    token_id: int,
    token_text: str,
    score: tuple[float, int, float, int, list[tuple[int, str, float]]] | None,
) -> dict:
    """One token's row: index, start, end, token_id, token, scored, log_prob_nats, surprisal_bits,
    probability, rank, entropy_nats, context_tokens, top (list of id/token/p); None where not scored.

    Args:
        score: ``(log_prob, rank, entropy, context, [(id, text, p), ...])``, or None for a token not scored.
    """
    if score is None:
        log_prob = rank = entropy = context = None
        top: list[dict] = []
    else:
        log_prob, rank, entropy, context, alternatives = score
        top = [{"id": tid, "token": text, "p": p} for tid, text, p in alternatives]
    return {
        "index": index,
        "start": span[0],
        "end": span[1],
        "token_id": token_id,
        "token": token_text,
        "scored": score is not None,
        "log_prob_nats": log_prob,
        "surprisal_bits": -log_prob / LN2 if log_prob is not None else None,
        "probability": math.exp(log_prob) if log_prob is not None else None,
        "rank": rank,
        "entropy_nats": entropy,
        "context_tokens": context,
        "top": top,
    }


def _first_token_why(scheme: str, bos: bool) -> str:
    if scheme == "lm-eval":
        return "scored after the prefix token (lm-eval windows)"
    if bos:
        return "scored after BOS"
    return "not scored: no context (the tokenizer has no BOS, or --no-bos)"


@dataclass(frozen=True)
class Settings:
    """What a run uses, defaults filled in: see :func:`resolve_settings`."""

    scheme: str
    max_length: int
    stride: int
    bos: bool
    prefix_token_id: int | None

    @property
    def first_scored(self) -> bool:
        return self.bos

    def planner(self) -> WindowPlanner:
        return WindowPlanner(self.scheme, max_length=self.max_length, stride=self.stride, bos=self.bos)


def resolve_settings(
    model: CausalLM,
    *,
    max_length: int | None,
    stride: int | None,
    bos: bool | None,
    windows: str = "sliding",
) -> Settings:
    """The settings a run uses: defaults filled in from the model, then checked.

    Defaults: ``max_length`` = the model's context; ``stride`` = ``max_length // 2``; ``bos`` =
    whether the tokenizer defines a BOS token (always true for ``lm-eval``, whose prefix token is
    BOS, or EOS for a tokenizer without BOS).

    Raises:
        ValueError: an unknown scheme; ``max_length`` beyond the model's context or below 2; a
            stride out of ``[1, max_length - 1]``; ``bos=True`` for a tokenizer without BOS;
            ``lm-eval`` with ``bos=False`` or for a tokenizer with neither BOS nor EOS.
    """
    check_scheme(windows)
    if max_length is None:
        max_length = model.max_length
    _check_int("max_length", max_length, 2)
    if max_length > model.max_length:
        raise ValueError(f"max_length ({max_length}) exceeds the model's context of {model.max_length} tokens")
    if stride is None:
        stride = max(1, max_length // 2)
    if windows == "lm-eval":
        if bos is False:
            raise ValueError(
                "the lm-eval windows always open with a prefix token (BOS, or EOS without BOS), as the harness "
                "does: --no-bos does not apply to them (use --windows sliding or hf-guide)"
            )
        prefix = model.bos_token_id if model.bos_token_id is not None else model.eos_token_id
        if prefix is None:
            raise ValueError(
                f"the lm-eval windows need a prefix token, and the tokenizer of {model.name} defines neither BOS "
                "nor EOS: use --windows sliding or hf-guide"
            )
        WindowPlanner(windows, max_length=max_length, stride=stride, bos=True)  # checks the numbers
        return Settings(windows, max_length, stride, True, prefix)
    if bos is None:
        bos = model.bos_token_id is not None
    elif bos and model.bos_token_id is None:
        raise ValueError(f"bos=True, but the tokenizer of {model.name} defines no BOS token: use no BOS")
    WindowPlanner(windows, max_length=max_length, stride=stride, bos=bool(bos))
    return Settings(windows, max_length, stride, bool(bos), model.bos_token_id if bos else None)


def first_token_bytes(model: CausalLM, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> int:
    """UTF-8 bytes the first token of ``text`` covers.

    From the token's own bytes where the tokenizer gives them (a byte-level BPE token may hold part
    of a character: its character span would count the whole character), capped by its character
    span's bytes (a tokenizer that adds a prefix space puts a byte in the token that is not in the
    text); else from the characters before the second token.
    """
    if not ids:
        return 0
    start, end = offsets[0]
    span = count_bytes(text[start:end]) if end > start else None
    own = model.token_bytes(ids[0])
    if own is not None:
        return min(len(own), span) if span is not None else len(own)
    second_start = offsets[1][0] if len(offsets) > 1 else len(text)
    return count_bytes(text[:second_start])


# --------------------------------------------------------------------------------------------
# The scoring loop shared by the whole-text and the streaming runs.


@dataclass
class ScoredTokens:
    """The scores of the tokens one batch of windows scored.

    Attributes:
        positions: ``(n,)`` int64, the tokens' indices in the text, increasing.
        context: ``(n,)`` int64, text tokens of context each was scored with.
        stats: their :class:`~tokenloss.evaluation.metrics.TokenStatistics` on the CPU (with
            ``top_k`` alternatives each; none for a summary).
    """

    positions: Tensor
    context: Tensor
    stats: TokenStatistics


class _TokenBuffer:
    """The text's tokens from index ``base`` on (older ones dropped once no window needs them)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.base = 0

    @property
    def end(self) -> int:
        return self.base + len(self.ids)

    def extend(self, ids: list[int]) -> None:
        self.ids.extend(ids)

    def slice(self, begin: int, end: int) -> list[int]:
        return self.ids[begin - self.base : end - self.base]

    def drop_before(self, index: int) -> None:
        if index > self.base:
            del self.ids[: index - self.base]
            self.base = index


def _same_length_batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, ``batch_size`` at a time (the odd first or last one alone)."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _score_batches(
    model: CausalLM,
    windows: list[Window],
    tokens: _TokenBuffer,
    *,
    prefix_token_id: int | None,
    top_k: int,
    batch_size: int,
) -> Iterator[ScoredTokens]:
    buffer: Tensor | None = None  # the logits of every batch are written here (see CausalLM.logits)
    for batch in _same_length_batches(windows, batch_size):
        inputs = torch.tensor(
            [([prefix_token_id] if w.prefix else []) + tokens.slice(w.begin, w.end) for w in batch], dtype=torch.int64
        )  # (B, T)
        with torch.inference_mode():
            if buffer is None or buffer.numel() < inputs.numel() * model.vocab_size:
                buffer = None  # freed before the larger one is made
                buffer = torch.empty(inputs.numel() * model.vocab_size, device=model.device)
            logits = model.logits(inputs.to(model.device), out=buffer)  # (B, T, V) float32
        if logits.shape[:2] != inputs.shape or logits.shape[-1] != model.vocab_size:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)} for inputs of shape "
                f"{tuple(inputs.shape)}; expected (B, T, {model.vocab_size})"
            )
        # Token i is predicted by the logits at the input position of token i - 1 (the prefix for i == begin);
        # each window's rows are a view: no copy of the (n, V) logits.
        parts = []
        with torch.inference_mode():
            for b, w in enumerate(batch):
                rows = logits[b, w.score_from - w.begin + w.prefix - 1 : w.score_to - w.begin + w.prefix - 1]
                targets = torch.tensor(tokens.slice(w.score_from, w.score_to), dtype=torch.int64, device=rows.device)
                parts.append(token_stats_cpu(rows, targets, top_k))
        stats = parts[0] if len(parts) == 1 else TokenStatistics.concatenate(parts)
        positions = torch.cat([torch.arange(w.score_from, w.score_to) for w in batch])  # (n,)
        begins = torch.cat([torch.full((w.num_scored,), w.begin) for w in batch])  # (n,)
        yield ScoredTokens(positions=positions, context=positions - begins, stats=stats)


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


def _progress_bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scoring", unit="tok", disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# The whole text in memory.


def score_text(
    model: CausalLM,
    text: str,
    *,
    windows: str = "sliding",
    max_length: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    top_k: int = 5,
    shard: tuple[int, int] = (0, 1),
) -> TextScores:
    """Scores each token of ``text`` once with ``model``, in windows (see the module doc).

    Args:
        model: the :class:`~tokenloss.models.CausalLM`.
        text: the text (non-empty).
        windows: the window scheme: ``"sliding"``, ``"lm-eval"`` or ``"hf-guide"``
            (:mod:`tokenloss.evaluation.windows`).
        max_length: ``L``, inputs per window, the prefix token included (default: the model's context).
        stride: ``S``, new tokens scored per window after the first (default ``L // 2``; not
            used by ``lm-eval``).
        bos: ``sliding``: put BOS before every window; ``hf-guide``: before the text (default:
            when the tokenizer defines one; ``lm-eval`` always has its prefix token).
        batch_size: windows per forward pass.
        progress: show a tqdm progress bar (on stderr).
        top_k: alternatives kept per token (0: none, the summary statistics only).
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
    _check_int("top_k", top_k, 0)
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    settings = resolve_settings(model, max_length=max_length, stride=stride, bos=bos, windows=windows)
    ids, offsets = model.encode_with_offsets(text)
    if not ids:
        raise ValueError("the text has no tokens: there is nothing to score")
    if len(ids) < 2 and not settings.first_scored:
        raise ValueError("the text is a single token and there is no BOS: nothing can be scored (give a longer text)")
    planned = plan_windows(
        len(ids), max_length=settings.max_length, stride=settings.stride, bos=settings.bos, scheme=settings.scheme
    )[rank::world_size]

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
        bos=settings.bos,
        bos_token_id=settings.prefix_token_id,
        max_length=settings.max_length,
        stride=settings.stride,
        num_windows=len(planned),
        vocab_size=model.vocab_size,
        model_name=model.name,
        shard=(rank, world_size),
        bytes_per_token=model.bytes_per_token,
        scheme=settings.scheme,
        first_token_bytes=first_token_bytes(model, text, ids, offsets),
    )
    tokens = _TokenBuffer()
    tokens.extend(ids)
    display: dict[int, str] = {}
    with _progress_bar(sum(w.num_scored for w in planned), progress) as bar:
        for part in _score_batches(
            model, planned, tokens, prefix_token_id=settings.prefix_token_id, top_k=k, batch_size=batch_size
        ):
            positions, stats = part.positions, part.stats
            scores.scored[positions] = True
            scores.log_prob[positions] = stats.log_prob
            scores.rank[positions] = stats.rank
            scores.entropy[positions] = stats.entropy
            scores.top_ids[positions] = stats.top_ids
            scores.top_probs[positions] = stats.top_probs
            scores.context[positions] = part.context
            scores.confidence[positions] = stats.confidence
            for position, alternatives in zip(positions.tolist(), stats.top_ids.tolist()):
                scores.top_text[position] = [_display(model, display, token) for token in alternatives]
            bar.update(len(positions))
    return scores


def _display(model: CausalLM, cache: dict[int, str], token: int) -> str:
    if token not in cache:
        cache[token] = model.decode_token(token)
    return cache[token]


@dataclass
class Evaluation:
    """The result of :func:`evaluate` or :func:`evaluate_stream`.

    Attributes:
        scores: per-token scores of the whole text (:func:`evaluate`: on every rank without a
            process group, on rank 0 only when gathered, None elsewhere; :func:`evaluate_stream`:
            None, the rows went to its sink).
        meter: the loss meter of all scored tokens (all-reduced across ranks).
        result: ``meter.compute()`` plus the run's settings (``model``, ``windows`` (the scheme),
            ``bos``, ``first_token``, ``max_length``, ``stride``, ``num_windows``, ``world_size``,
            ``text_tokens``, ``words_whitespace``, ``characters``, ``text_bytes``, ``text_words``).
    """

    scores: TextScores | None
    meter: LossMeter
    result: dict


def evaluate(
    model: CausalLM,
    text: str,
    *,
    windows: str = "sliding",
    max_length: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    n_bins: int = DEFAULT_BINS,
    top_k: tuple[int, ...] = DEFAULT_TOP_K,
    group=None,
    gather: bool = True,
    details: bool = True,
) -> Evaluation:
    """Scores ``text`` and computes every metric; with a process group, shards the windows across ranks.

    Args:
        model, text, windows, max_length, stride, bos, batch_size, progress: as :func:`score_text`.
        n_bins: calibration bins.
        top_k: the k of each top-k accuracy.
        group: a ``torch.distributed`` process group to shard over (None: the default group if
            torch.distributed is initialised, else no sharding).
        gather: gather the per-token scores on rank 0 (else each rank keeps its shard's).
        details: keep each token's top alternatives in the scores (False: the summary only, faster).

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
        windows=windows,
        max_length=max_length,
        stride=stride,
        bos=bos,
        batch_size=batch_size,
        progress=progress and rank == 0,
        top_k=max(5, max(top_k)) if details else 0,
        shard=(rank, world_size),
    )
    meter = scores.meter(n_bins=n_bins, top_k=top_k, count_text=rank == 0)
    settings = _settings_result(model, scores, world_size)
    counter = TextCounter()
    counter.update(text)
    settings.update(characters=counter.characters, text_bytes=counter.bytes, text_words=counter.words)
    if world_size > 1:
        meter.all_reduce(group)
        on_nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
        counts = torch.tensor([scores.num_windows], dtype=torch.int64, device=device)
        dist.all_reduce(counts, group=group)
        settings["num_windows"] = int(counts[0])
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


def _settings_result(model: CausalLM, scores: TextScores, world_size: int) -> dict:
    return {
        "model": model.name,
        "windows": scores.scheme,
        "bos": scores.bos,
        "prefix_token_id": scores.bos_token_id,
        "first_token": scores.first_token(),  # rank 0 always scores window 0
        "max_length": scores.max_length,
        "stride": scores.stride,
        "num_windows": scores.num_windows,
        "text_tokens": len(scores),
        "world_size": world_size,
        "words_whitespace": scores.scored_words_whitespace,
    }


# --------------------------------------------------------------------------------------------
# The text in pieces, in bounded memory.


class _TextWindow:
    """The recent characters of a text read in pieces, by their index in the whole text."""

    def __init__(self) -> None:
        self.text = ""
        self.base = 0

    def extend(self, text: str) -> None:
        self.text += text

    def get(self, start: int, end: int) -> str:
        """Characters ``[start, end)`` that are still held (clipped to them)."""
        return self.text[max(0, start - self.base) : max(0, end - self.base)]

    def drop_before(self, index: int) -> None:
        if index > self.base:
            self.text = self.text[index - self.base :]
            self.base = index


def evaluate_stream(
    model: CausalLM,
    chunks: Iterable[str],
    *,
    windows: str = "sliding",
    max_length: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    n_bins: int = DEFAULT_BINS,
    top_k: tuple[int, ...] = DEFAULT_TOP_K,
    sink: Callable[[list[dict], Callable[[int, int], str]], None] | None = None,
    size_hint: int | None = None,
    piece_chars: int | None = None,
) -> Evaluation:
    """Scores a text read in pieces, in memory bounded by a piece and a batch; the numbers of :func:`evaluate`.

    Args:
        model, windows, max_length, stride, bos, batch_size, progress, n_bins, top_k: as :func:`evaluate`.
        chunks: the text, in order, in pieces of any size (a file read block by block).
        sink: called with each batch's rows in token order (:func:`token_row`, every token once,
            the unscored first one included) and a function ``text(start, end)`` giving the
            characters around them; None: no per-token output (the alternatives are not computed).
        size_hint: the text's size in bytes, if known: the progress bar's total is estimated from it.
        piece_chars: characters per tokenizer piece (default
            :data:`tokenloss.evaluation.tokenizing.PIECE_CHARS`).

    Returns:
        :class:`Evaluation` with ``scores=None``; ``result`` as :func:`evaluate`'s, plus
        ``tokenized_whole`` (True when the tokenizer had no checked cut point and the text was
        tokenized at once).

    Raises:
        ValueError, TypeError: as :func:`score_text`.
    """
    from tokenloss.evaluation.tokenizing import PieceTokenizer

    _check_int("batch_size", batch_size, 1)
    settings = resolve_settings(model, max_length=max_length, stride=stride, bos=bos, windows=windows)
    planner = settings.planner()
    k = min(5, model.vocab_size) if sink is not None else 0
    meter = LossMeter(n_bins=n_bins, top_k=top_k, vocab_size=model.vocab_size)
    text_counter, scored_counter = TextCounter(), TextCounter()
    tokens, spans, text = _TokenBuffer(), [], _TextWindow()
    display: dict[int, str] = {}
    first: dict = {}
    first_bytes = 0
    emitted = 0  # rows handed to the sink
    tokenizer = PieceTokenizer(model, piece_chars=piece_chars)

    def rows_for(part: ScoredTokens | None, upto: int) -> list[dict]:
        nonlocal emitted
        rows = []
        scored = {}
        if part is not None:
            stats = part.stats
            values = zip(
                part.positions.tolist(),
                stats.log_prob.tolist(),
                stats.rank.tolist(),
                stats.entropy.tolist(),
                part.context.tolist(),
                stats.top_ids.tolist(),
                stats.top_probs.tolist(),
            )
            for position, log_prob, rank, entropy, context, ids, probs in values:
                alternatives = [(t, _display(model, display, t), p) for t, p in zip(ids, probs)]
                scored[position] = (log_prob, rank, entropy, context, alternatives)
        for index in range(emitted, upto):
            token_id = tokens.ids[index - tokens.base]
            span = spans[index - tokens.base]
            rows.append(token_row(index, span, token_id, _display(model, display, token_id), scored.get(index)))
        emitted = upto
        return rows

    bar = None
    try:
        for piece in tokenizer.pieces(chunks):
            if bar is None:  # after the first piece: a text that does not decode fails before any bar is drawn
                bar = _progress_bar(None, progress)
            text_counter.update(piece.text)
            text.extend(piece.text)
            if piece.start == 0:
                if not piece.text:
                    raise ValueError("the text is empty: there is nothing to score")
                if not piece.ids:
                    raise ValueError("the text has no tokens: there is nothing to score")
                if len(piece.ids) < 2 and not settings.first_scored:
                    raise ValueError(
                        "the text is a single token and there is no BOS: nothing can be scored (give a longer text)"
                    )
                first_bytes = first_token_bytes(model, piece.text, piece.ids, piece.offsets)
                first = {"id": piece.ids[0], "text": model.decode_token(piece.ids[0]), "scored": False}
                skip = 0 if settings.first_scored else piece.offsets[1][0]
                scored_counter.update(piece.text[skip:])
            else:
                scored_counter.update(piece.text)
            tokens.extend(piece.ids)
            spans.extend(piece.offsets)
            if size_hint and text_counter.bytes and not piece.final:
                bar.total = max(tokens.end, round(tokens.end * size_hint / text_counter.bytes))
            elif piece.final:
                bar.total = tokens.end
            planned = planner.ready(tokens.end, final=piece.final)
            for part in _score_batches(
                model, planned, tokens, prefix_token_id=settings.prefix_token_id, top_k=k, batch_size=batch_size
            ):
                meter.update_statistics(part.stats)
                if int(part.positions[0]) == 0:
                    log_prob = float(part.stats.log_prob[0])
                    first.update(scored=True, log_prob_nats=log_prob, surprisal_bits=-log_prob / LN2)
                if sink is not None:
                    sink(rows_for(part, int(part.positions[-1]) + 1), text.get)
                bar.update(len(part.positions))
            if sink is not None and piece.final and emitted < tokens.end:
                sink(rows_for(None, tokens.end), text.get)
            keep = min(planner.keep_from(), emitted if sink is not None else planner.keep_from())
            del spans[: max(0, keep - tokens.base)]
            tokens.drop_before(keep)
            if tokens.ids:
                text.drop_before(max(0, spans[0][0] - 64))
    finally:
        if bar is not None:
            bar.close()
    first.setdefault("log_prob_nats", None)
    first.setdefault("surprisal_bits", None)
    first["why"] = _first_token_why(settings.scheme, settings.bos)
    meter.count_text(
        num_bytes=text_counter.bytes - (0 if settings.first_scored else first_bytes), num_words=scored_counter.words
    )
    result = meter.compute()
    result.update(
        {
            "model": model.name,
            "windows": settings.scheme,
            "bos": settings.bos,
            "prefix_token_id": settings.prefix_token_id,
            "first_token": first,
            "max_length": settings.max_length,
            "stride": settings.stride,
            "num_windows": planner.windows_planned,
            "text_tokens": tokens.end,
            "world_size": 1,
            "words_whitespace": scored_counter.words_whitespace,
            "characters": text_counter.characters,
            "text_bytes": text_counter.bytes,
            "text_words": text_counter.words,
            "tokenized_whole": tokenizer.whole,
        }
    )
    return Evaluation(scores=None, meter=meter, result=result)
