"""Tests of tokenloss.models.hf: tiny random GPT-2 and Llama models built offline, scored and evaluated by the CLI."""

from __future__ import annotations

import codecs
import json
import math
import this

import pytest
import torch
from torch.testing import assert_close

from tokenloss.cli import main
from tokenloss.evaluation.scoring import evaluate, score_text
from tokenloss.models import load_model
from tokenloss.models.hf import _offsets_from_pieces

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ZEN = codecs.decode(this.s, "rot13")
SAMPLE = "Beautiful is better than ugly. Naïve code — 🙂 is fine, too."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tiny_hf_dir):
    """A saved tiny random causal LM with its tokenizer: what `save_pretrained` writes, no download."""
    return tiny_hf_dir(request.param)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(ZEN, encoding="utf-8")
    return path


def full_pass_log_probs(hf_model, ids, bos_id):
    """log p of each token after BOS, from one transformers forward pass, float64 log-softmax."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([[bos_id] + ids])).logits.double()[0]  # (T, V)
    log_p = torch.log_softmax(logits, -1)
    return torch.stack([log_p[i, token] for i, token in enumerate(ids)])


def test_adapter_reads_model_and_tokenizer(model_dir):
    """vocab size, context, BOS, token ids and character offsets come from the saved model and tokenizer."""
    lm = load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert lm.vocab_size == len(tokenizer) and lm.max_length == 64
    assert lm.bos_token_id == tokenizer.bos_token_id is not None
    ids, offsets = lm.encode_with_offsets(SAMPLE)
    assert ids == lm.encode(SAMPLE) == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert offsets == lm.token_offsets(SAMPLE) and len(offsets) == len(ids)
    assert all(0 <= a <= b <= len(SAMPLE) for a, b in offsets)
    assert tokenizer.decode(ids).replace(" ", "") == SAMPLE.replace(" ", "")
    assert str(lm.dtype) == "torch.float32" and "V=" in lm.describe()
    assert all("\ufffd" not in lm.decode_token(i) for i in ids)  # split characters show the raw token
    out = lm.logits(torch.tensor([ids[:5]]))
    assert out.shape == (1, 5, lm.vocab_size) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_logits_into_a_buffer_equal_the_model_logits(model_dir, dtype, tol):
    """With ``out=``, the head is applied to the base model's hidden state, written into the buffer: the
    same logits as the model's forward (bf16: bit for bit, the same bf16 product cast to float32)."""
    lm = load_model(model_dir, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    ids = torch.tensor([lm.encode(ZEN)[:40], lm.encode(ZEN)[40:80]])  # (2, 40)
    buffer = torch.full((2 * 40 * lm.vocab_size + 7,), math.nan)
    got = lm.logits(ids, out=buffer)
    assert lm._head() is not None and got.data_ptr() == buffer.data_ptr()
    assert got.shape == (2, 40, lm.vocab_size) and got.dtype == torch.float32
    assert_close(got, lm.logits(ids), rtol=tol, atol=tol)


def test_a_head_with_logits_transformed_after_it_keeps_the_full_forward(tiny_hf_dir):
    """Gemma 2 soft-caps its logits after the head: the probe finds the difference, and the logits come
    from the model's own forward, buffer or not."""
    config = transformers.Gemma2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, final_logit_softcapping=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)  # logits well beyond the cap
    from tokenloss.models.hf import HFCausalLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir("llama"), local_files_only=True)
    lm = HFCausalLM(model, tokenizer, name="gemma2")
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    got = lm.logits(ids, out=torch.empty(6 * 50))
    assert lm._head() is None
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    assert got.abs().max() <= 0.5 and torch.equal(got, expected)


@pytest.mark.parametrize("stride", [1, 7, 63])
def test_scores_equal_transformers_full_pass(model_dir, stride):
    """With BOS (the default here) every token is scored, and a fitting text matches one transformers pass."""
    lm = load_model(model_dir)
    scores = score_text(lm, SAMPLE, stride=stride)
    assert scores.bos and scores.num_scored == len(scores) < lm.max_length
    reference = full_pass_log_probs(lm.model, scores.token_ids, lm.bos_token_id)
    assert_close(scores.log_prob.double(), reference, rtol=1e-5, atol=1e-5)
    assert scores.first_token()["scored"] is True


def test_long_text_in_windows(model_dir):
    """A text several contexts long: every token scored once, the first window equal to a direct pass."""
    lm = load_model(model_dir)
    scores = score_text(lm, ZEN, max_length=32, stride=16, batch_size=4)
    assert len(scores) > 3 * 32 and scores.num_scored == len(scores)
    reference = full_pass_log_probs(lm.model, scores.token_ids[:31], lm.bos_token_id)
    assert_close(scores.log_prob[:31].double(), reference, rtol=1e-5, atol=1e-5)
    assert scores.context.max() == 30 and scores.context[31:].min() == 15


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 1e-2), ("float16", 1e-3)])
def test_low_precision_models_track_float32(model_dir, dtype, atol):
    """bfloat16 and float16 weights give log-probs close to float32 (logits come back as float32)."""
    reference = score_text(load_model(model_dir), SAMPLE)
    lm = load_model(model_dir, dtype=dtype)
    assert str(lm.dtype) == f"torch.{dtype}"
    scores = score_text(lm, SAMPLE)
    assert scores.log_prob.dtype == torch.float32
    assert_close(scores.log_prob, reference.log_prob, atol=atol, rtol=0)


def test_no_bos_leaves_the_first_token_unscored(model_dir):
    """bos=False: the first token has no context and is not scored; the rest equal a no-BOS full pass."""
    lm = load_model(model_dir)
    scores = score_text(lm, SAMPLE, bos=False)
    assert not scores.scored[0] and scores.num_scored == len(scores) - 1
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([scores.token_ids])).logits.double()[0]
    log_p = torch.log_softmax(logits, -1)
    reference = torch.stack([log_p[i - 1, t] for i, t in enumerate(scores.token_ids) if i > 0])
    assert_close(scores.log_prob[1:].double(), reference, rtol=1e-5, atol=1e-5)


def test_offsets_of_a_slow_tokenizer_are_found_in_order():
    """Without a fast tokenizer, spans come from finding each decoded token in the text, left to right."""
    text = "ab ab  c"
    assert _offsets_from_pieces(text, ["ab", " ab", "  ", " c"]) == [(0, 2), (3, 5), (5, 5), (7, 8)]
    assert _offsets_from_pieces(text, ["zz", "c"]) == [(0, 0), (7, 8)]


def run_cli(capsys, *args):
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_evaluates_the_saved_model(model_dir, text_file, capsys):
    """`tokenloss eval --model DIR --json` prints the numbers evaluate() computes; BOS used and reported."""
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--text", str(text_file), "--json", "-q", "-S", "32")
    assert code == 0, err
    result = json.loads(out)
    expected = evaluate(load_model(model_dir), ZEN, stride=32).result
    for key in ("tokens", "bytes", "words", "num_windows"):
        assert result[key] == expected[key], key
    for key in ("loss_nats", "perplexity", "bits_per_token", "bits_per_byte", "accuracy", "ece", "log_vocab"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert result["bos"] is True and result["first_token"]["scored"] is True
    assert result["tokens"] == result["text_tokens"]  # with BOS every token counts
    assert result["bytes"] == len(ZEN.encode()) and result["log_vocab"] == pytest.approx(math.log(result["vocab_size"]))


def test_cli_table_and_no_bos(model_dir, text_file, capsys):
    """The table says whether BOS was used; --no-bos leaves the first token out."""
    code, out, _ = run_cli(capsys, "--model", str(model_dir), "--text", str(text_file), "-q", "-L", "48")
    assert code == 0 and "BOS      yes" in out and "bits per byte" in out and "word perplexity" in out
    code, out, _ = run_cli(capsys, "--model", str(model_dir), "--text", str(text_file), "-q", "--no-bos", "--json")
    result = json.loads(out)
    assert code == 0 and result["bos"] is False and result["tokens"] == result["text_tokens"] - 1


def test_cli_unloadable_directory(tmp_path, text_file, capsys):
    """A directory with a config that transformers cannot use: one clear line, exit 2, no traceback."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, out, err = run_cli(capsys, "--model", str(tmp_path), "--text", str(text_file))
    assert code == 2 and out == ""
    assert err.startswith("Error: cannot load") and err.count("\n") == 1 and "Traceback" not in err
