"""Benchmark: time and peak memory of cross-entropy forward+backward, tokenloss vs F.cross_entropy.

Compares, on float32 logits on the CPU:

- ``tokenloss``: ``tl.cross_entropy(logits, targets)``, the default path;
- ``tokenloss inplace``: the same with ``inplace_backward=True`` (the gradient overwrites the logits);
- ``torch eager``: ``F.cross_entropy(logits, targets)``;
- ``torch.compile``: ``torch.compile(F.cross_entropy)`` (Inductor; compiled once before timing).

Time: each shape runs in one fresh worker process that times every implementation in
interleaved rounds (round r runs all of them, in a rotated order), so that the ratio of a row is
measured side by side on the same machine state; the table gives the median and the 10% / 90%
quantiles over ``--repeats`` rounds, after one warm-up round.

Peak memory: each (shape, implementation) runs in its own fresh worker process. After a warm-up
step, the process's peak resident set (``VmHWM``) is reset through ``/proc/self/clear_refs``; one
forward+backward then runs, and the table gives the growth of the peak over the resident set
before the step: the memory used *beyond* the input logits, including the gradient that is
returned (Linux only; elsewhere the column is empty).

Run (full size: up to about 10 GiB of RAM at V = 128256, so take the machine's heavy-job lock)::

    flock /tmp/tokenloss-heavy.lock .venv/bin/python benchmarks/bench_cross_entropy.py
    .venv/bin/python benchmarks/bench_cross_entropy.py --quick          # small and fast
    .venv/bin/python benchmarks/bench_cross_entropy.py --shapes 2048x32000 --repeats 5 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

IMPLEMENTATIONS = ("tokenloss", "tokenloss inplace", "torch eager", "torch.compile")
FULL_SHAPES = "8192x32000,4096x128256"
QUICK_SHAPES = "1024x32000"


# --- worker side -----------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` value of this process in KiB from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Resets this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _loss_function(impl: str) -> Callable:
    import torch
    import torch.nn.functional as F

    import tokenloss as tl

    if impl == "tokenloss":
        return tl.cross_entropy
    if impl == "tokenloss inplace":
        return lambda logits, targets: tl.cross_entropy(logits, targets, inplace_backward=True)
    if impl == "torch eager":
        return F.cross_entropy
    if impl == "torch.compile":
        return torch.compile(F.cross_entropy, dynamic=False)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


class _Case:
    """The inputs of one shape, and one forward+backward step of an implementation on them."""

    def __init__(self, n_rows: int, vocab_size: int, seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.source = torch.randn(n_rows, vocab_size, generator=gen).mul_(4.0)  # (N, V) float32
        self.targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)  # (N,) int64
        self.logits = self.source.clone().requires_grad_()  # (N, V) the leaf that gets .grad

    def restore(self, impl: str) -> None:
        """Gives the logits back their values (an in-place backward overwrote them); untimed."""
        import torch

        self.logits.grad = None
        if impl == "tokenloss inplace":
            with torch.no_grad():
                self.logits.copy_(self.source)

    def step(self, loss_fn: Callable) -> None:
        loss = loss_fn(self.logits, self.targets)
        loss.backward()


def worker_time(n_rows: int, vocab_size: int, impls: list[str], repeats: int, threads: int) -> dict:
    """Times ``impls`` in interleaved rounds on one shape; returns ``{impl: [seconds, ...]}``."""
    import torch

    torch.set_num_threads(threads)
    case = _Case(n_rows, vocab_size)
    functions = {impl: _loss_function(impl) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_ in range(repeats + 1):  # round 0 warms up (and compiles)
        order = impls[round_ % len(impls) :] + impls[: round_ % len(impls)]
        for impl in order:
            case.restore(impl)
            start = time.perf_counter()
            case.step(functions[impl])
            elapsed = time.perf_counter() - start
            if round_ > 0:
                times[impl].append(elapsed)
    return {"times": times}


def worker_memory(n_rows: int, vocab_size: int, impl: str, threads: int) -> dict:
    """Peak resident-set growth (bytes) of one forward+backward beyond the inputs, in this process."""
    import gc

    import torch

    torch.set_num_threads(threads)
    case = _Case(n_rows, vocab_size)
    loss_fn = _loss_function(impl)
    case.step(loss_fn)  # warm-up: compiles, and loads every lazily imported module
    case.restore(impl)
    gc.collect()
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak():
        return {"peak_bytes": None}
    case.step(loss_fn)
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024}


# --- driver side -----------------------------------------------------------------------------


def _run_worker(kind: str, payload: dict) -> dict:
    """Runs ``worker_<kind>(**payload)`` in a fresh Python process and returns its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(payload)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed for {payload}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(shapes: list[tuple[int, int]], impls: list[str], repeats: int, threads: int, memory: bool) -> list[dict]:
    """One result row per (shape, implementation), with ratios to ``torch eager`` of the same shape."""
    rows = []
    for n_rows, vocab_size in shapes:
        timing = _run_worker(
            "time", {"n_rows": n_rows, "vocab_size": vocab_size, "impls": impls, "repeats": repeats, "threads": threads}
        )["times"]
        shape_rows = []
        for impl in impls:
            peak = None
            if memory:
                payload = {"n_rows": n_rows, "vocab_size": vocab_size, "impl": impl, "threads": threads}
                peak = _run_worker("memory", payload)["peak_bytes"]
            samples = timing[impl]
            shape_rows.append(
                {
                    "N": n_rows,
                    "V": vocab_size,
                    "impl": impl,
                    "median_s": statistics.median(samples),
                    "q10_s": _quantile(samples, 0.1),
                    "q90_s": _quantile(samples, 0.9),
                    "peak_bytes": peak,
                    "logits_bytes": 4 * n_rows * vocab_size,
                }
            )
        baseline = next((row for row in shape_rows if row["impl"] == "torch eager"), None)
        for row in shape_rows:
            if baseline is not None:
                row["time_ratio"] = row["median_s"] / baseline["median_s"]
                if row["peak_bytes"] is not None and baseline["peak_bytes"]:
                    row["memory_ratio"] = row["peak_bytes"] / baseline["peak_bytes"]
        rows.extend(shape_rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows of :func:`measure`."""
    lines = [
        "| (N, V) | implementation | time fwd+bwd, median [q10, q90] | vs eager "
        "| peak memory beyond logits | vs eager |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        mib = row["peak_bytes"] / 2**20 if row["peak_bytes"] is not None else None
        memory = "n/a" if mib is None else f"{mib:,.0f} MiB ({row['peak_bytes'] / row['logits_bytes']:.2f} x logits)"
        time_ratio = f"{row['time_ratio']:.2f}x" if "time_ratio" in row else ""
        memory_ratio = f"{row['memory_ratio']:.2f}x" if "memory_ratio" in row else ""
        lines.append(
            f"| ({row['N']}, {row['V']}) | {row['impl']} | {row['median_s'] * 1e3:,.0f} ms "
            f"[{row['q10_s'] * 1e3:,.0f}, {row['q90_s'] * 1e3:,.0f}] | {time_ratio} | {memory} | {memory_ratio} |"
        )
    return "\n".join(lines)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            n_rows, vocab_size = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes must look like 8192x32000,4096x128256, got {text!r}") from None
        shapes.append((n_rows, vocab_size))
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help=f"comma-separated NxV (default {FULL_SHAPES})")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help=f"small and fast: {QUICK_SHAPES}, 3 rounds")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--no-memory", action="store_true", help="leave out the peak-memory workers")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PAYLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, payload = args.worker
        result = {"time": worker_time, "memory": worker_memory}[kind](**json.loads(payload))
        print(json.dumps(result))
        return 0

    shapes = _parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    repeats = args.repeats or (3 if args.quick else 7)
    impls = [impl for impl in IMPLEMENTATIONS if not (args.no_compile and impl == "torch.compile")]
    import torch

    rows = measure(shapes, impls, repeats, args.threads, memory=not args.no_memory)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"float32 logits, forward+backward, CPU, {args.threads} threads, torch {torch.__version__}, "
        f"median of {repeats} interleaved rounds [10%, 90% quantiles]; ratios against torch eager of the same shape"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
