"""Tests of the byte-level GPT: shapes, causality, the uniform start, the safetensors format, the shipped model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from tokenloss.models.bytegpt import (
    MODEL_TYPE,
    ByteGPT,
    GPTConfig,
    builtin_path,
    decode,
    encode,
    is_bytegpt_dir,
    load_builtin,
)

TINY = GPTConfig(block_size=11, n_layer=2, n_head=3, n_embd=12)


def _model(config: GPTConfig = TINY, seed: int = 0) -> ByteGPT:
    torch.manual_seed(seed)
    model = ByteGPT(config)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a non-zero head, as after training
    return model.eval()


def test_forward_returns_hidden_states_and_logits_project_them():
    """forward gives (B, T, n_embd); logits are lm_head of it in float32, (B, T, 256)."""
    model = _model()
    idx = torch.randint(0, 256, (3, 7))
    hidden = model(idx)
    assert hidden.shape == (3, 7, TINY.n_embd)
    logits = model.logits(idx)
    assert logits.shape == (3, 7, 256) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T, rtol=1e-6, atol=1e-6)


def test_position_only_sees_the_past():
    """Changing token t changes no output before t (causal attention)."""
    model = _model()
    idx = torch.randint(0, 256, (2, 9))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    before, after = model.logits(idx), model.logits(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_untrained_model_predicts_uniformly():
    """lm_head starts at zero: every logit is 0 and the loss of any target is exactly log 256."""
    torch.manual_seed(0)
    model = ByteGPT(TINY)
    idx = torch.randint(0, 256, (3, 11))
    logits = model.logits(idx)
    assert torch.count_nonzero(logits) == 0
    loss = F.cross_entropy(logits.reshape(-1, 256), torch.randint(0, 256, (33,)))
    torch.testing.assert_close(loss, torch.tensor(math.log(256)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("idx", "error", "match"),
    [
        (torch.zeros(2, 12, dtype=torch.long), ValueError, "block_size 11"),
        (torch.zeros(5, dtype=torch.long), ValueError, r"\(B, T\)"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"\(B, T\)"),
        (torch.zeros(2, 3), TypeError, "integer tensor"),
    ],
)
def test_forward_rejects_bad_input(idx, error, match):
    """Too long, wrongly shaped and float inputs are refused with the reason."""
    with pytest.raises(error, match=match):
        _model()(idx)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_embd", 10, "divisible"),
        ("n_layer", 0, "positive"),
        ("block_size", 1.5, "positive"),
        ("dropout", 1.0, "dropout"),
    ],
)
def test_config_rejects_bad_sizes(field, value, match):
    """GPTConfig names the field that is wrong."""
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{"n_embd": 12, "n_head": 3, field: value})


def test_save_and_load_round_trip(tmp_path):
    """save_pretrained + from_pretrained give the same config and the same logits."""
    model = _model()
    model.save_pretrained(tmp_path / "m")
    assert is_bytegpt_dir(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["n_head"] == 3
    loaded = ByteGPT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    idx = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(loaded.logits(idx), model.logits(idx), rtol=0, atol=0)


def test_from_pretrained_errors(tmp_path):
    """A missing directory or file, a foreign config and mismatched weights give clear errors."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        ByteGPT.from_pretrained(tmp_path / "nowhere")
    _model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert not is_bytegpt_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="not a ByteGPT config"):
        ByteGPT.from_pretrained(tmp_path / "m")
    other = GPTConfig(block_size=11, n_layer=1, n_head=3, n_embd=12)
    (tmp_path / "m" / "config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="do not fit its config"):
        ByteGPT.from_pretrained(tmp_path / "m")


def test_byte_tokenizer_round_trip():
    """Token ids are the UTF-8 bytes; decoding gives the text back."""
    text = "naïve → 1"
    ids = encode(text)
    assert ids == list(text.encode("utf-8")) and len(ids) == 12
    assert decode(ids) == text and decode(torch.tensor(ids)) == text


def test_builtin_model_has_learned_english():
    """The shipped model loads in eval mode and predicts English far better than a uniform guess."""
    model = load_builtin()
    assert not model.training and model.config.vocab_size == 256
    text = "Return the number of items in the list. If the key is not found, raise a KeyError."
    ids = torch.tensor([encode(text)[: model.config.block_size]])
    loss = F.cross_entropy(model.logits(ids[:, :-1])[0], ids[0, 1:])
    assert loss < 0.6 * math.log(256)


def test_builtin_training_record_matches_the_weights():
    """assets/bytegpt/training.json describes the shipped config and a loss that starts at log 256."""
    record = json.loads((builtin_path() / "training.json").read_text())
    config = json.loads((builtin_path() / "config.json").read_text())
    assert record["model"] == config
    assert abs(record["first_loss"] - math.log(256)) < 0.1
    assert record["final_val_loss"] < math.log(256) - 2.0
    assert record["params"] == load_builtin().num_parameters()
