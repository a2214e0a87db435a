"""Benchmark of the fused linear + cross-entropy: time and peak extra memory against naive, the matmul floor and CCE.

Inputs: ``hidden`` ``(N, D)`` and ``weight`` ``(V, D)`` float32, both requiring grad, and
all-counted targets. Methods:

- ``naive``: ``F.cross_entropy(hidden @ weight.T, targets)`` and autograd;
- ``floor``: the three matrix products any exact method does (logits, grad_hidden, grad_weight), alone;
- ``tokenloss``: :func:`tokenloss.linear_cross_entropy` (default chunk rule unless ``--chunk-size``);
  ``tokenloss:ROWS`` (e.g. ``tokenloss:1024``) the same with ``chunk_size=ROWS``, to show the
  trade-off between the chunk's memory and the time;
- ``cce``: Apple's Cut Cross-Entropy ``linear_cross_entropy(..., impl="torch_compile")``
  (``pip install cut-cross-entropy``; its Triton kernels need a GPU, its torch.compile path runs here).

Memory: each (shape, method) runs one forward+backward in a fresh Python process (after one
untimed warm-up step for ``cce`` only, where ``torch.compile`` compiles); its peak extra memory is
the peak RSS during the step (VmHWM, reset just before) minus the RSS before it, minus the bytes
of the gradients every method must return (grad_hidden and grad_weight).

Time: one process per shape runs the methods in interleaved rounds (one warm-up round, then
``--repeats`` rounds, the order rotated each round), so that the load of a shared machine hits
every method alike. Reported: the median seconds with the min-max, and ``x floor``, the median
over the rounds of the method's time divided by the floor's time *in the same round* (with the
min-max of those ratios): the machine's speed drifts between rounds, a ratio within one round
mostly cancels that drift.

Run (heavy: about 20 min for the default shapes on 2 quiet cores, 30 on busy ones; hold the heavy-job lock)::

    flock /tmp/tokenloss-heavy.lock .venv/bin/python benchmarks/bench_linear_cross_entropy.py
    .venv/bin/python benchmarks/bench_linear_cross_entropy.py --shapes 1024x256x8000 --repeats 3  # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SHAPES = ("4096x512x32000", "2048x1024x128256")
METHODS = ("naive", "floor", "tokenloss", "cce")


def _step_fn(method: str, chunk_size: int | None):
    """Returns ``step(hidden, weight, targets)`` running one forward+backward of ``method``."""
    import torch
    import torch.nn.functional as F

    if method == "naive":

        def step(hidden, weight, targets):
            F.cross_entropy(hidden @ weight.T, targets).backward()

    elif method == "floor":

        def step(hidden, weight, targets):
            with torch.no_grad():
                logits = hidden @ weight.T  # (N, V)
                hidden.grad = logits @ weight  # (N, D)
                weight.grad = logits.T @ hidden  # (V, D)

    elif method.startswith("tokenloss"):
        import tokenloss as tl

        if method != "tokenloss":  # "tokenloss:ROWS" fixes the chunk size
            chunk_size = int(method.partition(":")[2])

        def step(hidden, weight, targets):
            tl.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size).backward()

    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        def step(hidden, weight, targets):
            cce(hidden, weight, targets, impl="torch_compile").backward()

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return step


def _inputs(shape: tuple[int, int, int]):
    import torch

    n, d, v = shape
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def memory_worker(method: str, shape: tuple[int, int, int], threads: int, chunk_size: int | None) -> dict:
    """One step of ``method`` in this (fresh) process: peak extra bytes beyond the returned gradients."""
    import torch

    from _memory import peak_rss_bytes, reset_peak

    torch.set_num_threads(threads)
    hidden, weight, targets = _inputs(shape)
    step = _step_fn(method, chunk_size)
    if method == "cce":
        step(hidden, weight, targets)  # compile outside the measured step
        hidden.grad = weight.grad = None
    before = reset_peak()
    start = time.perf_counter()
    step(hidden, weight, targets)
    seconds = time.perf_counter() - start
    grad_bytes = (hidden.numel() + weight.numel()) * 4
    return {"method": method, "extra_bytes": peak_rss_bytes() - before - grad_bytes, "first_step_s": seconds}


def time_worker(methods: list[str], shape: tuple[int, int, int], repeats: int, threads: int, chunk_size) -> dict:
    """Times the methods in interleaved rounds in this process: ``{method: [seconds per step]}``.

    Round 0 warms up (and compiles cce) and is not recorded. Each round runs every method once, in
    an order rotated by one place per round, so that no method always follows the same one (naive
    frees 2.5 GB just before whichever runs after it).
    """
    import torch

    torch.set_num_threads(threads)
    hidden, weight, targets = _inputs(shape)
    steps = {method: _step_fn(method, chunk_size) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(repeats + 1):
        shift = round_ % len(methods)
        for method in methods[shift:] + methods[:shift]:
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            steps[method](hidden, weight, targets)
            if round_ > 0:
                times[method].append(time.perf_counter() - start)
    return times


def round_ratios(times: dict[str, list[float]], method: str, baseline: str = "floor") -> list[float]:
    """Per round, ``method``'s time over ``baseline``'s time in the same round.

    On a shared machine the speed drifts by 20% or more between rounds; a ratio taken within one
    round cancels most of that drift, so the median of these ratios is the figure reported.
    """
    return [t / b for t, b in zip(times[method], times[baseline])]


def _ratio_cell(times: dict[str, list[float]], method: str, baseline: str) -> str:
    """``median (min-max)`` of the per-round ratios ``method / baseline``, or ``-``."""
    if baseline not in times:
        return "-"
    ratios = round_ratios(times, method, baseline)
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _print_header(threads: int, repeats: int) -> None:
    print(f"float32, CPU, {threads} threads, {repeats} interleaved rounds (order rotated each round)")
    print("x floor, x cce: median (min-max) over the rounds of the time over that method's time in the same round\n")
    print("| (N, D, V) | method | median s (min-max) | x floor | x cce | peak extra MiB | % of naive |")
    print("|" + "---|" * 7, flush=True)


def print_table(result: dict, methods: list[str]) -> None:
    """Prints the rows of one shape's result (``{"shape", "memory", "times"}``)."""
    memory, times = result["memory"], result["times"]
    naive = memory.get("naive", {}).get("extra_bytes")
    label = f"({result['shape'].replace('x', ', ')})"
    for method in methods:
        if "error" in times:
            print(f"| {label} | {method} | timing failed: {times['error']} | | | | |")
            continue
        med = statistics.median(times[method])
        spread = f"{min(times[method]):.2f}-{max(times[method]):.2f}"
        ratios = f"{_ratio_cell(times, method, 'floor')} | {_ratio_cell(times, method, 'cce')}"
        mem = memory[method]
        if "error" in mem:
            mem_cells = f"failed: {mem['error']} | -"
        else:
            share = f"{100 * mem['extra_bytes'] / naive:.1f}%" if naive else "-"
            mem_cells = f"{mem['extra_bytes'] / 2**20:.0f} | {share}"
        print(f"| {label} | {method} | {med:.2f} ({spread}) | {ratios} | {mem_cells} |", flush=True)


def _run_worker(args, *extra: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--threads", str(args.threads)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _method(text: str) -> str:
    """argparse type of ``--methods``: a name of METHODS or ``tokenloss:ROWS``."""
    name, colon, rows = text.partition(":")
    if text in METHODS or (name == "tokenloss" and colon and rows.isdigit() and int(rows) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(METHODS)} or tokenloss:ROWS")


def _parse_shape(text: str) -> tuple[int, int, int]:
    n, d, v = (int(part) for part in text.lower().split("x"))
    return n, d, v


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxDxV, e.g. 4096x512x32000")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        type=_method,
        help=f"any of {', '.join(METHODS)}, or tokenloss:ROWS for tokenloss with chunk_size=ROWS",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokenloss rows per chunk (default: auto)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--render", type=Path, default=None, help="print the table of a --json file, run nothing")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker is not None:
        shape = _parse_shape(args.shapes[0])
        print(json.dumps(memory_worker(args.memory_worker, shape, args.threads, args.chunk_size)))
        return
    if args.time_worker:
        shape = _parse_shape(args.shapes[0])
        print(json.dumps(time_worker(args.methods, shape, args.repeats, args.threads, args.chunk_size)))
        return

    if args.render is not None:  # re-print a saved run's table
        saved = json.loads(args.render.read_text())
        _print_header(args.threads, len(next(iter(saved[0]["times"].values()))))
        for result in saved:
            print_table(result, list(result["memory"]))
        return
    results = []
    _print_header(args.threads, args.repeats)
    for shape in args.shapes:
        memory = {method: _run_worker(args, "--memory-worker", method, "--shapes", shape) for method in args.methods}
        timing_args = ("--time-worker", "--shapes", shape, "--repeats", str(args.repeats), "--methods", *args.methods)
        times = _run_worker(args, *timing_args)
        result = {"shape": shape, "memory": memory, "times": times}
        results.append(result)
        print_table(result, args.methods)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
