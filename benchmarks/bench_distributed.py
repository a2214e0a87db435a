"""Benchmark: per-rank peak memory and bytes exchanged of the vocabulary-parallel losses vs world size (gloo, CPU).

For each world size (default 1, 2, 4) and each variant, ``world`` fresh processes form a gloo group
on this machine; rank ``r`` builds only its own slice of the vocabulary:

- ``logits``: :func:`tokenloss.distributed.vocab_parallel_cross_entropy` of an ``(N, V_local)``
  float32 logits slice; the step returns the gradient of that slice;
- ``linear``: :func:`tokenloss.distributed.vocab_parallel_linear_cross_entropy` of ``(N, D)`` hidden
  states and a ``(V_local, D)`` slice of the LM head; the step returns the gradients of the hidden
  states and of the slice.

Each rank runs one warm-up step, resets its peak resident set (``VmHWM``, through
``/proc/self/clear_refs``, Linux >= 4.0), runs one forward+backward step and reports the growth of
the peak over the resident set before the step: the memory the step needs *beyond* the inputs,
gradients included. The table shows the largest value over the ranks, the size of the rank's input
slice, and the bytes each rank passed to collectives (counted by wrapping ``torch.distributed``'s
``all_gather``/``all_reduce``), which stay ``O(N)`` (``O(N * D)`` for the linear hidden gradient)
whatever V is. Times are the median over ranks of one step, on a shared CPU: indicative only.

Run (about 3 GiB of RAM in all at the default size, so take the machine's heavy-job lock)::

    flock /tmp/tokenloss-heavy.lock .venv/bin/python benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --quick       # small and fast
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _memory import peak_rss_bytes, reset_peak

MIB = 1 << 20


class _CountBytes:
    """Counts the bytes this rank hands to all_gather / all_reduce while active."""

    def __enter__(self):
        self.bytes = 0
        self._saved = dist.all_gather, dist.all_reduce

        def all_gather(tensor_list, tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._saved[0](tensor_list, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._saved[1](tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc_info):
        dist.all_gather, dist.all_reduce = self._saved


def _worker(rank: int, world: int, port: int, config: dict, out_dir: str) -> None:
    from tokenloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(minutes=10)
    )
    n_rows, vocab, dim = config["tokens"], config["vocab"], config["hidden"]
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    gen = torch.Generator().manual_seed(rank)
    targets = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(1234))
    if config["variant"] == "logits":
        shard = torch.randn(n_rows, sizes[rank], generator=gen).requires_grad_()
        leaves = [shard]
        input_bytes = shard.numel() * 4

        def step():
            vocab_parallel_cross_entropy(shard, targets, vocab_sizes=sizes).backward()

    else:
        hidden = torch.randn(n_rows, dim, generator=torch.Generator().manual_seed(99)).requires_grad_()
        weight = (torch.randn(sizes[rank], dim, generator=gen) / dim**0.5).requires_grad_()
        leaves = [hidden, weight]
        input_bytes = (hidden.numel() + weight.numel()) * 4

        def step():
            vocab_parallel_linear_cross_entropy(hidden, weight, targets, vocab_sizes=sizes).backward()

    step()  # warm-up
    for leaf in leaves:
        leaf.grad = None
    dist.barrier()
    base = reset_peak()
    start = time.perf_counter()
    with _CountBytes() as counted:
        step()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() - base
    result = dict(
        rank=rank, peak=peak, input=input_bytes, exchanged=counted.bytes, seconds=seconds, v_local=sizes[rank]
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(variant: str, world: int, config: dict) -> list[dict]:
    """Runs one step on ``world`` fresh processes; returns each rank's measurements."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), dict(config, variant=variant), out_dir), nprocs=world)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N, rows of the batch")
    parser.add_argument("--vocab", type=int, default=128256, help="V, the whole vocabulary")
    parser.add_argument("--hidden", type=int, default=1024, help="D of the linear variant")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--variants", default="logits,linear", help="logits, linear or both")
    parser.add_argument("--quick", action="store_true", help="N=256, V=32000, D=256")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.hidden = 256, 32000, 256
    config = dict(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden)
    worlds = [int(w) for w in args.worlds.split(",")]

    print(f"N = {args.tokens}, V = {args.vocab}, D = {args.hidden} (linear), float32, gloo on CPU, one step per row\n")
    header = (
        "| variant | world | V_local (max) | inputs / rank (MiB) | step peak / rank (MiB) | inputs + peak (MiB) "
        "| exchanged / rank (KiB) | step time (s) |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        for world in worlds:
            ranks = measure(variant, world, config)
            peak = max(r["peak"] for r in ranks)
            inputs = max(r["input"] for r in ranks)
            total = max(r["peak"] + r["input"] for r in ranks)
            print(
                f"| {variant} | {world} | {max(r['v_local'] for r in ranks)} | {inputs / MIB:.0f} | {peak / MIB:.0f} "
                f"| {total / MIB:.0f} | {max(r['exchanged'] for r in ranks) / 1024:.1f} "
                f"| {statistics.median(r['seconds'] for r in ranks):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
