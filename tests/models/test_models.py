"""Tests of tokenloss.models: the CausalLM adapter of byte-level models, load_model and its errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tokenloss.models import ByteLM, display_token, load_model, resolve_device, resolve_dtype
from tokenloss.models.bytegpt import ByteGPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_module(seed: int = 0) -> ByteGPT:
    torch.manual_seed(seed)
    module = ByteGPT(GPTConfig(block_size=24, n_layer=1, n_head=2, n_embd=16))
    torch.nn.init.normal_(module.lm_head.weight, std=0.5)
    return module


def test_byte_adapter_tokens_offsets_and_display():
    """Token ids are the UTF-8 bytes; every byte of a character gets that character's span."""
    lm = ByteLM(tiny_module())
    text = "a€\n"
    assert lm.encode(text) == [97, 0xE2, 0x82, 0xAC, 10]
    assert lm.token_offsets(text) == [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    assert [lm.decode_token(i) for i in lm.encode(text)] == ["a", "<0xE2>", "<0x82>", "<0xAC>", "\n"]
    assert (lm.vocab_size, lm.max_length, lm.bos_token_id, lm.bytes_per_token) == (256, 24, None, 1)
    with pytest.raises(ValueError, match="byte token id"):
        lm.decode_token(256)


def test_byte_adapter_logits_are_the_module_logits():
    """logits() is the module's float32 next-byte logits."""
    module = tiny_module()
    lm = ByteLM(module)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = lm.logits(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 256)
    assert_close(out, module.logits(ids))


def test_load_model_reads_a_bytegpt_directory(tmp_path):
    """A directory with a ByteGPT config loads as a byte model with the saved weights."""
    module = tiny_module(seed=3)
    module.save_pretrained(tmp_path / "bg")
    lm = load_model(tmp_path / "bg")
    assert isinstance(lm, ByteLM) and lm.name == "bg" and lm.max_length == 24
    ids = torch.tensor([[7, 8, 9]])
    assert_close(lm.logits(ids), module.logits(ids))
    half = load_model(tmp_path / "bg", dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.logits(ids).dtype == torch.float32


def test_load_model_default_is_the_builtin_byte_gpt():
    """No path: the byte GPT that ships in the package (tokenloss.models.bytegpt.load_builtin)."""
    from tokenloss.models import bytegpt

    lm = load_model()
    assert isinstance(lm, ByteLM) and lm.name == "builtin byte GPT"
    assert lm.vocab_size == 256 and lm.bos_token_id is None
    reference = bytegpt.load_builtin()
    ids = torch.tensor([list(b"Hello")])
    assert_close(lm.logits(ids), reference.logits(ids))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "not a directory"),
        (lambda tmp: tmp, "no config.json"),
    ],
)
def test_load_model_missing_paths(tmp_path, make, match):
    """A missing path, a file, or a directory without config.json: FileNotFoundError saying which."""
    with pytest.raises(FileNotFoundError, match=match):
        load_model(make(tmp_path))


@pytest.mark.parametrize(
    "name, expected",
    [("float32", torch.float32), ("bf16", torch.bfloat16), ("FP16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_resolve_dtype(name, expected):
    """dtype names and aliases map to torch dtypes."""
    assert resolve_dtype(name) is expected


@pytest.mark.parametrize("bad", ["int8", "float64x", torch.int64])
def test_resolve_dtype_rejects(bad):
    """Unknown or non-float dtypes are a ValueError listing the choices."""
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype(bad)


def test_resolve_device():
    """CPU resolves; a bad name or CUDA without CUDA is a ValueError that says what to use."""
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("raw, shown", [("a\nb", "a\\nb"), ("\t", "\\t"), ("\x00", "\\u0000"), ("é 🙂", "é 🙂")])
def test_display_token(raw, shown):
    """Control characters are escaped so a token shows on one line; printable text is kept."""
    assert display_token(raw) == shown
