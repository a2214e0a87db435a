"""Tests of tokenloss.distributed: vocabulary-parallel losses and global_num_items against one device, on gloo.

The multi-process cases run inside one spawn per world size (2 and 3 processes on the CPU): every
rank runs every case and records its error (or None); each pytest item then reports one case of
one world size. Each case builds the same whole-vocabulary data on every rank from a seed, runs
the single-device function on it and the vocabulary-parallel function on this rank's slice, and
compares the loss and the gradients with ``torch.testing.assert_close``.
"""

from __future__ import annotations

import json
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from tokenloss.options import OPTION_NAMES, LossOptions, prepare_targets
from tokenloss.reference import reference_cross_entropy

WORLD_SIZES = (2, 3)
# The vocabulary-parallel result differs from one device only by the order of float32 sums
# (log-sum-exp over ranks, partial sums of logits).
TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),  # gradients are bf16; the loss is float32 either way
}
CASES: dict[str, Callable[[int, int], None]] = {}


def case(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """Registers ``fn(rank, world)`` as a case that runs on every rank of every spawned world."""
    CASES[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# Data shared by the ranks
# ---------------------------------------------------------------------------------------------


def split_sizes(vocab_size: int, world: int, layout: str) -> list[int]:
    """``"even"``: as equal as possible, larger slices first; ``"skewed"``: 1 column on every rank but the last."""
    if layout == "even":
        return [vocab_size // world + (r < vocab_size % world) for r in range(world)]
    return [1] * (world - 1) + [vocab_size - (world - 1)]


def column_range(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_logits_case(seed: int, shape=(3, 5), vocab_size: int = 11, scale: float = 3.0, dtype=torch.float32):
    """Whole logits ``(*shape, V)``, targets with some -100, mask, token weights and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab_size, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab_size, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.2] = -100
    mask = torch.rand(shape, generator=gen) < 0.7
    token_weights = torch.rand(shape, generator=gen, dtype=torch.float64).float() + 0.5
    return logits, targets, mask, token_weights


def upstream_gradient(loss: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype) + 0.5


def compare_logits_variant(rank: int, world: int, *, seed: int, layout: str = "even", explicit_sizes=False, **opts):
    """Loss and this rank's gradient slice against tl.cross_entropy of the whole logits (and the float64 loss)."""
    dtype = opts.pop("dtype", torch.float32)
    vocab_size = opts.pop("vocab_size", 11)
    scale = opts.pop("scale", 3.0)
    logits, targets, mask, token_weights = make_logits_case(seed, vocab_size=vocab_size, scale=scale, dtype=dtype)
    if opts.pop("use_mask", False):
        opts["mask"] = mask
    if opts.pop("use_token_weights", False):
        opts["token_weights"] = token_weights
    if "targets" in opts:
        targets = opts.pop("targets")
    if "ignore_index" in opts:
        targets = torch.where(targets == -100, opts["ignore_index"], targets)
    sizes = split_sizes(vocab_size, world, layout)
    cols = column_range(sizes, rank)

    whole = logits.clone().requires_grad_()
    expected = tl.cross_entropy(whole, targets, **opts)
    grad_out = upstream_gradient(expected, seed)
    expected.backward(grad_out)

    shard = logits[..., cols].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(shard, targets, vocab_sizes=sizes if explicit_sizes else None, **opts)
    got.backward(grad_out)

    tol = TOLERANCES[dtype]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close(got, expected, **TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32])
    assert_close(shard.grad, whole.grad[..., cols], **tol)
    ref_opts = {k: v for k, v in opts.items() if k not in ("check_inputs", "chunk_size")}
    reference = reference_cross_entropy(logits, targets, **ref_opts).to(got.dtype)
    ref_tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.float64 else TOLERANCES[torch.float64]
    assert_close(got, reference, **ref_tol)


# ---------------------------------------------------------------------------------------------
# Cases: vocab_parallel_cross_entropy
# ---------------------------------------------------------------------------------------------

OPTION_CASES = {
    "plain": {},
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing_one": dict(label_smoothing=1.0),
    "z_loss": dict(z_loss=0.01),
    "softcap": dict(softcap=2.0, scale=6.0),
    "focal_gamma_2": dict(focal_gamma=2.0),
    "focal_gamma_half": dict(focal_gamma=0.5),
    "mask": dict(use_mask=True),
    "shift": dict(shift=True),
    "token_weights": dict(use_token_weights=True),
    "num_items": dict(num_items=7),
    "num_items_tensor": dict(num_items=torch.tensor(9.0)),
    "reduction_sum": dict(reduction="sum"),
    "reduction_none": dict(reduction="none"),
    "reduction_none_shift": dict(reduction="none", shift=True),
    "ignore_index_custom": dict(ignore_index=3),
    "chunk_size_2": dict(chunk_size=2),
    "large_logits": dict(scale=80.0),
    "check_inputs_off": dict(check_inputs=False),
    "float64": dict(dtype=torch.float64),
    "bfloat16": dict(dtype=torch.bfloat16),
    "all_options": dict(
        label_smoothing=0.2,
        z_loss=1e-3,
        softcap=4.0,
        focal_gamma=1.5,
        use_mask=True,
        shift=True,
        use_token_weights=True,
        reduction="none",
        chunk_size=4,
    ),
    "all_options_mean": dict(
        label_smoothing=0.05, z_loss=1e-2, softcap=3.0, focal_gamma=2.0, use_mask=True, shift=True, num_items=5
    ),
}


def _register_option_case(name: str, opts: dict) -> None:
    def run(rank: int, world: int) -> None:
        for seed, layout, explicit in ((0, "even", False), (1, "skewed", True)):
            compare_logits_variant(rank, world, seed=seed, layout=layout, explicit_sizes=explicit, **dict(opts))

    run.__name__ = f"logits_{name}"
    case(run)


for _name, _opts in OPTION_CASES.items():
    _register_option_case(_name, _opts)


@case
def logits_vocab_of_world_size(rank: int, world: int) -> None:
    """V equal to the world size: one column per rank."""
    compare_logits_variant(rank, world, seed=3, vocab_size=world, label_smoothing=0.1)


@case
def logits_targets_all_on_last_rank(rank: int, world: int) -> None:
    """Every target lies on the last rank: the others contribute only to the log-sum-exp."""
    targets = torch.full((3, 5), 10)
    compare_logits_variant(rank, world, seed=4, targets=targets, label_smoothing=0.1, focal_gamma=1.0)


@case
def logits_nothing_counts(rank: int, world: int) -> None:
    """All targets ignored: exactly 0 loss and 0 gradients, as on one device."""
    logits, _, _, _ = make_logits_case(5)
    shard = logits[..., column_range(split_sizes(11, world, "even"), rank)].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, torch.full((3, 5), -100), z_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(shard.grad) == 0


@case
def logits_one_dimensional_rows(rank: int, world: int) -> None:
    """Logits shaped (N, V_local) with targets (N,)."""
    logits, targets, _, _ = make_logits_case(6, shape=(7,))
    cols = column_range(split_sizes(11, world, "even"), rank)
    whole, shard = logits.clone().requires_grad_(), logits[:, cols].clone().requires_grad_()
    tl.cross_entropy(whole, targets, label_smoothing=0.3).backward()
    vocab_parallel_cross_entropy(shard, targets, label_smoothing=0.3).backward()
    assert_close(shard.grad, whole.grad[:, cols], **TOLERANCES[torch.float32])


@case
def logits_only_o_of_n_numbers_exchanged(rank: int, world: int) -> None:
    """Per call: one all_gather of world ints and all_reduces of at most 3N numbers, never a logits slice."""
    logits, targets, _, _ = make_logits_case(7, vocab_size=40)
    n_rows = targets.numel()
    shard = logits[..., column_range(split_sizes(40, world, "even"), rank)].clone().requires_grad_()
    with record_collectives() as calls:
        loss = vocab_parallel_cross_entropy(shard, targets, label_smoothing=0.1, z_loss=0.01)
        loss.backward()
    assert [name for name, _ in calls] == ["all_gather", "all_reduce", "all_reduce"], calls
    assert calls[0][1] == world and calls[1][1] == n_rows and calls[2][1] == 3 * n_rows, calls


@case
def logits_errors_raise_on_every_rank(rank: int, world: int) -> None:
    """A target outside the whole V, bad vocab_sizes and NaN in one rank's slice raise ValueError on all ranks."""
    logits, targets, _, _ = make_logits_case(8)
    sizes = split_sizes(11, world, "even")
    shard = logits[..., column_range(sizes, rank)]
    bad = targets.clone()
    bad[0, 0] = 11
    with pytest.raises(ValueError, match="targets must be in \\[0, 11\\)"):
        vocab_parallel_cross_entropy(shard, bad)
    with pytest.raises(ValueError, match="vocab_sizes must list"):
        vocab_parallel_cross_entropy(shard, targets, vocab_sizes=sizes[:-1])
    with pytest.raises(ValueError, match="this rank's shard has"):
        vocab_parallel_cross_entropy(shard, targets, vocab_sizes=[s + 1 for s in sizes])
    poisoned = shard.clone()
    counted_row = int((targets.reshape(-1) != -100).nonzero()[0, 0])
    if rank == world - 1:
        poisoned.reshape(-1, shard.shape[-1])[counted_row, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in 1 counted row"):
        vocab_parallel_cross_entropy(poisoned, targets)


@case
def logits_non_finite_ignored_row(rank: int, world: int) -> None:
    """NaN and inf logits in rows that do not count leave the loss finite and their gradients exactly 0,
    as on one device."""
    logits, targets, _, _ = make_logits_case(9)
    targets[0, 1] = targets[2, 3] = -100
    logits[0, 1, 4] = float("nan")
    logits[2, 3, :] = float("inf")
    cols = column_range(split_sizes(11, world, "skewed"), rank)
    whole, shard = logits.clone().requires_grad_(), logits[..., cols].clone().requires_grad_()
    expected = tl.cross_entropy(whole, targets, label_smoothing=0.1)
    expected.backward()
    got = vocab_parallel_cross_entropy(shard, targets, label_smoothing=0.1)
    got.backward()
    assert torch.isfinite(got)
    assert_close(got, expected, **TOLERANCES[torch.float32])
    assert_close(shard.grad, whole.grad[..., cols], **TOLERANCES[torch.float32])
    assert torch.count_nonzero(shard.grad[0, 1]) == 0 and torch.count_nonzero(shard.grad[2, 3]) == 0


# ---------------------------------------------------------------------------------------------
# Cases: vocab_parallel_linear_cross_entropy
# ---------------------------------------------------------------------------------------------


def compare_linear_variant(rank: int, world: int, *, seed: int, layout: str, bias: bool, dtype=torch.float32, **opts):
    """Loss and gradients (hidden, weight slice, bias slice) against the single-device loss of the whole head."""
    vocab_size, dim = 13, 6
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, dim, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(vocab_size, dim, generator=gen, dtype=torch.float64).to(dtype)
    bias_full = torch.randn(vocab_size, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    _, targets, mask, token_weights = make_logits_case(seed, vocab_size=vocab_size)
    if "ignore_index" in opts:
        targets = torch.where(targets == -100, opts["ignore_index"], targets)
    if opts.pop("use_mask", False):
        opts["mask"] = mask
    if opts.pop("use_token_weights", False):
        opts["token_weights"] = token_weights
    sizes = split_sizes(vocab_size, world, layout)
    cols = column_range(sizes, rank)

    ref_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias:
        ref_leaves.append(bias_full.clone().requires_grad_())
    expected = tl.cross_entropy(
        F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None), targets, **opts
    )
    grad_out = upstream_gradient(expected, seed)
    expected.backward(grad_out)

    leaves = [hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()]
    if bias:
        leaves.append(bias_full[cols].clone().requires_grad_())
    got = vocab_parallel_linear_cross_entropy(
        leaves[0], leaves[1], targets, bias_shard=leaves[2] if bias else None, **opts
    )
    got.backward(grad_out)

    tol = TOLERANCES[dtype]
    assert_close(got, expected, **tol)
    assert_close(leaves[0].grad, ref_leaves[0].grad, **tol)  # whole hidden gradient on every rank
    assert_close(leaves[1].grad, ref_leaves[1].grad[cols], **tol)
    if bias:
        assert_close(leaves[2].grad, ref_leaves[2].grad[cols], **tol)
    fused = getattr(tl, "linear_cross_entropy", None)
    if fused is not None:  # the single-device fused loss, once it exists
        again = fused(hidden, weight, targets, bias=bias_full, **opts)
        assert_close(got, again, **tol)


LINEAR_CASES = {
    "plain": dict(bias=False),
    "bias": dict(bias=True),
    "reduction_none": dict(bias=True, reduction="none"),
    "reduction_sum_shift": dict(bias=False, reduction="sum", shift=True),
    "ignore_index_custom": dict(bias=False, ignore_index=3),
    "softcap": dict(bias=False, softcap=2.0),
    "focal_gamma": dict(bias=False, focal_gamma=2.0),
    "check_inputs_off": dict(bias=True, check_inputs=False),
    "chunk_size_2": dict(bias=False, chunk_size=2, label_smoothing=0.1),
    "float64": dict(bias=True, dtype=torch.float64, z_loss=0.01),
    "all_options": dict(
        bias=True,
        label_smoothing=0.1,
        z_loss=1e-2,
        softcap=2.0,
        focal_gamma=2.0,
        use_mask=True,
        shift=True,
        use_token_weights=True,
        num_items=6,
    ),
}


def test_cases_cover_every_loss_option() -> None:
    """Both vocabulary-parallel functions are checked with each LossOptions field set away from its
    default: a new option fails here until it has a distributed case."""
    for cases in (OPTION_CASES, LINEAR_CASES):
        covered = set().union(*(opts.keys() for opts in cases.values()))
        missing = set(OPTION_NAMES) - covered
        assert not missing, f"no distributed case sets {sorted(missing)}"


def _register_linear_case(name: str, opts: dict) -> None:
    def run(rank: int, world: int) -> None:
        for seed, layout in ((10, "even"), (11, "skewed")):
            compare_linear_variant(rank, world, seed=seed, layout=layout, **dict(opts))

    run.__name__ = f"linear_{name}"
    case(run)


for _name, _opts in LINEAR_CASES.items():
    _register_linear_case(_name, _opts)


@case
def linear_exchanges_hidden_gradient_once(rank: int, world: int) -> None:
    """Forward: layout + two O(N) all_reduces; backward: one all_reduce of the (N, D) hidden gradient."""
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(split_sizes(9, world, "even")[rank], 6, requires_grad=True)
    targets = torch.arange(4) * 2
    with record_collectives() as calls:
        loss = vocab_parallel_linear_cross_entropy(hidden, weight, targets)
        loss.backward()
    assert [name for name, _ in calls] == ["all_gather", "all_reduce", "all_reduce", "all_reduce"], calls
    assert [n for _, n in calls] == [world, 4, 2 * 4, 4 * 6], calls


@case
def linear_frozen_hidden_needs_no_backward_collective(rank: int, world: int) -> None:
    """With explicit vocab_sizes and a hidden state without grad: two O(N) all_reduces in all, and the
    weight slice still gets its exact gradient."""
    sizes = split_sizes(9, world, "even")
    cols = column_range(sizes, rank)
    gen = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(4, 6, generator=gen), torch.randn(9, 6, generator=gen)
    targets = torch.tensor([0, 8, 4, 2])
    whole = weight.clone().requires_grad_()
    tl.cross_entropy(hidden @ whole.t(), targets).backward()
    shard = weight[cols].clone().requires_grad_()
    with record_collectives() as calls:
        vocab_parallel_linear_cross_entropy(hidden, shard, targets, vocab_sizes=sizes).backward()
    assert [name for name, _ in calls] == ["all_reduce", "all_reduce"], calls
    assert_close(shard.grad, whole.grad[cols], **TOLERANCES[torch.float32])


@case
def linear_non_finite_ignored_row(rank: int, world: int) -> None:
    """An inf hidden state in a row that does not count: the gradients equal those of the batch without that row."""
    sizes = split_sizes(9, world, "even")
    cols = column_range(sizes, rank)
    gen = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(5, 6, generator=gen), torch.randn(9, 6, generator=gen)
    targets = torch.tensor([0, -100, 8, 4, 2])
    hidden[1] = float("inf")
    keep = targets != -100
    ref_hidden, ref_weight = hidden[keep].clone().requires_grad_(), weight.clone().requires_grad_()
    expected = tl.cross_entropy(ref_hidden @ ref_weight.t(), targets[keep])
    expected.backward()
    leaf_hidden, shard = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
    got = vocab_parallel_linear_cross_entropy(leaf_hidden, shard, targets)
    got.backward()
    assert_close(got, expected, **TOLERANCES[torch.float32])
    assert_close(shard.grad, ref_weight.grad[cols], **TOLERANCES[torch.float32])
    assert_close(leaf_hidden.grad[keep], ref_hidden.grad, **TOLERANCES[torch.float32])
    assert torch.count_nonzero(leaf_hidden.grad[1]) == 0


@case
def linear_drops_rows_that_do_not_count(rank: int, world: int) -> None:
    """Rows that are ignored or masked never reach a product: 3 counted rows of 10 give 3 rows of logits
    in the forward and 3 in the backward, and an (3, D) hidden-gradient all_reduce, with the exact result."""
    import tokenloss.distributed as tld

    sizes = split_sizes(9, world, "even")
    cols = column_range(sizes, rank)
    gen = torch.Generator().manual_seed(14)
    hidden, weight = torch.randn(10, 6, generator=gen), torch.randn(9, 6, generator=gen)
    targets = torch.tensor([0, -100, 8, -100, -100, 4, -100, -100, 2, -100])
    mask = torch.ones(10, dtype=torch.bool)
    mask[8] = False  # counted rows: 0, 2, 5
    keep = (targets != -100) & mask
    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = tl.cross_entropy(ref_hidden @ ref_weight.t(), targets, mask=mask)
    expected.backward()
    rows_seen = []
    original = tld._logits_chunk

    def spy(chunk_hidden, *args):
        rows_seen.append(chunk_hidden.shape[0])
        return original(chunk_hidden, *args)

    tld._logits_chunk = spy
    try:
        leaf_hidden, shard = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
        with record_collectives() as calls:
            got = vocab_parallel_linear_cross_entropy(leaf_hidden, shard, targets, mask=mask)
            got.backward()
    finally:
        tld._logits_chunk = original
    assert sum(rows_seen) == 2 * int(keep.sum()) == 6, rows_seen
    assert calls[-1] == ("all_reduce", 3 * 6), calls
    assert_close(got, expected, **TOLERANCES[torch.float32])
    assert_close(shard.grad, ref_weight.grad[cols], **TOLERANCES[torch.float32])
    assert_close(leaf_hidden.grad, ref_hidden.grad, **TOLERANCES[torch.float32])
    assert torch.count_nonzero(leaf_hidden.grad[~keep]) == 0


# ---------------------------------------------------------------------------------------------
# Cases: global_num_items (data parallelism, gradient accumulation)
# ---------------------------------------------------------------------------------------------


def rank_batch(rank: int, micro: int):
    """Rank ``rank``'s micro-batch ``micro``: logits (2, 6, 7), targets with a rank-dependent share of -100, a mask."""
    gen = torch.Generator().manual_seed(100 * rank + micro)
    logits = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64).float()
    targets = torch.randint(0, 7, (2, 6), generator=gen)
    targets[torch.rand(2, 6, generator=gen) < 0.15 * (rank + 1)] = -100
    mask = torch.rand(2, 6, generator=gen) < 0.8
    return logits, targets, mask


@case
def num_items_global_count(rank: int, world: int) -> None:
    """The count equals the counted tokens of all micro-batches of all ranks, with shift, mask and PreparedTargets."""
    micro = [rank_batch(rank, m) for m in range(2)]
    everyone = [rank_batch(r, m) for r in range(world) for m in range(2)]
    for shift in (False, True):
        expected = sum(int((t[..., int(shift) :] != -100).sum()) for _, t, _ in everyone)
        got = global_num_items(*[t for _, t, _ in micro], shift=shift)
        assert got.dtype == torch.int64 and int(got) == expected
        with_mask = sum(int(((t != -100) & m)[..., int(shift) :].sum()) for _, t, m in everyone)
        got = global_num_items(*[t for _, t, _ in micro], mask=[m for _, _, m in micro], shift=shift)
        assert int(got) == with_mask
        prepared = [prepare_targets(t.shape, t, 7, LossOptions(shift=shift), mask=m) for _, t, m in micro]
        assert int(global_num_items(*prepared)) == with_mask


@case
def num_items_data_parallel_equals_one_big_batch(rank: int, world: int) -> None:
    """Summing over ranks and accumulation steps the losses with num_items=global count gives the big batch's mean
    loss and gradients, with a mask and the causal shift."""
    micro = [rank_batch(rank, m) for m in range(2)]
    everyone = [rank_batch(r, m) for r in range(world) for m in range(2)]
    big_logits = torch.cat([lg for lg, _, _ in everyone]).requires_grad_()
    big = tl.cross_entropy(
        big_logits, torch.cat([t for _, t, _ in everyone]), mask=torch.cat([m for _, _, m in everyone]), shift=True
    )
    big.backward()

    num_items = global_num_items(*[t for _, t, _ in micro], mask=[m for _, _, m in micro], shift=True)
    total = torch.zeros(())
    for m, (logits, targets, mask) in enumerate(micro):
        leaf = logits.clone().requires_grad_()
        loss = tl.cross_entropy(leaf, targets, mask=mask, shift=True, num_items=num_items)
        loss.backward()
        total += loss.detach()
        start = (rank * 2 + m) * 2
        assert_close(leaf.grad, big_logits.grad[start : start + 2], **TOLERANCES[torch.float32])
    dist.all_reduce(total)
    assert_close(total, big.detach(), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------
# Helpers run inside the workers
# ---------------------------------------------------------------------------------------------


class record_collectives:  # noqa: N801 - a context manager used like a function
    """Records ``(name, numel)`` of every all_gather / all_reduce made through ``torch.distributed``."""

    def __enter__(self) -> list[tuple[str, int]]:
        self.calls: list[tuple[str, int]] = []
        self._saved = dist.all_gather, dist.all_reduce

        def all_gather(tensor_list, tensor, *args, **kwargs):
            self.calls.append(("all_gather", sum(t.numel() for t in tensor_list)))
            return self._saved[0](tensor_list, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.calls.append(("all_reduce", tensor.numel()))
            return self._saved[1](tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self.calls

    def __exit__(self, *exc_info) -> None:
        dist.all_gather, dist.all_reduce = self._saved


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    errors: dict[str, str | None] = {}
    try:
        for name, fn in CASES.items():
            try:
                fn(rank, world)
                errors[name] = None
            except Exception:  # recorded and reported by the pytest item of this case
                errors[name] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errors))
        dist.destroy_process_group()


def _warm_up_lazy_imports() -> None:
    """Runs once what imports modules lazily (autograd's first backward, assert_close) before forking."""
    leaf = torch.ones(2, requires_grad=True)
    tl.cross_entropy(leaf.unsqueeze(0), torch.tensor([1])).backward()
    assert_close(leaf.grad, leaf.grad)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``spawned(world)`` -> ``{rank: {case: traceback or None}}``, spawning each world size once."""
    results: dict[int, dict[int, dict[str, str | None]]] = {}

    def run(world: int) -> dict[int, dict[str, str | None]]:
        if world not in results:
            out_dir = tmp_path_factory.mktemp(f"world{world}")
            _warm_up_lazy_imports()
            # fork: the children inherit the imported torch instead of importing it again (which takes
            # most of the run time of a spawn on a busy machine); each child sets 1 intra-op thread.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            mp.start_processes(
                _worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True, start_method=method
            )
            results[world] = {r: json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)}
        return results[world]

    return run


# ---------------------------------------------------------------------------------------------
# The pytest items
# ---------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_case_on_every_rank(spawned, name: str, world: int) -> None:
    """The case ``name`` passes on every rank of a gloo group of ``world`` processes."""
    per_rank = spawned(world)
    failures = {r: per_rank[r][name] for r in range(world) if per_rank[r][name] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


def test_needs_initialized_process_group() -> None:
    """Without torch.distributed initialized the vocabulary-parallel losses say what to do."""
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, "targets must have shape \\(2,\\)"),
        (dict(targets=torch.zeros(2)), TypeError, "targets must be an integer tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(logits_shard=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logits_shard must be float32"),
    ],
)
def test_argument_errors_before_any_collective(kwargs, error, match) -> None:
    """Bad arguments raise a clear error before any communication (so no rank waits on a collective)."""
    call = dict(logits_shard=torch.randn(2, 3), targets=torch.tensor([0, 1])) | kwargs
    with pytest.raises(error, match=match):
        vocab_parallel_cross_entropy(call.pop("logits_shard"), call.pop("targets"), **call)


@pytest.mark.parametrize(
    ("weight", "bias", "error", "match"),
    [
        (torch.randn(3, 5), None, ValueError, "weight_shard must have shape"),
        (torch.randn(3, 4, dtype=torch.float64), None, TypeError, "weight_shard must have the dtype of hidden"),
        (torch.randn(3, 4), torch.randn(4), ValueError, "bias_shard must have shape \\(V,\\) = \\(3,\\)"),
    ],
)
def test_linear_argument_errors(weight, bias, error, match) -> None:
    """The linear variant names the argument whose shape or dtype does not fit."""
    with pytest.raises(error, match=match):
        vocab_parallel_linear_cross_entropy(torch.randn(2, 4), weight, torch.tensor([0, 1]), bias_shard=bias)


def test_global_num_items_without_process_group() -> None:
    """Without torch.distributed the count is this process's own, over all micro-batches."""
    first = torch.tensor([[1, 2, -100], [4, -100, 6]])
    second = torch.tensor([[-100, 1, 2]])
    assert int(global_num_items(first, second)) == 6
    assert int(global_num_items(first, second, shift=True)) == 4
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert int(global_num_items(first, mask=mask)) == 3
    with pytest.raises(ValueError, match="one mask per targets"):
        global_num_items(first, second, mask=[mask])
    with pytest.raises(TypeError, match="integer tensor or PreparedTargets"):
        global_num_items(torch.zeros(3))
    with pytest.raises(TypeError, match="at least one"):
        global_num_items()
