"""Tiny random causal LMs of every family the transformers integration supports, a batch with a prompt and
padding masked out, and the float32 tolerances of a patched model against its own loss."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

VOCAB = 97
# float32 everywhere; the patched loss differs from the model's own only by the order of float32 sums.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def tiny_model(family: str, *, softcap: float = 0.5) -> torch.nn.Module:
    """A 2-layer random causal LM of ``family`` with tiny dimensions and no dropout."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.GPT2LMHeadModel(config)
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=8)),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=8)),
        # a small cap so that soft-capping changes the logits of a tiny random model noticeably
        "gemma2": (
            transformers.Gemma2Config,
            transformers.Gemma2ForCausalLM,
            dict(head_dim=8, final_logit_softcapping=softcap),
        ),
    }
    optional = {  # families a transformers version may lack (SmolLM3 came in 4.53)
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=softcap)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_dropout=0.0, attention_dropout=0.0)),
        # mixtures of experts, with the router's load-balancing loss in the loss (output_router_logits)
        "mixtral": (
            "MixtralConfig",
            "MixtralForCausalLM",
            dict(
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
                router_aux_loss_coef=0.02,
                router_jitter_noise=0.0,
            ),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=24,
                output_router_logits=True,
                router_aux_loss_coef=0.02,
                decoder_sparse_step=1,
            ),
        ),
    }
    if family in optional:
        config_name, model_name, extra = optional[family]
        if not hasattr(transformers, model_name):
            pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
        config_class, model_class = getattr(transformers, config_name), getattr(transformers, model_name)
    else:
        config_class, model_class, extra = classes[family]
    return model_class(config_class(**common, **extra))


FAMILIES = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "smollm3", "gpt_neox",
    "mixtral", "qwen2_moe",
)  # fmt: skip


def batch(seed: int = 0, shape=(2, 9)):
    """input_ids, labels with -100 on a prompt and on right padding, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, shape, generator=gen)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[1, -2:] = 0
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


def record_head_outputs(model) -> list[torch.Size]:
    """A list that receives the shape of every output of the model's LM head call (a patched model's head
    call returns the loss, a scalar, where the unpatched one returns the (B, T, V) logits)."""
    shapes: list[torch.Size] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    return shapes
