"""Shared test helpers: seeded random inputs with large logits, and the per-dtype tolerances."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Tolerances (torch.testing.assert_close keyword arguments) for a result *in this dtype* compared
# with a float64 truth computed from the same input values. A loss is accumulated in float32
# whatever the input dtype, so losses use the float32 entry; gradients come back in the input's
# dtype, so they use the input dtype's entry (half an ulp of relative rounding, plus the float32
# error of the softmax).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-6},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-5},
}

# Margin over PyTorch's own error in the low-precision dtype (the ml-cross-entropy rule): our
# result may be at most this much further from the float64 truth than F.cross_entropy's is.
MARGINS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


@pytest.fixture(params=["one-block", "1-row-blocks"])
def cache_blocks(request, monkeypatch):
    """Runs a test with the CPU's elementwise math on whole chunks, then on blocks of one row of them
    (:func:`tokenloss.ops.rowwise.cache_blocks`; at a test's small V a chunk is one block by default)."""
    if request.param == "1-row-blocks":
        monkeypatch.setattr("tokenloss.ops.rowwise.CACHE_BLOCK_BYTES", 1)


@pytest.fixture
def tolerances() -> dict[torch.dtype, dict[str, float]]:
    """Per-dtype ``assert_close`` tolerances against a float64 truth (see :data:`TOLERANCES`)."""
    return TOLERANCES


@pytest.fixture
def margins() -> dict[torch.dtype, float]:
    """Per-dtype margin over PyTorch's own low-precision error (see :data:`MARGINS`)."""
    return MARGINS


@pytest.fixture
def make_logits() -> Callable[..., torch.Tensor]:
    """Factory ``make_logits(*shape, dtype=float32, scale=4.0, seed=0)``: normal logits times
    ``scale`` (so that large logits and peaked softmaxes are exercised), drawn in float64 and
    rounded once to ``dtype``."""

    def make(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return make


@pytest.fixture
def make_targets() -> Callable[..., torch.Tensor]:
    """Factory ``make_targets(shape, vocab_size, ignore_every=0, ignore_index=-100, seed=1)``:
    int64 targets in ``[0, V)``, with every ``ignore_every``-th position set to ``ignore_index``."""

    def make(
        shape: tuple[int, ...], vocab_size: int, *, ignore_every: int = 0, ignore_index: int = -100, seed: int = 1
    ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        targets = torch.randint(0, vocab_size, shape, generator=gen)
        if ignore_every:
            targets.view(-1)[::ignore_every] = ignore_index
        return targets

    return make


_PEAK_TEMPLATE = """
import gc, torch, tokenloss as tl
torch.set_num_threads(1)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
{setup}
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
{step}
print(status("VmHWM") - before)
"""


@pytest.fixture
def peak_rss_growth() -> Callable[..., int]:
    """``peak_rss_growth(setup, step, env=None) -> bytes``: the peak RSS growth of running the Python
    statements ``step`` after ``setup`` in a fresh one-thread process (``torch``, ``tokenloss as tl``
    imported), read from Linux's /proc (the test is skipped elsewhere)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read peak RSS")

    def measure(setup: str, step: str, env: dict[str, str] | None = None) -> int:
        script = _PEAK_TEMPLATE.format(setup=textwrap.dedent(setup), step=textwrap.dedent(step))
        environment = {**os.environ, **(env or {})}
        command = [sys.executable, "-c", script]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    return measure


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with 1234, for tests that draw their own tensors."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, busy CPU: one intra-op thread avoids OpenMP spin-waits (seconds become ms).

    Test modules of tiny models take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face causal LMs, built and saved offline (no download).

ZEN = __import__("codecs").decode(__import__("this").s, "rot13")
SAMPLE = "Beautiful is better than ugly. Naïve code — 🙂 is fine, too."


def build_tokenizer(arch: str, *, adds_bos: bool = False):
    """A small BPE trained on the Zen of Python: byte-level like GPT-2, or Metaspace with <s> like Llama.

    ``adds_bos``: the tokenizer puts ``<s>`` before every text it encodes (Llama's template).
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if arch == "gpt2":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer.train_from_iterator([ZEN, SAMPLE], trainer)
    if adds_bos:
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def build_model(arch: str, vocab_size: int, bos: int, context: int = 64):
    """A 2-layer random GPT-2 or Llama (hidden size 32)."""
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=context, n_embd=32, n_layer=2, n_head=2, bos_token_id=bos
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=bos,
    )
    return transformers.LlamaForCausalLM(config)


def train_briefly(model, tokenizer, *, steps: int = 40, length: int = 32) -> None:
    """A few Adam steps on the Zen of Python, so that the model's predictions are not uniform noise."""
    ids = torch.tensor(tokenizer(ZEN, add_special_tokens=False)["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length, (8,), generator=generator)
        batch = torch.stack([ids[s : s + length] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Callable[..., object]:
    """Factory ``(arch, *, adds_bos=False, trained=False, context=64) -> Path`` of a saved tiny model
    and tokenizer (``"gpt2"`` or ``"llama"``), built once per session per combination."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    built: dict[tuple, object] = {}

    def make(arch: str, *, adds_bos: bool = False, trained: bool = False, context: int = 64):
        key = (arch, adds_bos, trained, context)
        if key not in built:
            directory = tmp_path_factory.mktemp(f"{arch}-bos{int(adds_bos)}-trained{int(trained)}")
            tokenizer = build_tokenizer(arch, adds_bos=adds_bos)
            model = build_model(arch, len(tokenizer), tokenizer.bos_token_id, context)
            if trained:
                train_briefly(model, tokenizer)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            built[key] = directory
        return built[key]

    return make
