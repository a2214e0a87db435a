"""Tests of tokenloss.integrations.trl against TRL itself: its fused LM head's outputs and gradients, and
SFTTrainer runs (completion-only loss, packing) with its logged metrics, through tokenloss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers", reason="the TRL integration needs transformers")

from hf_models import batch, tiny_model  # noqa: E402  (tests/integrations/conftest.py puts this folder on sys.path)

import tokenloss.integrations.trl as tl_trl  # noqa: E402
from tokenloss.integrations.transformers import patch  # noqa: E402


def _trl():
    try:
        import trl
        from trl.trainer.utils import add_fused_lm_head
    except Exception as error:  # absent, or not importable beside this transformers
        pytest.skip(f"trl is not usable here: {error}")
    return trl, add_fused_lm_head


class _Trainer:
    """The two attributes patch_trainer reads from a TRL trainer."""

    def __init__(self, model, ref_model=None):
        self.model, self.ref_model = model, ref_model


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = tl_trl.linear_token_logprobs

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tl_trl, "linear_token_logprobs", spy)
    return calls


@pytest.mark.parametrize(
    ("family", "temperature", "pre_shifted", "logit_scale", "fp32_head"),
    [
        ("llama", 1.0, False, None, False),
        ("llama", 0.7, False, None, False),
        ("llama", 1.0, True, None, False),
        ("llama", 0.7, True, None, False),
        ("llama", 0.7, False, 2.5, False),  # a config logit_scale (as Cohere's), applied before the temperature
        ("mixtral", 1.0, False, None, False),  # the router's load-balancing loss in TRL's loss and aux_loss
        ("llama", 0.7, False, None, True),  # bf16 autocast with GRPO's cast_lm_head_to_fp32: the head in float32
    ],
)
def test_fused_head_outputs_and_gradients_equal_trls(
    monkeypatch, family, temperature, pre_shifted, logit_scale, fp32_head
):
    """model(..., fused_lm_head=True) as GRPO/DPO/SFT call it: log_probs, entropy, is_top1, label_mask, loss (and
    a mixture of experts' aux_loss) equal TRL's own fused head's, and so do the gradients of a
    policy-gradient-plus-entropy objective."""
    _, add_fused_lm_head = _trl()
    inputs = batch(7)
    labels = inputs.pop("labels")
    call = dict(labels=labels) if not pre_shifted else dict(shift_labels=torch.cat(
        [labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1))  # fmt: skip
    results = []
    calls = _count_calls(monkeypatch)
    for use_tokenloss in (False, True):
        model = tiny_model(family).train()
        if logit_scale is not None:
            model.config.logit_scale = logit_scale
        add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"),
                          cast_lm_head_to_fp32=fp32_head)  # fmt: skip
        if use_tokenloss:
            tl_trl.patch_trainer(_Trainer(model))
            assert tl_trl.is_patched(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp32_head):
            out = model(**inputs, **call, fused_lm_head=True)
        advantages = torch.linspace(-1, 1, out.log_probs.numel()).view_as(out.log_probs)
        (-(advantages * out.log_probs).sum() - 0.01 * out.entropy.sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((out, grads))
    (trl_out, trl_grads), (ours, our_grads) = results
    assert calls == [1]
    for field in ("log_probs", "entropy", "loss"):
        assert_close(getattr(ours, field), getattr(trl_out, field), rtol=1e-5, atol=1e-6, msg=field)
    assert torch.equal(ours.is_top1.bool(), trl_out.is_top1.bool())
    assert torch.equal(ours.label_mask, trl_out.label_mask)
    if family == "mixtral":
        assert trl_out.aux_loss > 0
        assert_close(ours.aux_loss, trl_out.aux_loss, rtol=0, atol=0)
    for name in trl_grads:
        assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _sft_run(tiny_hf_dir, tmp_path, *, use_tokenloss: bool, **config):
    trl, _ = _trl()
    import datasets

    directory = tiny_hf_dir("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):  # pre-tokenized prompt + completion: only the completion counts (completion_only_loss)
        length = 6 + i % 4
        rows.append({"input_ids": torch.randint(3, len(tokenizer), (length,), generator=gen).tolist(),
                     "completion_mask": [0] * 3 + [1] * (length - 3)})  # fmt: skip
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.1,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", completion_only_loss=True,
        bf16=False, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)  # fmt: skip
    if use_tokenloss:
        tl_trl.patch_trainer(trainer)
    trainer.train()
    logs = [(h["loss"], h["entropy"], h["mean_token_accuracy"]) for h in trainer.state.log_history if "entropy" in h]
    return torch.tensor(logs, dtype=torch.float64), [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_through_tokenloss_equals_trls_own_head(monkeypatch, tiny_hf_dir, tmp_path, packing) -> None:
    """SFTTrainer, completion-only loss, two SGD steps: the logged loss, entropy and mean token accuracy and the
    trained weights equal those of TRL's own fused head, and tokenloss computed every step (in float32: SFTConfig
    defaults to bf16 autocast, where the two heads round their bf16 products differently)."""
    expected_logs, expected = _sft_run(tiny_hf_dir, tmp_path / "trl", use_tokenloss=False, packing=packing)
    calls = _count_calls(monkeypatch)
    logs, got = _sft_run(tiny_hf_dir, tmp_path / "tokenloss", use_tokenloss=True, packing=packing)
    assert len(calls) == 2 and len(logs) == 2
    assert_close(logs, expected_logs, rtol=1e-5, atol=1e-6)
    for p_got, p_want in zip(got, expected):
        assert_close(p_got, p_want, rtol=1e-4, atol=1e-5)


def test_bypassed_calls_warn(tiny_hf_dir, tmp_path) -> None:
    """With label smoothing TRL computes the loss from the full logits: tokenloss says it is bypassed."""
    with pytest.warns(UserWarning, match="tokenloss is bypassed"):
        _sft_run(tiny_hf_dir, tmp_path, use_tokenloss=True, label_smoothing_factor=0.1)


def test_the_transformers_patch_points_trl_users_here() -> None:
    """patch() on a model that carries TRL's fused head is refused with the way to go; a model patched before TRL
    wrapped it warns, at TRL's first fused call, that the patch is bypassed."""
    _, add_fused_lm_head = _trl()
    model = tiny_model("llama").train()
    add_fused_lm_head(model)
    with pytest.raises(TypeError, match="tokenloss.integrations.trl.patch_trainer"):
        patch(model)

    model = patch(tiny_model("llama").train())
    add_fused_lm_head(model)
    inputs = batch(1)
    with pytest.warns(UserWarning, match="tokenloss's patch is bypassed"):
        model(**inputs, fused_lm_head=True)
    tl_trl.patch_trainer(_Trainer(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs, fused_lm_head=True)  # through tokenloss now: no warning


def test_models_without_trls_head_or_with_a_softcap_are_refused() -> None:
    _, add_fused_lm_head = _trl()
    with pytest.raises(TypeError, match="carries no TRL fused LM head"):
        tl_trl.patch_trainer(_Trainer(tiny_model("llama")))
    model = tiny_model("gemma2")
    add_fused_lm_head(model)
    with pytest.raises(ValueError, match="soft-caps its final logits"):
        tl_trl.patch_trainer(_Trainer(model))


def test_unpatch_trainer_restores_trls_head() -> None:
    _, add_fused_lm_head = _trl()
    model = tiny_model("llama")
    add_fused_lm_head(model)
    trl_forward = model.forward
    trainer = tl_trl.patch_trainer(_Trainer(model, ref_model=copy.deepcopy(model)))
    assert tl_trl.is_patched(trainer.model) and tl_trl.is_patched(trainer.ref_model)
    tl_trl.unpatch_trainer(trainer)
    assert model.forward == trl_forward and not tl_trl.is_patched(model)


@pytest.mark.slow
def test_grpo_trainer_through_tokenloss_equals_trls_own_head(monkeypatch, tiny_hf_dir, tmp_path) -> None:
    """GRPOTrainer (sampling at temperature 0.7, a reward on the completions, two SGD steps): the logged entropy and
    the trained weights equal those of TRL's own fused head, the weights moved, and tokenloss computed the
    log-probabilities."""
    trl, _ = _trl()
    import datasets

    directory = tiny_hf_dir("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    prompts = datasets.Dataset.from_list(
        [{"prompt": tokenizer.decode(torch.randint(3, len(tokenizer), (5,), generator=gen).tolist())} for _ in range(4)]
    )

    def reward(completions, **kwargs):
        return [float(sum(map(ord, completion)) % 11) for completion in completions]

    def run(use_tokenloss: bool, out: str):
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
            max_steps=2, optim="sgd", learning_rate=0.1, report_to=[], use_cpu=True, logging_steps=1,
            save_strategy="no", bf16=False, temperature=0.7, seed=0,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)  # fmt: skip
        if use_tokenloss:
            tl_trl.patch_trainer(trainer)
        trainer.train()
        entropy = torch.tensor([h["entropy"] for h in trainer.state.log_history if "entropy" in h])
        return entropy, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    expected_entropy, expected = run(False, "trl")
    calls = _count_calls(monkeypatch)
    entropy, got = run(True, "tokenloss")
    assert calls and len(entropy) == 2
    assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-6)
    assert_close(got, expected, rtol=1e-4, atol=1e-6)
    initial = transformers.AutoModelForCausalLM.from_pretrained(directory).parameters()
    initial = torch.cat([p.detach().flatten() for p in initial])
    assert (got - initial).abs().max() > 1e-3  # it trained


@pytest.mark.slow
def test_sft_assistant_only_loss_through_tokenloss_equals_trls_own_head(monkeypatch, tiny_hf_dir, tmp_path) -> None:
    """A conversational dataset with assistant_only_loss (a chat template with generation markers): the logged
    loss, entropy, mean token accuracy and the trained weights equal those of TRL's own head."""
    trl, _ = _trl()
    import datasets

    directory = tiny_hf_dir("llama")
    words = ["the cat", "a dog sat", "on the mat", "hello there", "good day"]
    conversations = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": words[i % 5]}, {"role": "assistant", "content": words[(i + 2) % 5]}]}
        for i in range(8)
    ])  # fmt: skip

    def run(use_tokenloss: bool, out: str):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        tokenizer.chat_template = (
            "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
            "{{ message['content'] }}</s>{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
        )
        args = trl.SFTConfig(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.1,
            report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", bf16=False, assistant_only_loss=True,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
        assert -100 in trainer.train_dataset[0]["labels"]  # the user turn does not count
        if use_tokenloss:
            tl_trl.patch_trainer(trainer)
        trainer.train()
        logs = [
            (h["loss"], h["entropy"], h["mean_token_accuracy"]) for h in trainer.state.log_history if "entropy" in h
        ]
        return torch.tensor(logs, dtype=torch.float64), torch.cat(
            [p.detach().flatten() for p in trainer.model.parameters()]
        )

    expected_logs, expected = run(False, "trl")
    calls = _count_calls(monkeypatch)
    logs, got = run(True, "tokenloss")
    assert len(calls) == 2
    assert_close(logs, expected_logs, rtol=1e-5, atol=1e-6)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
