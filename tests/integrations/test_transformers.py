"""Tests of tokenloss.integrations.transformers: patched tiny random causal LMs match their own loss and gradients."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

from hf_models import (  # noqa: E402  (tests/integrations/conftest.py puts this folder on sys.path)
    FAMILIES,
    LOSS_TOL,
    VOCAB,
    assert_same_grads,
    batch,
    loss_and_grads,
    record_head_outputs,
    tiny_model,
)

import tokenloss as tl  # noqa: E402
from tokenloss.integrations.transformers import SUPPORTED_MODELS, is_patched, patch, patch_trainer, unpatch  # noqa: E402


def test_supported_models_are_the_tested_families() -> None:
    """Every class patch accepts is one that the tests below check."""
    tested = set()
    for family in FAMILIES:
        try:
            tested.add(type(tiny_model(family)).__name__)
        except pytest.skip.Exception:  # a family this transformers lacks: patch cannot meet it either
            pass
    assert tested == {name for name in SUPPORTED_MODELS if hasattr(transformers, name)}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_loss_and_gradients_equal_the_models_own(family: str) -> None:
    """In training mode the patched loss and every parameter gradient equal the unpatched model's, with no logits."""
    model = tiny_model(family).train()
    inputs = batch()
    expected, expected_grads = loss_and_grads(model, **inputs)

    head_outputs = record_head_outputs(model)
    patch(model)
    got, got_grads = loss_and_grads(model, **inputs)
    assert got.logits is None and head_outputs == [torch.Size([])]  # the head gave a loss, no (B, T, V) logits
    assert_close(got.loss, expected.loss, **LOSS_TOL)
    assert_same_grads(got_grads, expected_grads)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_num_items_in_batch_and_shift_labels(family: str) -> None:
    """num_items_in_batch (as the Trainer passes it) and pre-shifted shift_labels give the model's own loss."""
    model = tiny_model(family).train()
    inputs = batch(1)
    num_items = torch.tensor(23)
    shift_labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    cases = [dict(num_items_in_batch=num_items), dict(shift_labels=shift_labels, num_items_in_batch=num_items)]
    expected = [loss_and_grads(model, **inputs, **extra) for extra in cases]
    patch(model)
    for (want, want_grads), extra in zip(expected, cases):
        got, got_grads = loss_and_grads(model, **inputs, **extra)
        assert_close(got.loss, want.loss, **LOSS_TOL)
        assert_same_grads(got_grads, want_grads)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_eval_mode_builds_the_logits(family: str) -> None:
    """In eval mode the logits are built (soft-capped as the model does) and the loss matches."""
    model = tiny_model(family).eval()
    inputs = batch(2)
    with torch.no_grad():
        expected = model(**inputs)
        patch(model)
        got = model(**inputs)
    assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert_close(got.loss, expected.loss, **LOSS_TOL)


def test_skip_logits_false_keeps_logits_in_training() -> None:
    """skip_logits=False builds the logits in training mode too; the gradients still match."""
    model = tiny_model("gemma2").train()
    inputs = batch(3)
    expected, expected_grads = loss_and_grads(model, **inputs)
    patch(model, skip_logits=False)
    got, got_grads = loss_and_grads(model, **inputs)
    assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert_close(got.loss, expected.loss, **LOSS_TOL)
    assert_same_grads(got_grads, expected_grads)


# At 0.5 with momentum Phi-3 overshoots (its loss rises unpatched too) and OLMo 2 amplifies float32 noise.
LEARNING_RATES = {"phi3": 0.1, "olmo2": 0.1, "mixtral": 0.1, "qwen2_moe": 0.1}


@pytest.mark.parametrize("family", FAMILIES)
def test_optimizer_steps_train_the_same(family: str) -> None:
    """Four SGD steps on one batch of a patched copy follow the unpatched model: same losses, same weights.

    (SGD, not Adam: Adam scales every gradient to a unit step, so it turns float32 noise in gradients that are
    exactly zero in theory, such as GPT-2's key bias, into differences of the size of the learning rate.)"""
    reference = tiny_model(family).train()
    patched = patch(copy.deepcopy(reference))
    assert patched.forward.__self__ is patched
    runs = []
    for model in (reference, patched):
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATES.get(family, 0.5), momentum=0.9)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = model(**batch(10)).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        runs.append(torch.stack(losses))
    assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)
    assert runs[0][-1] < runs[0][0]  # it does train
    for (name, p_ref), p_new in zip(reference.named_parameters(), patched.parameters()):
        assert_close(p_new, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_loss_options_change_the_loss_as_tl_cross_entropy() -> None:
    """Label smoothing and z-loss passed to patch act like tl.cross_entropy on the model's own logits."""
    model = tiny_model("gemma2").train()
    inputs = batch(4)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    expected = tl.cross_entropy(logits, inputs["labels"], shift=True, label_smoothing=0.1, z_loss=1e-3)
    patch(model, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
    assert_close(model(**inputs).loss, expected, **LOSS_TOL)


def test_without_labels_the_original_forward_runs() -> None:
    """Without labels (inference, generation) the output is the unpatched model's, logits included."""
    model = tiny_model("llama").eval()
    prompt = batch(5)["input_ids"][:1, :4]
    with torch.no_grad():
        expected_logits = model(input_ids=prompt).logits
        expected_tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)
        patch(model)
        assert_close(model(input_ids=prompt).logits, expected_logits, rtol=0, atol=0)
        assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False), expected_tokens)


def test_return_dict_false_gives_a_tuple_with_the_loss_first() -> None:
    """return_dict=False returns a tuple whose first item is the loss, as the model's own forward."""
    model = tiny_model("qwen2").train()
    inputs = batch(6)
    expected = model(**inputs, return_dict=False)
    patch(model)
    got = model(**inputs, return_dict=False)
    assert isinstance(got, tuple)
    assert_close(got[0], expected[0], **LOSS_TOL)


def test_signature_is_kept_for_the_trainer() -> None:
    """The patched forward shows the model's own signature (the Trainer reads it to keep dataset columns and to
    pass num_items_in_batch)."""
    model = tiny_model("llama")
    before = inspect.signature(model.forward)
    patch(model)
    after = inspect.signature(model.forward)
    assert after == before and "labels" in after.parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in after.parameters.values())


def test_unpatch_restores_the_original_forward() -> None:
    """unpatch removes the instance forward (logits are built again in training); it is a no-op twice."""
    model = tiny_model("gpt2").train()
    inputs = batch(7)
    patch(model)
    assert is_patched(model) and model(**inputs).logits is None
    assert unpatch(model) is model
    assert not is_patched(model) and "forward" not in model.__dict__
    assert model(**inputs).logits is not None
    unpatch(model)  # not patched: nothing to do


def test_patch_again_replaces_the_options() -> None:
    """A second patch replaces the first one's options instead of stacking two patches."""
    model = tiny_model("llama").train()
    inputs = batch(8)
    plain = model(**inputs).loss
    patch(model, z_loss=0.5)
    assert model(**inputs).loss > plain + 1e-3
    patch(model)
    assert_close(model(**inputs).loss, plain, **LOSS_TOL)
    unpatch(model)
    assert "forward" not in model.__dict__


def test_patch_keeps_a_previous_instance_forward() -> None:
    """A forward wrapper set on the instance before patching (as accelerate does) is called and restored."""
    model = tiny_model("llama").train()
    calls = []
    original = model.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapper
    patch(model)
    model(input_ids=batch()["input_ids"])  # no labels: the previous forward
    assert calls == [1]
    unpatch(model)
    assert model.forward is wrapper


def test_unsupported_models_are_refused() -> None:
    """Another architecture, a subclass overriding forward, a custom loss_function or a non-Linear head: TypeError."""
    bert = transformers.BertLMHeadModel(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    with pytest.raises(TypeError, match="does not support BertLMHeadModel .* supported: GPT2LMHeadModel"):
        patch(bert)
    with pytest.raises(TypeError, match="does not support Linear"):
        patch(torch.nn.Linear(2, 2))

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    config = tiny_model("llama").config
    with pytest.raises(TypeError, match="overrides LlamaForCausalLM.forward"):
        patch(Custom(config))
    model = tiny_model("llama")
    model.loss_function = lambda *args, **kwargs: 0
    with pytest.raises(TypeError, match="custom loss_function"):
        patch(model)
    model = tiny_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match="is a Sequential, not a torch.nn.Linear, PEFT LoRA Linear"):
        patch(model)
    assert not is_patched(model)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(softcap=30.0), TypeError, "final_logit_softcapping"),
        (dict(shift=False), TypeError, "causal shift"),
        (dict(num_items=3), TypeError, "num_items_in_batch"),
        (dict(alpha=1.0), TypeError, "unknown loss option 'alpha'"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing must be in"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(skip_logits="yes"), TypeError, "skip_logits must be"),
    ],
)
def test_bad_options_are_refused_at_patch_time(options, error, match) -> None:
    """Options the patch owns, unknown names and out-of-range values fail when patching, not mid-training."""
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        patch(model, **options)
    assert not is_patched(model)


def test_a_meta_head_is_refused_at_patch_time() -> None:
    """A head offloaded to 'meta' (accelerate's device_map) is a clear ValueError when patching, not later."""
    model = tiny_model("llama")
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match="weight on the 'meta' device"):
        patch(model)


def test_nan_raises_by_default_and_gives_a_nan_loss_when_asked() -> None:
    """NaN hidden states: the patched model raises (tokenloss's promise); with check_inputs=False it returns a
    NaN loss as transformers does, for the Trainer's own NaN handling."""
    model = tiny_model("llama").train()
    inputs = batch()
    handle = model.model.norm.register_forward_hook(lambda module, args, out: out * float("nan"))
    try:
        patch(model)
        with pytest.raises(ValueError, match="NaN or infinite"):
            model(**inputs)
        patch(model, check_inputs=False)
        assert torch.isnan(model(**inputs).loss)
        unpatch(model)
        assert torch.isnan(model(**inputs).loss)  # transformers' own behaviour
    finally:
        handle.remove()


def _trainer(model, tmp_path, **arguments):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    try:
        transformers.Trainer  # noqa: B018  (imported lazily: datasets and huggingface_hub must agree)
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"transformers.Trainer cannot be imported here: {str(error).splitlines()[-1]}")
    rows = [{key: value[i] for key, value in batch(seed).items()} for seed in range(3) for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, **arguments,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=rows)


@pytest.mark.parametrize("factor", [0.0, 0.1])
def test_patch_trainer_honours_label_smoothing_factor(factor, tmp_path) -> None:
    """Trainer(label_smoothing_factor=eps): the Trainer's own label smoother on the logits and the patched
    model (the labels reach it, no logits built) give the same loss; training runs through the patch."""
    reference = _trainer(tiny_model("llama").train(), tmp_path / "ref", label_smoothing_factor=factor)
    inputs = batch(5)
    expected = reference.compute_loss(reference.model, dict(inputs))
    trainer = patch_trainer(_trainer(copy.deepcopy(reference.model), tmp_path / "new", label_smoothing_factor=factor))
    assert trainer.label_smoother is None and is_patched(trainer.model)
    head_outputs = record_head_outputs(trainer.model)
    got = trainer.compute_loss(trainer.model, dict(inputs))
    assert head_outputs == [torch.Size([])]  # the loss came from tokenloss, without the logits
    assert_close(got, expected, **LOSS_TOL)
    if factor:
        assert_close(got, tl.cross_entropy(
            reference.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits, inputs["labels"],
            shift=True, label_smoothing=factor,
        ), **LOSS_TOL)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2 and set(head_outputs) == {torch.Size([])}


def test_patch_trainer_refuses_two_smoothings(tmp_path) -> None:
    trainer = _trainer(tiny_model("gpt2").train(), tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor is 0.1"):
        patch_trainer(trainer, label_smoothing=0.2)


def _flat_grads(model, inputs, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_bf16_autocast_follows_the_unpatched_head() -> None:
    """Under torch.autocast(bfloat16) the patched head multiplies in bf16 as the model's nn.Linear does: its loss
    equals the unpatched autocast loss, and its gradients lie much closer to the unpatched autocast gradients
    than float32 ones do (before, the patched head computed in float32)."""
    model = tiny_model("llama").train()
    inputs = batch(3, shape=(4, 16))
    expected_loss, expected = _flat_grads(model, inputs, autocast=True)
    _, float32 = _flat_grads(model, inputs, autocast=False)
    loss, got = _flat_grads(patch(copy.deepcopy(model)), inputs, autocast=True)
    assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)

    def distance(a: torch.Tensor) -> float:
        return ((a - expected).norm() / expected.norm()).item()

    assert distance(got) < 0.65 * distance(float32), (distance(got), distance(float32))


def test_torch_compile_does_not_recompile_across_counted_token_numbers() -> None:
    """torch.compile of a patched model: batches with different numbers of counted tokens reuse the graphs
    compiled for the first (the fused loss is one eager call), with the eager model's loss and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = patch(tiny_model("llama").train())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    frames = []
    for ignored in range(1, 5):
        inputs = batch(ignored)
        inputs["labels"][0, :ignored] = -100
        got, got_grads = loss_and_grads(compiled, **inputs)
        expected, expected_grads = loss_and_grads(model, **inputs)
        assert_close(got.loss, expected.loss, **LOSS_TOL)
        assert_same_grads({name.removeprefix("_orig_mod."): g for name, g in got_grads.items()}, expected_grads)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 4, frames


def test_apply_patches_the_class_so_from_pretrained_models_are_patched(tmp_path) -> None:
    """apply(cls): instances built later (from_pretrained) compute the patched loss without logits, equal to
    the model's own; revert restores the class; names work as classes; another class is refused."""
    from tokenloss.integrations.transformers import apply, revert

    reference = tiny_model("llama").train()
    reference.save_pretrained(tmp_path)
    inputs = batch(2)
    expected, expected_grads = loss_and_grads(reference, **inputs)
    cls = type(reference)
    apply("LlamaForCausalLM")
    try:
        model = cls.from_pretrained(tmp_path).train()
        assert is_patched(model) and not is_patched(tiny_model("gpt2"))
        assert "labels" in inspect.signature(model.forward).parameters  # the Trainer reads it
        head_outputs = record_head_outputs(model)
        got, got_grads = loss_and_grads(model, **inputs)
        assert got.logits is None and head_outputs == [torch.Size([])]
        assert_close(got.loss, expected.loss, **LOSS_TOL)
        assert_same_grads(got_grads, expected_grads)
        patch(model, label_smoothing=0.1)  # an instance patch keeps its own options
        assert_close(model(**inputs).loss, tl.cross_entropy(
            reference(**{k: v for k, v in inputs.items() if k != "labels"}).logits, inputs["labels"], shift=True,
            label_smoothing=0.1), **LOSS_TOL)  # fmt: skip
        unpatch(model)
        assert is_patched(model)  # still through its class
    finally:
        revert(cls)
    assert not is_patched(model) and model(**inputs).logits is not None
    with pytest.raises(TypeError, match="apply does not support BertLMHeadModel"):
        apply(transformers.BertLMHeadModel)


def test_patch_trainer_refuses_skip_logits_with_compute_metrics(tmp_path) -> None:
    """compute_metrics needs the logits of evaluate(): skip_logits=True is refused; the default builds them in
    eval mode, so compute_metrics receives the (B, T, V) logits."""
    trainer = _trainer(tiny_model("gpt2"), tmp_path)
    seen = []
    trainer.compute_metrics = lambda prediction: seen.append(prediction.predictions.shape) or {"seen": 1.0}
    trainer.eval_dataset = trainer.train_dataset
    with pytest.raises(ValueError, match="skip_logits=True never builds the logits.*compute_metrics"):
        patch_trainer(trainer, skip_logits=True)
    patch_trainer(trainer)
    assert trainer.evaluate()["eval_seen"] == 1.0 and seen == [(6, 9, VOCAB)]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("router_logits", [True, False])
def test_mixture_of_experts_keeps_the_router_loss(family: str, router_logits: bool) -> None:
    """The router's load-balancing loss is in the patched loss exactly as in the model's own (and its
    aux_loss and router_logits are returned), or absent when output_router_logits=False."""
    model = tiny_model(family).train()
    inputs = batch(4)
    expected = model(**inputs, output_router_logits=router_logits)
    patch(model)
    got = model(**inputs, output_router_logits=router_logits)
    assert got.logits is None and type(got) is type(expected)
    assert_close(got.loss, expected.loss, **LOSS_TOL)
    if router_logits:
        assert expected.aux_loss > 0
        assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=0)
        assert len(got.router_logits) == len(expected.router_logits)
        plain = model(**inputs, output_router_logits=False).loss
        assert_close(got.loss - plain, model.router_aux_loss_coef * got.aux_loss, rtol=1e-5, atol=1e-7)
    else:
        assert got.aux_loss is None
