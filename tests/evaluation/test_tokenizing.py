"""Tests of tokenloss.evaluation.tokenizing: pieces give the tokens of the whole text; decoding in blocks is exact."""

from __future__ import annotations

import random

import pytest

from tokenloss.evaluation.tokenizing import PieceTokenizer, UndecodableText, decode_chunks
from tokenloss.models import ByteLM, load_model

ZEN = __import__("codecs").decode(__import__("this").s, "rot13")
MIXED = "Naïve café — 🙂 ok.\n漢字かな交じり文\tand tabs,  double  spaces\r\nand CRLF. " * 4


def chunked(text: str, sizes: list[int]) -> list[str]:
    chunks, position = [], 0
    for size in sizes:
        chunks.append(text[position : position + size])
        position += size
    chunks.append(text[position:])
    return chunks


def joined(pieces):
    ids, offsets = [], []
    for piece in pieces:
        ids += piece.ids
        offsets += piece.offsets
    return ids, offsets


@pytest.mark.parametrize("arch", ["byte", "gpt2", "llama"])
@pytest.mark.parametrize("text", [ZEN * 4, MIXED], ids=["zen", "mixed"])
@pytest.mark.parametrize("piece_chars", [64, 200])
def test_pieces_give_the_tokens_of_the_whole_text(tiny_hf_dir, arch, text, piece_chars):
    lm = load_model(None if arch == "byte" else tiny_hf_dir(arch))
    rng = random.Random(piece_chars)
    tokenizer = PieceTokenizer(lm, piece_chars=piece_chars, margin=48)
    pieces = list(tokenizer.pieces(chunked(text, [rng.randint(1, 150) for _ in range(40)])))
    assert joined(pieces) == lm.encode_with_offsets(text)
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == text
    assert len(pieces) >= 2 + (piece_chars == 64) and not tokenizer.whole  # the text really was cut


class DummyPrefixLM(ByteLM):
    """A byte model whose tokenizer opens every text with token 0 (as SentencePiece's dummy prefix adds a
    space): no cut point gives the tokens of the whole text."""

    bytes_per_token = None

    def encode_with_offsets(self, text):
        ids, offsets = super().encode_with_offsets(text)
        return [0, *ids], [(0, 0), *offsets]


def test_a_tokenizer_without_exact_cuts_is_tokenized_whole():
    lm = DummyPrefixLM(load_model().module)
    tokenizer = PieceTokenizer(lm, piece_chars=64, margin=48)
    pieces = list(tokenizer.pieces(chunked(ZEN, [100] * 20)))
    assert tokenizer.whole and joined(pieces) == lm.encode_with_offsets(ZEN)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_decoding_in_blocks_is_decoding_the_whole(size):
    data = ("\ufeff" + MIXED).encode("utf-8")
    blocks = [data[i : i + size] for i in range(0, len(data), size)]
    assert "".join(decode_chunks(blocks, "utf-8")) == MIXED  # the byte-order mark dropped
    assert "".join(decode_chunks([data], "latin-1")) != MIXED  # the encoding is used


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
@pytest.mark.parametrize(("damage", "offset"), [("bad", 7), ("truncated", None)])
def test_undecodable_bytes_are_located(size, damage, offset):
    data = MIXED.encode("utf-8")
    if damage == "bad":
        data = data[:offset] + b"\xff" + data[offset:]
    else:
        data = data[:-1] + "🙂".encode()[:3]  # the last character cut short
        offset = len(data) - 3
    blocks = [data[i : i + size] for i in range(0, len(data), size)]
    with pytest.raises(UndecodableText) as caught:
        list(decode_chunks(blocks, "utf-8"))
    assert caught.value.offset == offset and caught.value.byte == data[offset]
