"""``tokenloss train``: train a small byte-level GPT and watch the loss fall from ``log 256``."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from tokenloss.cli.errors import CLIError
from tokenloss.utils.files import write_text_atomically

EXAMPLES = """
Examples:

  tokenloss train                    # 600 steps on Python's own docstrings, about 2 minutes on one core

  tokenloss train --out runs/doc --seed 1       # keep the model, log.jsonl and loss.png

  tokenloss train --text book.txt --steps 2000 --patience 5 --out runs/book

  tokenloss curve runs/doc/log.jsonl --vocab-size 256   # read the log afterwards
"""

LOG_V = math.log(256)


def train_command(
    text: Annotated[
        Path | None,
        typer.Option(
            "--text", help="UTF-8 (or any) text file to learn; default: Python's standard-library docstrings."
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Most optimizer steps (early stopping may end sooner).")] = 600,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Directory for config.json, model.safetensors, log.jsonl, loss.png, training.json."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the weights and the batches.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = 16,
    block_size: Annotated[int, typer.Option("--block-size", help="Context length in bytes.")] = 128,
    n_layer: Annotated[int, typer.Option("--n-layer", help="Transformer blocks.")] = 2,
    n_head: Annotated[int, typer.Option("--n-head", help="Attention heads.")] = 4,
    n_embd: Annotated[int, typer.Option("--n-embd", help="Hidden width.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup then cosine).")] = 3e-3,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = 30,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of the text held out for validation.")
    ] = 0.1,
    eval_interval: Annotated[int, typer.Option("--eval-interval", help="Evaluate validation loss every N steps.")] = 50,
    patience: Annotated[
        int, typer.Option("--patience", help="Stop after N evaluations without improvement (0: never).")
    ] = 3,
    threads: Annotated[
        int,
        typer.Option("--threads", help="CPU threads for torch (1 is fastest for this small model on a busy machine)."),
    ] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run files in a non-empty --out (other files are kept).")
    ] = False,
) -> int:
    """Train a small byte-level GPT (V = 256) and report how its loss fell from log V."""
    import torch

    from tokenloss.models.bytegpt import GPTConfig
    from tokenloss.training.corpus import corpus_fingerprint, default_corpus
    from tokenloss.training.loop import ByteDataset, TrainConfig, train

    if threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    if out is not None:
        prepare_out_dir(out, overwrite=overwrite)
    torch.set_num_threads(threads)
    model_config = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=warmup_steps,
        val_fraction=val_fraction,
        eval_interval=eval_interval,
        patience=patience,
        seed=seed,
    )
    if text is None:
        data = default_corpus().encode("utf-8")
        source = "Python's standard-library docstrings (tokenloss.training.corpus)"
    else:
        if not text.is_file():
            raise FileNotFoundError(f"--text: no such file: {text}")
        data = text.read_bytes()
        source = str(text)
    dataset = ByteDataset.from_bytes(data, block_size=block_size, val_fraction=val_fraction, source=source)
    result = train(dataset, model_config, config, out_dir=out, progress=progress)

    summary = {
        "command": "tokenloss train " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None,
        "data": {"source": source, **corpus_fingerprint(data)},
        "data_bytes": len(data),
        "train_bytes": len(dataset.train),
        "val_bytes": len(dataset.val),
        "model": {k: v for k, v in model_config.to_dict().items()},
        "train_config": {k: v for k, v in vars(config).items()},
        "torch": torch.__version__,
        "threads": threads,
        "log_v": LOG_V,
        **result.summary(),
    }
    if out is not None:
        _write_outputs(out, summary)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(_summary_text(summary, out))
    if result.interrupted_at is not None:
        where = f"; the log, the best model so far and training.json are in {out}" if out is not None else ""
        typer.echo(f"Interrupted at step {result.interrupted_at}{where}.", err=True)
        return 130
    return 0


#: The files a run writes into --out.
RUN_FILES = ("config.json", "model.safetensors", "log.jsonl", "loss.png", "training.json")


def prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    """Makes ``out`` ready for a run: a new or empty directory, or (with ``overwrite``) one whose
    run files are removed first, so that no directory ever mixes the files of two runs.

    Raises:
        CLIError: ``out`` is a file, or a non-empty directory without ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise CLIError(
            f"--out {str(out)!r} already holds files ({shown}); pass --overwrite to replace the run files "
            "there, or choose a new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _write_outputs(out: Path, summary: dict) -> None:
    from tokenloss.training.curves import plot_runs, read_log

    write_text_atomically(out / "training.json", json.dumps(summary, indent=2) + "\n")
    run = read_log(out / "log.jsonl", name="ByteGPT")
    try:
        plot_runs([run], out / "loss.png", vocab_size=256, title="tokenloss train: next-byte loss")
    except ImportError:
        typer.echo("note: matplotlib is not installed, no loss.png (pip install 'tokenloss[plot]')", err=True)


def _summary_text(s: dict, out: Path | None) -> str:
    first = s["first_loss"]
    near = abs(first - LOG_V) <= 0.1
    model = s["model"]
    val, best = s["final_val_loss"], s["best_val_loss"]
    lines = [
        f"data:  {s['data']['source']}: {s['data_bytes']:,} bytes "
        f"(train {s['train_bytes']:,}, validation {s['val_bytes']:,})",
        f"model: ByteGPT, {model['n_layer']} layers x {model['n_embd']} wide, {s['params']:,} parameters, "
        f"context {model['block_size']} bytes",
        f"start: first loss {first:.3f} nats at step 0; log V = ln 256 = {LOG_V:.3f} "
        + (
            "-> as expected: the untrained model guesses uniformly over the 256 bytes"
            if near
            else f"-> NOT within 0.1 of log V (off by {first - LOG_V:+.3f}): the initial guess is not uniform"
        ),
        f"end:   validation loss {val:.3f} nats = {val / math.log(2):.3f} bits/byte, perplexity {math.exp(val):.2f} "
        f"(whole validation split; best periodic evaluation {best:.3f} at step {s['best_step']}), "
        f"{LOG_V - val:.3f} nats below log V",
        f"       last training loss {s['final_train_loss']:.3f} (perplexity {math.exp(s['final_train_loss']):.2f})",
        f"run:   {s['steps_run']} steps"
        + (" (early stop: validation stopped improving)" if s["stopped_early"] else "")
        + (f" (interrupted at step {s['interrupted_at']})" if s.get("interrupted_at") is not None else "")
        + f", {s['tokens']:,} bytes seen, {s['elapsed_s']:.0f} s wall, {s['cpu_s']:.0f} s CPU "
        + f"({s['tokens'] / max(s['elapsed_s'], 1e-9):,.0f} bytes/s)",
    ]
    if out is not None:
        names = RUN_FILES
        lines.append(f"wrote: {', '.join(str(out / n) for n in names if (out / n).exists())}")
    else:
        lines.append("(pass --out DIR to keep the model, the log and the plot)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Adds ``train`` to the ``tokenloss`` app."""
    app.command("train", help=(train_command.__doc__ or "") + "\n\n" + EXAMPLES, epilog=None)(train_command)
