"""Benchmark: ``tokenloss curve`` on a large JSON Lines log: time of each stage and peak memory.

Writes a synthetic log (a falling loss with 2% multiplicative noise, validation every 500 steps) of
``--megabytes`` MB, then, in a fresh process per reader, times reading it into a run
(:func:`tokenloss.training.curves.read_log`), the checks (:func:`check_run`) and the plot, and
reports the peak resident memory of the process. The ``json.loads`` row times Python's JSON parser
alone on the same lines: the floor of any reader that parses every line.

Run::

    .venv/bin/python benchmarks/bench_curve.py                 # 100 MB, about a minute
    .venv/bin/python benchmarks/bench_curve.py --quick         # 10 MB
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import peak_rss_bytes, reset_peak  # beside this script


def write_log(path: Path, megabytes: float) -> int:
    """A synthetic log of about ``megabytes`` MB; returns its number of lines."""
    rng = random.Random(0)
    lines = 0
    with path.open("w") as handle:
        while handle.tell() < megabytes * 2**20:
            base = 2 + 3 * 0.9999**lines
            record = {"step": lines, "loss": base * (1 + 0.02 * rng.gauss(0, 1)), "lr": 3e-4, "tokens_per_s": 12345.6}
            if lines % 500 == 0:
                record["val_loss"] = base + 0.1
            handle.write(json.dumps(record) + "\n")
            lines += 1
    return lines


def worker(kind: str, path: str) -> dict:
    start_rss = reset_peak()
    times = {}
    if kind == "json.loads":
        start = time.perf_counter()
        with open(path) as handle:
            for line in handle:
                json.loads(line)
        times["read"] = time.perf_counter() - start
    else:
        from tokenloss.training.curves import check_run, plot_runs, read_log

        start = time.perf_counter()
        run = read_log(path)
        times["read"] = time.perf_counter() - start
        start = time.perf_counter()
        check_run(run)
        times["check"] = time.perf_counter() - start
        start = time.perf_counter()
        plot_runs([run], Path(path).with_suffix(".png"))
        times["plot"] = time.perf_counter() - start
    return {"kind": kind, **times, "peak_mib": (peak_rss_bytes() - start_rss) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--quick", action="store_true", help="10 MB")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    megabytes = 10.0 if args.quick else args.megabytes
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.jsonl"
        lines = write_log(path, megabytes)
        rows = []
        for kind in ("json.loads", "tokenloss curve"):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", kind, str(path)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(done.stdout))
    print(f"log: {megabytes:g} MB, {lines:,} lines")
    print("| reader | read s | checks s | plot s | total s | peak memory growth |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        total = row["read"] + row.get("check", 0.0) + row.get("plot", 0.0)
        check, plot = (f"{row[k]:.1f}" if k in row else "-" for k in ("check", "plot"))
        print(f"| {row['kind']} | {row['read']:.1f} | {check} | {plot} | {total:.1f} | {row['peak_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
