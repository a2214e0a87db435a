"""How a text longer than the model's context is cut into windows: three named schemes, each token scored once.

A text of ``N`` tokens is read in windows of at most ``L`` inputs (``max_length``). A window feeds
the model an optional *prefix token* followed by text tokens ``[begin, end)``, and scores text
tokens ``[score_from, score_to)``: token ``i`` is predicted by the logits at the input position of
token ``i - 1`` (or of the prefix token, for ``i == begin``). Every scheme scores each token at
most once; they differ in how much context each token gets and in what the prefix token is.

``sliding`` (the default): the prefix is BOS (when ``bos``), in every window, so a window holds
``C = L - 1`` text tokens with it and ``C = L`` without. The first window covers ``[0, min(C, N))``;
each later one moves its end ``S`` tokens on (``stride``) and scores only those ``S`` new tokens,
with ``C - S`` to ``C - 1`` tokens of context. Every window has the same length, and the last one
is flush with the end of the text (so the last tokens get full context: the Hugging Face guide's
last window is shorter instead)::

    tokens      0 1 2 3 4 5 6 7 8 9          L = 6, S = 2, no BOS
    window 1   [0 1 2 3 4 5]                 scores 1..5
    window 2       [2 3 4 5 6 7]             scores 6, 7 (context 4 and 5 tokens)
    window 3           [4 5 6 7 8 9]         scores 8, 9

``hf-guide``: the windows of the Hugging Face guide "Perplexity of fixed-length models", counted
exactly. The sequence is the text's tokens, after one BOS when ``bos`` (as a BOS-adding tokenizer
encodes it); windows start at ``0, S, 2S, ...`` of that sequence, end ``L`` later or at its end,
and score the tokens after the previous window's end; the loop stops at the window that reaches
the end (so the last window is shorter)::

    tokens      0 1 2 3 4 5 6 7 8            L = 6, S = 2, no BOS, N = 9
    sliding    [0 1 2 3 4 5]                 scores 1..5
                   [2 3 4 5 6 7]             scores 6, 7
                     [3 4 5 6 7 8]           scores 8 (context 5 tokens)
    hf-guide   [0 1 2 3 4 5]                 scores 1..5
                   [2 3 4 5 6 7]             scores 6, 7
                       [4 5 6 7 8]           scores 8 (context 4 tokens)

``lm-eval``: exactly lm-evaluation-harness's ``loglikelihood_rolling`` (``get_rolling_token_windows``
with ``context_len=1``, then ``make_disjoint_window``). The prefix token is BOS, or EOS for a
tokenizer without BOS (the harness's ``prefix_token_id``), and opens the first window only; the
windows are disjoint, each predicts up to ``L`` tokens, and a later window's input is the ``L``
tokens before its last one (one token of context for a full window). Every token is scored. The
text is encoded without special tokens, as the harness does with ``add_bos_token=False``; its
default for a tokenizer that adds BOS itself scores ``log p(<s> | <s>)`` as part of the text,
which is not followed here::

    tokens      0 1 2 3 4 5 6 7 8 9          L = 4, prefix P
    window 1   [P 0 1 2]                     scores 0..3
    window 2          [3 4 5 6]              scores 4..7 (token 4's context: token 3 only)
    window 3              [5 6 7 8]          scores 8, 9 (the last window reads L tokens back)

:class:`WindowPlanner` yields the windows as tokens arrive (for a text read in pieces);
:func:`plan_windows` plans all of them for a known ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("sliding", "lm-eval", "hf-guide")


@dataclass(frozen=True)
class Window:
    """One model input and the tokens it scores (text-token indices).

    Attributes:
        begin, end: the text tokens ``[begin, end)`` of the input, after the prefix token if any.
        score_from, score_to: the text tokens ``[score_from, score_to)`` scored; ``score_to`` is at
            most ``end + 1`` (the logits of the last input predict the token after it).
        prefix: whether the prefix token (BOS, or lm-eval's prefix) opens the input.
    """

    begin: int
    end: int
    score_from: int
    score_to: int
    prefix: bool = False

    @property
    def length(self) -> int:
        """Inputs of the window, the prefix token included."""
        return self.end - self.begin + int(self.prefix)

    @property
    def num_scored(self) -> int:
        return self.score_to - self.score_from


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def check_scheme(scheme: str) -> str:
    """Checks a window scheme's name.

    Raises:
        ValueError: not one of :data:`SCHEMES`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"windows must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    return scheme


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


class WindowPlanner:
    """Plans the windows of one scheme while the text's tokens arrive.

    Args:
        scheme: one of :data:`SCHEMES`.
        max_length: ``L``, inputs per window, the prefix token included.
        stride: ``S`` (``sliding`` and ``hf-guide``; ignored by ``lm-eval``).
        bos: ``sliding``: BOS opens every window; ``hf-guide``: BOS opens the sequence;
            ``lm-eval``: must be True (the harness always puts its prefix token first).

    Raises:
        TypeError, ValueError: as :func:`check_window` and :func:`check_scheme`; ``bos=False``
            with ``lm-eval``.
    """

    def __init__(self, scheme: str, *, max_length: int, stride: int, bos: bool) -> None:
        check_window(max_length, stride)
        self.scheme = check_scheme(scheme)
        if scheme == "lm-eval" and not bos:
            raise ValueError(
                "the lm-eval windows always open with a prefix token (BOS, or EOS without BOS): "
                "bos=False does not apply; use windows='sliding' or 'hf-guide' to leave the first token unscored"
            )
        self.max_length, self.stride, self.bos = max_length, stride, bool(bos)
        self.scored_to = 0  # text tokens [0, scored_to) are planned
        self.windows_planned = 0
        self.done = False
        self._hf_begin = 0  # hf-guide: the next window's begin in the sequence (BOS included)

    def keep_from(self) -> int:
        """The first text token a window not yet planned may read (earlier ones can be dropped)."""
        return max(0, self.scored_to - self.max_length - 1)

    def ready(self, available: int, *, final: bool) -> list[Window]:
        """The windows not yet planned that ``available`` tokens determine.

        Args:
            available: text tokens known so far.
            final: the text ends there (then every remaining window is planned).
        """
        windows: list[Window] = []
        while not self.done:
            window = getattr(self, "_next_" + self.scheme.replace("-", "_"))(available, final)
            if window is None:
                break
            windows.append(window)
            self.scored_to = window.score_to
            self.windows_planned += 1
        return windows

    def _finish(self, available: int, final: bool) -> bool:
        if final and self.scored_to >= available:
            self.done = True
        return self.done

    def _next_sliding(self, n: int, final: bool) -> Window | None:
        capacity = self.max_length - 1 if self.bos else self.max_length
        if self.windows_planned == 0:
            first = 0 if self.bos else 1
            if capacity <= n or (final and n > first):
                end = min(capacity, n)
                return Window(begin=0, end=end, score_from=first, score_to=end, prefix=self.bos)
            if final:
                self.done = True
            return None
        if self._finish(n, final):
            return None
        end = self.scored_to + self.stride
        if end > n:
            if not final:
                return None
            end = n
        return Window(begin=end - capacity, end=end, score_from=self.scored_to, score_to=end, prefix=self.bos)

    def _next_hf_guide(self, n: int, final: bool) -> Window | None:
        offset = int(self.bos)  # sequence index = text index + offset
        sequence = n + offset
        begin = self._hf_begin
        if self.windows_planned and self._finish(n, final):
            return None
        end = begin + self.max_length
        if end > sequence:
            if not final:
                return None
            end = sequence
        score_from = max(self.scored_to + offset, begin + 1)
        if end <= score_from:  # nothing to score (a one-token text without BOS)
            self.done = True
            return None
        self._hf_begin = begin + self.stride
        if end == sequence and final:
            self.done = True
        prefix = self.bos and begin == 0
        text_begin = 0 if prefix else begin - offset
        return Window(
            begin=text_begin, end=end - offset, score_from=score_from - offset, score_to=end - offset, prefix=prefix
        )

    def _next_lm_eval(self, n: int, final: bool) -> Window | None:
        length = self.max_length
        if self.windows_planned == 0:
            if length <= n or (final and n > 0):
                first = min(length, n)
                return Window(begin=0, end=first - 1, score_from=0, score_to=first, prefix=True)
            if final:
                self.done = True
            return None
        if self._finish(n, final):
            return None
        predicted = self.scored_to
        if predicted + length > n and not final:
            return None
        count = min(n - predicted, length)
        window_end = predicted + count
        return Window(begin=window_end - length - 1, end=window_end - 1, score_from=predicted, score_to=window_end)


def plan_windows(num_tokens: int, *, max_length: int, stride: int, bos: bool, scheme: str = "sliding") -> list[Window]:
    """All windows of a ``num_tokens``-token text under ``scheme`` (see the module doc).

    Returns:
        The windows in order; empty when there is nothing to score (no tokens, or a single
        token without BOS).

    Raises:
        TypeError, ValueError: as :class:`WindowPlanner`; a negative ``num_tokens``.
    """
    _check_int("num_tokens", num_tokens, 0)
    return WindowPlanner(scheme, max_length=max_length, stride=stride, bos=bos).ready(num_tokens, final=True)
