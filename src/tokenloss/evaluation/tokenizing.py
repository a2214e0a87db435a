"""A long text tokenized in pieces, with the same tokens as tokenizing it whole, in bounded memory.

A tokenizer's output for ``a + b`` is ``tokens(a) + tokens(b)`` only at some cut points (between
two pre-tokens of a byte-level BPE, after a newline, before a space, ...), and at none for a
tokenizer that adds something at the start of every text it encodes. :func:`tokenize_pieces`
cuts the text only where it has checked that it may:

- a byte-level model (:attr:`~tokenloss.models.CausalLM.bytes_per_token` of 1) may be cut at any
  character;
- otherwise a cut ``c`` is tried next to a newline (else a space) near the piece size, and taken
  only when tokenizing the piece together with the next ``margin`` characters gives the piece's
  own tokens, a token boundary at ``c``, and then the same tokens as the text from ``c`` on,
  for the tokens that end at least ``margin / 2`` characters before the extension stops. A
  tokenizer's choices depend on a few characters around a cut (its pre-tokenizer's pattern), so
  agreement over hundreds of characters on both sides is agreement with the whole text.
- when no cut point passes, the piece grows; a tokenizer that never passes ends up tokenizing
  the whole text at once, as before, and :attr:`PieceTokenizer.whole` says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenloss.models import CausalLM

PIECE_CHARS = 1 << 18  # characters per piece (about 256 KiB of text)
MARGIN_CHARS = 512  # characters past a cut that must tokenize the same on both sides of it


@dataclass
class TokenPiece:
    """The tokens of one piece of the text.

    Attributes:
        text: the piece's characters.
        start: the piece's first character's index in the whole text.
        ids: its tokens.
        offsets: each token's character span ``(start, end)`` in the whole text.
        final: the last piece.
    """

    text: str
    start: int
    ids: list[int]
    offsets: list[tuple[int, int]]
    final: bool


class PieceTokenizer:
    """Tokenizes text arriving in chunks into :class:`TokenPiece` s cut at checked points.

    Args:
        model: the :class:`~tokenloss.models.CausalLM` whose tokenizer to use.
        piece_chars: the size of a piece before a cut is looked for (default :data:`PIECE_CHARS`).
        margin: characters past a cut that must tokenize the same (see the module doc).
    """

    def __init__(self, model: CausalLM, *, piece_chars: int | None = None, margin: int = MARGIN_CHARS) -> None:
        self.model = model
        self.piece_chars = PIECE_CHARS if piece_chars is None else piece_chars
        self.margin = margin
        self.whole = False  # True once a piece had to grow past 8 piece sizes without a cut point
        self._any_cut = model.bytes_per_token == 1

    def pieces(self, chunks: Iterable[str]) -> Iterator[TokenPiece]:
        """The pieces of the text made of ``chunks`` (the text in order), the last one marked final."""
        pending, start = "", 0
        for chunk in chunks:
            pending += chunk
            while len(pending) >= self.piece_chars + self.margin:
                cut = self._find_cut(pending)
                if cut is None:
                    if len(pending) > 8 * self.piece_chars:
                        self.whole = True
                    break
                yield self._piece(pending[:cut], start, final=False)
                pending, start = pending[cut:], start + cut
            if self.whole:
                self.piece_chars = 1 << 62  # stop looking: tokenize the rest at the end
        yield self._piece(pending, start, final=True)

    def _piece(self, text: str, start: int, *, final: bool) -> TokenPiece:
        ids, offsets = self.model.encode_with_offsets(text) if text else ([], [])
        return TokenPiece(
            text=text, start=start, ids=ids, offsets=[(a + start, b + start) for a, b in offsets], final=final
        )

    def _find_cut(self, text: str) -> int | None:
        """A checked cut point in ``text[: piece_chars]``'s second half, or None."""
        target = self.piece_chars
        if self._any_cut:
            return target
        low = target // 2
        for separator in ("\n", " "):
            position = text.rfind(separator, low, target)
            tried = 0
            while position >= low and tried < 8:
                # after a newline (its own pre-token) or before a space (GPT-2 attaches it to the next word)
                for cut in (position + 1, position):
                    if cut > 0 and self._cut_is_exact(text, cut):
                        return cut
                position = text.rfind(separator, low, position)
                tried += 1
        return None

    def _cut_is_exact(self, text: str, cut: int) -> bool:
        encode = self.model.encode_with_offsets
        left_start = max(0, cut - self.margin)
        left, _ = encode(text[left_start:cut])
        right, right_offsets = encode(text[cut : cut + self.margin])
        joined, joined_offsets = encode(text[left_start : cut + self.margin])
        if joined[: len(left)] != left:
            return False
        if len(joined) <= len(left) or joined_offsets[len(left)][0] != cut - left_start:
            return False
        stable = [i for i, (_, end) in enumerate(right_offsets) if end <= self.margin // 2]
        if not stable:
            return False
        count = stable[-1] + 1
        return joined[len(left) : len(left) + count] == right[:count]


class UndecodableText(ValueError):
    """Bytes that do not decode in the given encoding.

    Attributes:
        encoding: the encoding.
        offset: the bad byte's offset in the whole input.
        byte: its value.
    """

    def __init__(self, encoding: str, offset: int, byte: int) -> None:
        super().__init__(f"byte 0x{byte:02x} at offset {offset} is not valid {encoding}")
        self.encoding, self.offset, self.byte = encoding, offset, byte


def decode_chunks(chunks: Iterable[bytes], encoding: str) -> Iterator[str]:
    """Decodes byte chunks incrementally into text chunks; a byte-order mark at the start is dropped.

    Raises:
        LookupError: an unknown encoding.
        UndecodableText: bytes that do not decode (with their offset in the whole input).
    """
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    consumed, first = 0, True
    for chunk in chunks:
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as error:
            buffered = len(error.object) - len(chunk)  # bytes the decoder held back from earlier chunks
            raise UndecodableText(encoding, consumed - buffered + error.start, error.object[error.start]) from None
        except UnicodeError:  # e.g. UTF-16 without a byte-order mark
            raise UndecodableText(encoding, consumed, chunk[0]) from None
        consumed += len(chunk)
        if first and text:
            text, first = text.removeprefix("\ufeff"), False
        if text:
            yield text
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise UndecodableText(encoding, consumed - len(error.object) + error.start, error.object[error.start]) from None
    if tail:
        yield tail
