"""One interface to the causal language models tokenloss scores: the built-in byte GPT and Hugging Face models.

:class:`CausalLM` is what scoring (:mod:`tokenloss.evaluation.scoring`), ``tokenloss eval`` and the explain
page need from a model: its tokenizer (ids, character offsets, display text of a token) and its
next-token logits. :func:`load_model` returns one:

- ``load_model()``: the byte-level GPT that ships in the package
  (:func:`tokenloss.models.bytegpt.load_builtin`), wrapped in :class:`ByteLM`;
- ``load_model(DIR)`` where ``DIR`` holds a ByteGPT ``config.json``: that ByteGPT;
- ``load_model(DIR)`` otherwise: a Hugging Face transformers causal LM and its tokenizer, loaded
  offline (:class:`tokenloss.models.hf.HFCausalLM`; needs ``pip install 'tokenloss[hf]'``).

Importing this package needs only torch; transformers is imported when a Hugging Face model is loaded.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class CausalLM(ABC):
    """A causal language model with its tokenizer, as scoring sees it.

    Attributes:
        name: a short name to show (a directory name, ``"builtin byte GPT"``).
        vocab_size: V, the width of the logits.
        max_length: the longest input (in tokens, BOS included) the model reads.
        bos_token_id: the tokenizer's beginning-of-sequence token, or None if it defines none.
        eos_token_id: its end-of-sequence token, or None (lm-evaluation-harness's prefix token
            when there is no BOS).
        device: where the model runs.
        dtype: the model's parameter dtype (logits are always returned as float32).
        bytes_per_token: 1 for a byte-level tokenizer (one token is one UTF-8 byte), else None.
    """

    name: str
    vocab_size: int
    max_length: int
    bos_token_id: int | None
    eos_token_id: int | None = None
    device: torch.device
    dtype: torch.dtype
    bytes_per_token: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens (no BOS/EOS added)."""

    @abstractmethod
    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span ``(start, end)`` in ``text`` of each token of :meth:`encode`.

        Tokens that share a character (a byte-level tokenizer splitting a multi-byte character)
        have the same or overlapping spans.
        """

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` and :meth:`token_offsets` together (one tokenizer pass where possible)."""
        return self.encode(text), self.token_offsets(text)

    @abstractmethod
    def decode_token(self, token_id: int) -> str:
        """The display text of one token."""

    def token_bytes(self, token_id: int) -> bytes | None:
        """The UTF-8 bytes one token stands for, where the tokenizer tells them exactly (byte-level
        tokenizers, byte-fallback tokens); None otherwise."""
        return None

    @abstractmethod
    def logits(self, input_ids: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Next-token logits: ``(B, T)`` int64 ids -> ``(B, T, V)`` float32; position ``t`` predicts ``t + 1``.

        ``out``: optional contiguous float32 tensor of at least ``B * T * V`` elements on the model's
        device that the logits may be written into (the result is then a view of it). A caller that
        scores many batches passes the same one each time, so that no batch allocates, and on the CPU
        page-faults in, its own ``(B, T, V)`` tensor. A model may ignore it.
        """

    def describe(self) -> str:
        """One line: name, V, context, dtype, device."""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name} (V={self.vocab_size}, context {self.max_length}, {dtype}, {self.device})"


def _byte_display(value: int) -> str:
    char = chr(value)
    if value < 128 and (char.isprintable() or char in "\n\t"):
        return char
    return f"<0x{value:02X}>"


class ByteLM(CausalLM):
    """:class:`CausalLM` over a byte-level model (token id = UTF-8 byte value, no BOS).

    Args:
        module: any ``nn.Module`` with ``logits(idx (B, T)) -> (B, T, 256)`` and
            ``config.block_size`` (a :class:`tokenloss.models.bytegpt.ByteGPT`).
        name: the name to show.
    """

    bytes_per_token = 1

    def __init__(self, module: nn.Module, *, name: str = "byte GPT") -> None:
        self.module = module.eval()
        self.name = name
        self.vocab_size = int(module.config.vocab_size)
        self.max_length = int(module.config.block_size)
        self.bos_token_id = None
        parameter = next(module.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for index, char in enumerate(text):
            spans.extend([(index, index + 1)] * len(char.encode("utf-8")))
        return spans

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def decode_token(self, token_id: int) -> str:
        if not 0 <= token_id < 256:
            raise ValueError(f"a byte token id must be in [0, 256), got {token_id}")
        return _byte_display(token_id)

    def logits(self, input_ids: Tensor, *, out: Tensor | None = None) -> Tensor:
        return self.module.logits(input_ids.to(self.device)).float()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32`` / ``"float32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` -> a torch dtype.

    Raises:
        ValueError: an unknown or non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or fp32, bf16, fp16), got {dtype!r}")
    return DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """Checks that ``device`` exists on this machine.

    Raises:
        ValueError: an unknown device string, or CUDA asked for where there is none.
    """
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine: use --device cpu")
    return resolved


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> CausalLM:
    """Loads a causal LM and its tokenizer, offline.

    Args:
        path: None for the built-in byte GPT; a directory with a ByteGPT ``config.json``; or a
            Hugging Face model directory (``config.json``, weights, tokenizer files).
        device: where to run it (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: parameter dtype: float32, bfloat16 or float16 (logits come back as float32).

    Returns:
        A :class:`CausalLM` in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist, is not a directory, or has no ``config.json``;
            the built-in model's files are missing from the installation.
        ValueError: an unknown dtype or device; a directory that transformers cannot load.
        ImportError: a Hugging Face directory without transformers installed.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    from tokenloss.models import bytegpt

    if path is None:
        module = bytegpt.load_builtin(device=torch_device)
        return ByteLM(module.to(dtype=torch_dtype), name="builtin byte GPT")
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is not a directory: pass a model directory (config.json, weights, tokenizer)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {str(path)!r}: expected a Hugging Face model directory or a ByteGPT directory"
        )
    if bytegpt.is_bytegpt_dir(directory):
        module = bytegpt.ByteGPT.from_pretrained(directory, device=torch_device)
        return ByteLM(module.to(dtype=torch_dtype), name=directory.name or str(directory))
    from tokenloss.models.hf import load_hf_model

    return load_hf_model(directory, device=torch_device, dtype=torch_dtype)


@functools.lru_cache(maxsize=1 << 16)
def display_token(text: str) -> str:
    """A token's text made visible in one line: newlines, tabs and other controls escaped."""
    out = []
    for char in text:
        if char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs"):
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def log_vocab(model: CausalLM) -> float:
    """``log V``: the loss in nats of a model that guesses uniformly (an untrained one)."""
    return math.log(model.vocab_size)


__all__ = [
    "ByteLM",
    "CausalLM",
    "DTYPES",
    "display_token",
    "load_model",
    "log_vocab",
    "resolve_device",
    "resolve_dtype",
]
