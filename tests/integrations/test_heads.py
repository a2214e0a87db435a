"""Tests of tokenloss.integrations.heads through a patched model: LM heads that are more than an nn.Linear
(PEFT LoRA and modules_to_save, a partitioned weight gathered by hooks, an FSDP2 unit) give the unpatched
model's loss and gradients."""

from __future__ import annotations

import copy
import json
import multiprocessing
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

from hf_models import LOSS_TOL, assert_same_grads, batch, tiny_model  # noqa: E402

from tokenloss.integrations.transformers import is_patched, patch  # noqa: E402


def _peft():
    try:
        import peft
    except Exception as error:  # absent, or not importable beside this transformers
        pytest.skip(f"peft is not usable here: {error}")
    return peft


def _loss_and_grads(model, seed: int = 1):
    """Loss and every gradient of one training forward/backward, with dropout drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _peft_model(**lora_options):
    peft = _peft()
    config = peft.LoraConfig(r=4, init_lora_weights=False, **lora_options)
    return peft.get_peft_model(tiny_model("llama"), config).train()


@pytest.mark.parametrize(
    "lora_options",
    [
        dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.0),
        dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.3),  # dropout on the head's adapter input
        dict(target_modules=["lm_head"], lora_bias=True),
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["lora", "lora-dropout", "lora-bias", "modules-to-save"],
)
def test_peft_heads_give_the_unpatched_loss_and_gradients(lora_options) -> None:
    """LoRA on lm_head (base + scaled low-rank term, with its dropout) and modules_to_save: patched equals
    unpatched in loss and in the gradient of every trainable parameter, the head's adapters included."""
    model = _peft_model(**lora_options)
    expected_loss, expected = _loss_and_grads(model)
    assert any("lm_head" in name for name in expected)
    patch(model.get_base_model())
    loss, got = _loss_and_grads(model)
    assert_close(loss, expected_loss, **LOSS_TOL)
    assert_same_grads(got, expected)


def test_peft_head_with_adapters_disabled_is_the_base_head() -> None:
    model = _peft_model(target_modules=["lm_head"])

    def loss() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch()).loss

    with model.disable_adapter():
        expected = loss()
        patch(model.get_base_model())
        assert_close(loss(), expected, **LOSS_TOL)
    assert not torch.allclose(loss(), expected)  # adapters enabled again: another loss


def test_a_dora_head_is_refused_with_what_to_do() -> None:
    model = _peft_model(target_modules=["lm_head"], use_dora=True)
    with pytest.raises(TypeError, match="LoRA variant .* leave lm_head out of target_modules"):
        patch(model.get_base_model())
    assert not is_patched(model.get_base_model())


def test_a_weight_gathered_by_hooks_is_read_inside_the_heads_call() -> None:
    """A simulated ZeRO-3 head: its weight is empty outside its call and gathered by a forward pre-hook.
    The patched loss runs inside the head's call, so it sees the gathered weight; with no gathering hook
    the error says what happened."""
    model = tiny_model("llama").train()
    with torch.no_grad():
        expected = model(**batch()).loss
    head = model.lm_head
    full = head.weight.data
    head.weight.data = torch.empty(0)
    gather = head.register_forward_pre_hook(lambda module, args: setattr(module.weight, "data", full))
    release = head.register_forward_hook(lambda module, args, out: setattr(module.weight, "data", torch.empty(0)))
    patch(model)
    with torch.no_grad():
        assert_close(model(**batch()).loss, expected, **LOSS_TOL)
    assert head.weight.numel() == 0  # partitioned again after the call
    gather.remove()
    with pytest.raises(RuntimeError, match="weight is empty even inside its own call"):
        model(**batch())
    release.remove()


# ---------------------------------------------------------------------------------------------
# FSDP2: the head in its own unit, 2 gloo ranks on the CPU
# ---------------------------------------------------------------------------------------------


def _fsdp2_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = {}
    try:
        reference = tiny_model("llama").train()
        expected_loss, expected = _loss_and_grads(reference)
        for order in ("patch-before", "patch-after"):
            try:
                model = copy.deepcopy(reference)
                if order == "patch-before":
                    patch(model)
                fully_shard(model.lm_head)
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                if order == "patch-after":
                    patch(model)
                heads: list[tuple[int, ...]] = []
                model.lm_head.register_forward_hook(lambda module, args, out, heads=heads: heads.append(out.shape))
                loss, got = _loss_and_grads(model)  # the same batch on both ranks: the averaged gradient is one rank's
                assert heads == [torch.Size([])], heads  # the head's call gave the loss, not (B, T, V) logits
                got = {name: grad.full_tensor() for name, grad in got.items()}
                assert_close(loss, expected_loss, **LOSS_TOL)
                assert_same_grads(got, expected)
                results[order] = None
            except Exception:
                results[order] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    import torch.multiprocessing as mp

    if not hasattr(torch.distributed, "fsdp") or not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    out_dir = tmp_path_factory.mktemp("fsdp2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(_fsdp2_worker, args=(2, port, str(out_dir)), nprocs=2, join=True, start_method=method)
    return {rank: json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(2)}


@pytest.mark.distributed
@pytest.mark.parametrize("order", ["patch-before", "patch-after"])
def test_fsdp2_head_in_its_own_unit_equals_the_unsharded_model(fsdp2_results, order) -> None:
    """fully_shard(lm_head), each layer and the root, on 2 ranks: the patched loss and every gradient
    (gathered from the shards) equal the unsharded, unpatched model's, patched before or after sharding."""
    failures = {rank: result[order] for rank, result in fsdp2_results.items() if result.get(order)}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())
