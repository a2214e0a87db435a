"""The kernels compile for a Hopper GPU (sm_90) ahead of time, without one: what the interpreter cannot check.

Triton's interpreter runs kernels as numpy code, so it accepts things the compiler rejects (type
mismatches in ``tl.where``, ``tl.dot`` shapes, control flow on tensors) and says nothing about
shared memory. ``triton.compile`` with an explicit target runs the whole pipeline down to a cubin
(Triton ships ``ptxas``) on a machine without a GPU. The float32/float64 variants of the fused
kernels take up to a minute each to compile on a small CPU, so only bf16 is compiled here; their
shared memory at the default tiles was checked the same way by hand (`_tiles` in
``tokenloss.ops.triton.linear_cross_entropy``).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tokenloss.ops.triton import cross_entropy as triton_ce  # noqa: E402
from tokenloss.ops.triton import linear_cross_entropy as triton_lce  # noqa: E402
from tokenloss.ops.triton.common import kernels_interpreted, triton_dtype  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or kernels_interpreted(triton_ce._row_statistics_kernel),
    reason="kernels are interpreted in this process (TRITON_INTERPRET=1): nothing to compile",
)

SM90 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _compile(kernel, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict, **options):
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}
    signature = {name: signature[name] for name in kernel.arg_names}  # in the kernel's argument order
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=SM90, options=options)


def _plain_kernels(dtype):
    io, acc = SHORT[dtype], "fp64" if dtype == torch.float64 else "fp32"
    acc_t = triton_dtype(torch.float64 if dtype == torch.float64 else torch.float32)
    block = triton_ce.MAX_BLOCK_V
    stats = _compile(
        triton_ce._row_statistics_kernel,
        dict(
            logits_ptr=f"*{io}", targets_ptr="*i64", lse_ptr=f"*{acc}", target_logit_ptr=f"*{acc}",
            logit_sum_ptr=f"*{acc}",
        ),
        dict(n_cols="i32", stride_row="i64", softcap="fp32"),
        dict(HAS_SOFTCAP=True, LABEL_SMOOTHING=True, ACC=acc_t, BLOCK_V=block),
        num_warps=triton_ce.NUM_WARPS,
    )  # fmt: skip
    grad = _compile(
        triton_ce._row_gradient_kernel,
        dict(
            logits_ptr=f"*{io}", grad_ptr=f"*{io}", targets_ptr="*i64", lse_ptr=f"*{acc}", alpha_ptr=f"*{acc}",
            beta_ptr=f"*{acc}", delta_ptr=f"*{acc}",
        ),
        dict(n_cols="i32", stride_row="i64", stride_grad_row="i64", softcap="fp32"),
        dict(HAS_SOFTCAP=True, ACC=acc_t, BLOCK_V=block),
        num_warps=triton_ce.NUM_WARPS,
    )  # fmt: skip
    return [stats, grad]


def _fused_kernels(dtype):
    io, acc = SHORT[dtype], "fp64" if dtype == torch.float64 else "fp32"
    block_m, block_n, block_k, stages = triton_lce._tiles(dtype)
    common = dict(
        HAS_BIAS=True, HAS_SOFTCAP=True, ACC=triton_dtype(torch.float64 if dtype == torch.float64 else torch.float32),
        DOT_FP32=False, PRECISION="ieee", BM=block_m, BN=block_n, BK=block_k,
    )  # fmt: skip
    sizes = dict(n_rows="i32", n_cols="i32", dim="i32", stride_h="i32", stride_w="i32", softcap="fp32")
    inputs = dict(h_ptr=f"*{io}", w_ptr=f"*{io}", b_ptr=f"*{io}", targets_ptr="*i64")
    forward = _compile(
        triton_lce._lse_forward_kernel,
        dict(inputs, lse_part_ptr=f"*{acc}", target_part_ptr=f"*{acc}", sum_part_ptr=f"*{acc}"),
        dict(sizes, cols_per_split="i32"),
        dict(common, LABEL_SMOOTHING=True),
        num_warps=triton_lce.NUM_WARPS, num_stages=stages,
    )  # fmt: skip
    stats = {name: f"*{acc}" for name in ("lse_ptr", "alpha_ptr", "beta_ptr", "delta_ptr")}
    grads = {name: f"*{acc}" for name in ("grad_h_ptr", "grad_w_ptr", "grad_b_ptr")}
    backward = _compile(
        triton_lce._backward_kernel,
        dict(inputs, **stats, **grads),
        sizes,
        dict(common, GRAD_H=True, GRAD_W=True, GRAD_B=True, GROUP=triton_lce.GROUP_M),
        num_warps=triton_lce.NUM_WARPS, num_stages=stages,
    )  # fmt: skip
    return [forward, backward]


@pytest.fixture(autouse=True)
def small_tiles():
    """Overrides conftest's small tiles: here the default (GPU) tiles are what must compile."""


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset:UserWarning")
@pytest.mark.parametrize(
    "kernels, dtype",
    [(_plain_kernels, torch.bfloat16), (_plain_kernels, torch.float64), (_fused_kernels, torch.bfloat16)],
    ids=["plain-bf16", "plain-fp64", "fused-bf16"],
)
def test_kernels_compile_for_sm90_within_shared_memory(kernels, dtype):
    """Every kernel (with softcap, smoothing, bias: the largest variants) compiles to a cubin for sm_90 at the
    default tiles, and needs no more shared memory than an H100 block has."""
    for compiled in kernels(dtype):
        assert compiled.asm["cubin"], compiled.name
        assert compiled.metadata.shared <= H100_SHARED_MEMORY, (compiled.name, compiled.metadata.shared)
