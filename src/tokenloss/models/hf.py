"""A Hugging Face transformers causal LM and its tokenizer, loaded offline, behind :class:`CausalLM`.

Needs ``pip install 'tokenloss[hf]'``. Nothing is downloaded: the model directory must hold
``config.json``, the weights and the tokenizer files (what ``save_pretrained`` writes for both).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from tokenloss.models import CausalLM

# Largest plausible context; tokenizers without a limit report about 1e30 as model_max_length.
_UNBOUNDED = 1_000_000


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class HFCausalLM(CausalLM):
    """:class:`CausalLM` over a transformers ``AutoModelForCausalLM`` and its ``AutoTokenizer``.

    Args:
        model: a transformers causal LM (its forward takes ``input_ids`` and returns ``.logits``).
        tokenizer: its tokenizer; a fast one gives exact character offsets, a slow one offsets
            reconstructed from the decoded tokens.
        name: the name to show.
    """

    def __init__(self, model, tokenizer, *, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        output = model.get_output_embeddings()
        self.vocab_size = int(output.out_features if output is not None else model.config.vocab_size)
        self.max_length = _context_length(model.config, tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self._byte_level = _is_byte_level(tokenizer)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self._display: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.encode_with_offsets(text)[1]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if getattr(self.tokenizer, "is_fast", False):
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoding["input_ids"]), [(int(a), int(b)) for a, b in encoding["offset_mapping"]]
        ids = self.encode(text)
        return ids, _offsets_from_pieces(text, [self.tokenizer.decode([i]) for i in ids])

    def decode_token(self, token_id: int) -> str:
        if token_id not in self._display:
            text = self.tokenizer.decode([token_id])
            if "\ufffd" in text:  # part of a multi-byte character: show the raw token instead
                text = str(self.tokenizer.convert_ids_to_tokens(token_id))
            self._display[token_id] = text
        return self._display[token_id]

    def token_bytes(self, token_id: int) -> bytes | None:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return None
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if self._byte_level and all(char in _UNICODE_TO_BYTE for char in piece):
            return bytes(_UNICODE_TO_BYTE[char] for char in piece)
        return None

    def logits(self, input_ids: Tensor, *, out: Tensor | None = None) -> Tensor:
        head = self._head() if out is not None else None
        if head is None:
            output = self.model(input_ids=input_ids.to(self.device), use_cache=False)
            return output.logits.float()  # (B, T, V)
        with torch.inference_mode():  # scoring only: `out=` products do not track gradients
            return self._logits_into(input_ids, out, *head)

    def _logits_into(self, input_ids: Tensor, out: Tensor, base, weight: Tensor, bias: Tensor | None) -> Tensor:
        hidden = base(input_ids=input_ids.to(self.device), use_cache=False).last_hidden_state  # (B, T, D)
        hidden = hidden.to(weight.device).reshape(-1, weight.shape[1])  # (B * T, D)
        logits = out.reshape(-1)[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
        if weight.dtype == torch.float32:  # the product written straight into `out`: no (B * T, V) allocation
            if bias is None:
                torch.mm(hidden, weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden, weight.t(), out=logits)
        else:  # bf16/fp16 products, as the model's own head computes them, then float32
            logits.copy_(torch.nn.functional.linear(hidden, weight, bias))
        return logits.view(*input_ids.shape, weight.shape[0])

    def _head(self) -> tuple[torch.nn.Module, Tensor, Tensor | None] | None:
        """``(base model, head weight, head bias)`` when the model's logits are exactly its head applied to
        its base model's last hidden state (checked once, on a short input), else None.

        Models that transform the logits after the head (Gemma 2's soft-capping, a logit scale) or whose
        head is not a plain linear layer fail the check and keep the full forward.
        """
        if not hasattr(self, "_head_cache"):
            self._head_cache = _plain_head(self.model, self.vocab_size, self.max_length)
        return self._head_cache


def _plain_head(model, vocab_size: int, max_length: int) -> tuple[torch.nn.Module, Tensor, Tensor | None] | None:
    """See :meth:`HFCausalLM._head`."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model or head.weight.shape[0] != vocab_size:
        return None
    if head.weight.is_meta or not torch.is_floating_point(head.weight):
        return None
    length = min(8, max_length)
    probe = torch.arange(length, dtype=torch.int64).remainder(vocab_size).unsqueeze(0)  # (1, length)
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            expected = model(input_ids=probe.to(device), use_cache=False).logits.float()
            hidden = base(input_ids=probe.to(device), use_cache=False).last_hidden_state
            got = torch.nn.functional.linear(hidden.to(head.weight.device), head.weight, head.bias).float()
    except Exception:  # a base model that does not take these arguments: keep the full forward
        return None
    if got.shape != expected.shape or not torch.allclose(got.to(expected.device), expected, rtol=1e-4, atol=1e-4):
        return None
    return base, head.weight, head.bias


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for value in range(256):
        if value in printable:
            mapping[value] = chr(value)
        else:
            mapping[value] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {char: value for value, char in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer writes tokens in GPT-2's byte alphabet (a ByteLevel decoder, or a slow GPT-2 one)."""
    if hasattr(tokenizer, "byte_decoder"):
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _context_length(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNBOUNDED:
        return value
    raise ValueError("cannot tell the model's context length from its config or tokenizer: pass --max-length")


def _offsets_from_pieces(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of decoded tokens found in order in ``text`` (for slow tokenizers)."""
    spans = []
    position = 0
    for piece in pieces:
        stripped = piece.strip()
        found = text.find(stripped, position) if stripped else -1
        if found < 0:
            spans.append((position, position))
            continue
        spans.append((found, found + len(stripped)))
        position = found + len(stripped)
    return spans


def load_hf_model(directory: str | Path, *, device: torch.device, dtype: torch.dtype) -> HFCausalLM:
    """Loads ``AutoModelForCausalLM`` and ``AutoTokenizer`` from ``directory`` with ``local_files_only=True``.

    Raises:
        ImportError: transformers is not installed.
        ValueError: transformers cannot load the directory (the message says why, in one line).
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("a Hugging Face model needs transformers: pip install 'tokenloss[hf]'") from None

    directory = Path(directory)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot load a tokenizer from {str(directory)!r}: {_first_line(error)}") from None
        try:
            # transformers < 4.56 calls the argument torch_dtype (and passes an unknown `dtype` to the model).
            dtype_argument = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, **{dtype_argument: dtype}
            )
        except Exception as error:  # also safetensors' SafetensorError for a corrupt or truncated weights file
            raise ValueError(f"cannot load a causal LM from {str(directory)!r}: {_first_line(error)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device)
    return HFCausalLM(model, tokenizer, name=directory.resolve().name)


def _version(text: str) -> tuple[int, int]:
    """``"4.51.3"`` -> ``(4, 51)``; ``"5.0.0.dev0"`` -> ``(5, 0)``."""
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
