"""``tokenloss curve``: read training logs, plot loss and perplexity against step, warn about what looks wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenloss.cli.errors import CLIError

EXAMPLES = """
Examples:

  tokenloss curve runs/doc/log.jsonl --vocab-size 256

  tokenloss curve out/checkpoint-500/trainer_state.json --out curve.png --smooth 0.9

  tokenloss curve a.csv b.csv --label baseline --label "lr 1e-3" --vocab-size 32000

  tokenloss curve metrics.csv --step-col iteration --loss-col train/loss --val-col valid/loss --no-plot

Exit status: 0 when the logs were read (warnings included), 1 with --strict and a warning, 2 for a
malformed log (the message names the file and line).
"""


def curve_command(
    logs: Annotated[
        list[Path],
        typer.Argument(help="trainer_state.json, .jsonl or .csv logs, or directories holding one.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the PNG.")] = Path("curve.png"),
    vocab_size: Annotated[
        int | None, typer.Option("--vocab-size", help="Draw log V and check for 'nothing learned'.")
    ] = None,
    smooth: Annotated[
        float, typer.Option("--smooth", help="EMA smoothing in [0, 1) (0.9 = strong); raw points stay.")
    ] = 0.0,
    fmt: Annotated[str, typer.Option("--format", help="auto, trainer_state, jsonl or csv.")] = "auto",
    step_col: Annotated[
        str | None, typer.Option("--step-col", help="Step column (JSONL/CSV); default: detected.")
    ] = None,
    loss_col: Annotated[str | None, typer.Option("--loss-col", help="Training-loss column; default: detected.")] = None,
    val_col: Annotated[str | None, typer.Option("--val-col", help="Validation-loss column; default: detected.")] = None,
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="Name of each run in order (repeat the option).")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="Plot title.")] = None,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write the PNG (needs matplotlib).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON instead of text.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with status 1 when any warning is found.")] = False,
) -> None:
    """Plot training logs (loss and perplexity vs step) and print a short verdict."""
    from tokenloss.training.curves import check_run, plot_runs, read_log, verdict

    labels = labels or []
    if labels and len(labels) != len(logs):
        raise CLIError(f"--label given {len(labels)} times for {len(logs)} logs; give one per log or none")
    if vocab_size is not None and vocab_size < 1:
        raise CLIError(f"--vocab-size must be >= 1, got {vocab_size}")
    if not 0.0 <= smooth < 1.0:
        raise CLIError(f"--smooth must be in [0, 1), got {smooth}")
    runs = [
        read_log(
            path, fmt=fmt, step_col=step_col, loss_col=loss_col, val_col=val_col, name=labels[i] if labels else None
        )
        for i, path in enumerate(logs)
    ]
    findings = [check_run(run, vocab_size=vocab_size) for run in runs]
    written = None
    if plot:
        try:
            written = plot_runs(runs, out, vocab_size=vocab_size, smoothing=smooth, title=title)
        except ImportError as error:
            raise CLIError(
                f"plotting needs matplotlib ({error}); pip install 'tokenloss[plot]' or pass --no-plot"
            ) from None
    if as_json:
        report = {
            "plot": str(written) if written else None,
            "runs": [
                {
                    "name": run.name,
                    "source": run.source,
                    "train_points": len(run.train),
                    "val_points": len(run.val),
                    "findings": [vars(f) for f in run_findings],
                }
                for run, run_findings in zip(runs, findings)
            ],
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        for run, run_findings in zip(runs, findings):
            typer.echo(verdict(run, run_findings, vocab_size=vocab_size))
        if written:
            typer.echo(f"wrote {written}")
    if strict and any(findings):
        raise SystemExit(1)  # main() returns it as the exit status


def register(app: typer.Typer) -> None:
    """Adds ``curve`` to the ``tokenloss`` app."""
    app.command("curve", help=(curve_command.__doc__ or "") + "\n\n" + EXAMPLES)(curve_command)
