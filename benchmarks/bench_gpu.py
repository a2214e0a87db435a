"""GPU benchmark of the Triton kernels: forward+backward time and peak memory against PyTorch and the peers.

Run on a CUDA machine (H100/H200), in one command::

    python benchmarks/bench_gpu.py                      # both shapes, bf16
    python benchmarks/bench_gpu.py --shapes 8192,4096,128256 --repeats 10

For each (N, D, V) it times, in one process and side by side:

- plain cross-entropy from ``(N, V)`` bf16 logits: tokenloss ``impl="triton"`` and ``impl="torch"``,
  PyTorch eager ``F.cross_entropy``, ``torch.compile`` of it, and Liger Kernel's
  ``LigerCrossEntropyLoss`` (gradient written in the forward pass); plus tokenloss Triton's achieved
  bandwidth (3 N V bytes x 2: one read forward, one read and one write backward) against the
  device's measured copy bandwidth;
- fused linear cross-entropy from ``(N, D)`` hidden states and a ``(V, D)`` head: tokenloss
  ``impl="triton"`` (recompute-in-backward, the default, and gradient-in-forward), tokenloss
  ``impl="torch"``, PyTorch eager ``F.cross_entropy(h @ W.T)``, ``torch.compile`` of it, Liger's
  ``LigerFusedLinearCrossEntropyLoss`` and Cut Cross-Entropy's ``linear_cross_entropy`` (its default,
  which skips gradient tiles below a threshold, and its exact ``filter_eps=None``).

Peers that are not installed are skipped with a note. Times are medians over ``--repeats`` runs
after warm-up (CUDA events); peak memory is ``max_memory_allocated`` above what the inputs hold,
so it includes the gradients. A contender that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import tokenloss as tl
from tokenloss.options import LossOptions, prepare_targets

SHAPES = [(8192, 4096, 128256), (8192, 4096, 256000)]


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a shape is N,D,V, got {text!r}")
    return parts


def copy_bandwidth(n_bytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s: a ``n_bytes`` device-to-device copy counts 2 n_bytes moved."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


def measure(step: Callable[[], None], repeats: int, warmup: int = 2) -> tuple[float, float, float] | str:
    """``(median seconds, 10% quantile, 90% quantile)`` of forward+backward, or "OOM"; peak memory via the caller."""
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.1), q(0.9)


def peak_memory(step: Callable[[], None]) -> int | str:
    """Bytes allocated at the peak of one step, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def plain_contenders(logits: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, Callable], list[str]]:
    """Forward+backward steps of plain CE on ``logits`` (a leaf), by name; and notes on skipped peers."""
    notes = []

    def step_of(loss_fn):
        def step():
            logits.grad = None
            loss_fn(logits, targets).backward()

        return step

    contenders = {
        "tokenloss triton": step_of(lambda x, t: tl.cross_entropy(x, t, impl="triton", check_inputs=False)),
        "tokenloss torch": step_of(lambda x, t: tl.cross_entropy(x, t, impl="torch", check_inputs=False)),
        "torch eager": step_of(lambda x, t: F.cross_entropy(x.float(), t)),
        "torch.compile": step_of(torch.compile(lambda x, t: F.cross_entropy(x.float(), t))),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        contenders["liger"] = step_of(LigerCrossEntropyLoss())
    except ImportError:
        notes.append("Liger Kernel not installed (pip install liger-kernel): skipped")
    return contenders, notes


def fused_contenders(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, Callable], list[str]]:
    """Forward+backward steps of fused linear CE on leaves ``hidden``/``weight``, by name; and notes."""
    notes = []
    options = LossOptions(check_inputs=False)
    prepared = prepare_targets(tuple(targets.shape), targets, weight.shape[0], options)

    def step_of(loss_fn):
        def step():
            hidden.grad = weight.grad = None
            loss_fn(hidden, weight, targets).backward()

        return step

    def tokenloss_triton(strategy):
        from tokenloss.ops.triton.linear_cross_entropy import linear_cross_entropy_loss

        return lambda h, w, t: linear_cross_entropy_loss(h, w, None, prepared, options, strategy=strategy)

    def eager(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t)

    contenders = {
        "tokenloss triton (recompute)": step_of(tokenloss_triton("recompute")),
        "tokenloss triton (in forward)": step_of(tokenloss_triton("in_forward")),
        "tokenloss torch": step_of(lambda h, w, t: tl.linear_cross_entropy(h, w, t, impl="torch", check_inputs=False)),
        "torch eager": step_of(eager),
        "torch.compile": step_of(torch.compile(eager)),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        contenders["liger"] = step_of(lambda h, w, t: liger(w, h, t))
    except ImportError:
        notes.append("Liger Kernel not installed (pip install liger-kernel): skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        # CCE's default skips gradient tiles whose entries are all below a bf16-scale threshold
        # (approximate); filter_eps=None is its exact mode, the like-for-like comparison.
        contenders["cut cross-entropy (default filter)"] = step_of(lambda h, w, t: cce(h, w, t))
        contenders["cut cross-entropy (exact)"] = step_of(lambda h, w, t: cce(h, w, t, filter_eps=None))
    except ImportError:
        notes.append("Cut Cross-Entropy not installed (pip install cut-cross-entropy): skipped")
    return contenders, notes


def _row(name: str, timing, memory, extra: str = "") -> str:
    if isinstance(timing, str) or isinstance(memory, str):
        return f"| {name} | OOM | OOM | {extra} |"
    median, low, high = timing
    return f"| {name} | {median * 1e3:.2f} ({low * 1e3:.2f}-{high * 1e3:.2f}) | {memory / 2**30:.2f} | {extra} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=SHAPES, help="N,D,V (several allowed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median reported)")
    parser.add_argument("--only", choices=["plain", "fused"], default=None, help="run one of the two tables")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth()
    print(f"# {name}, torch {torch.__version__}, bf16, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    for n, d, v in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        targets = torch.randint(0, v, (n,), device=device, generator=gen)
        if args.only in (None, "plain"):
            logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen).mul_(4).requires_grad_()
            contenders, notes = plain_contenders(logits, targets)
            print(f"## Plain cross-entropy, N={n} V={v} (logits {n * v * 2 / 2**30:.2f} GiB)\n")
            print("| contender | fwd+bwd ms (p10-p90) | peak GiB above inputs | note |\n|---|---|---|---|")
            for label, step in contenders.items():
                timing = measure(step, args.repeats)
                extra = ""
                if label == "tokenloss triton" and not isinstance(timing, str):
                    achieved = 3 * n * v * 2 / timing[0]
                    extra = f"{achieved / 1e9:.0f} GB/s = {100 * achieved / bandwidth:.0f}% of copy"
                print(_row(label, timing, peak_memory(step), extra), flush=True)
            for note in notes:
                print(f"\n{note}")
            print()
            del logits, contenders
            torch.cuda.empty_cache()
        if args.only in (None, "fused"):
            hidden = torch.randn(n, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
            weight = (torch.randn(v, d, device=device, dtype=torch.bfloat16, generator=gen) / d**0.5).requires_grad_()
            contenders, notes = fused_contenders(hidden, weight, targets)
            print(f"## Fused linear cross-entropy, N={n} D={d} V={v} (logits would be {n * v * 2 / 2**30:.2f} GiB)\n")
            print("| contender | fwd+bwd ms (p10-p90) | peak GiB above inputs | note |\n|---|---|---|---|")
            for label, step in contenders.items():
                timing = measure(step, args.repeats)
                extra = ""
                if not isinstance(timing, str):  # 3 products (logits, grad_hidden, grad_weight) are the minimum
                    extra = f"{6 * n * d * v / timing[0] / 1e12:.0f} useful TFLOP/s"
                print(_row(label, timing, peak_memory(step), extra), flush=True)
            for note in notes:
                print(f"\n{note}")
            print()
            del hidden, weight, contenders
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
