"""The ``tokenloss`` command line: one module per command, each a thin layer over the library.

Known user errors (:class:`tokenloss.cli.errors.CLIError`, ``ValueError``, ``TypeError``,
``FileNotFoundError``) print one line and exit with status 2; set ``TOKENLOSS_DEBUG=1`` to see the
full traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import typer

from tokenloss.cli.errors import CLIError

COMMANDS = ("demo", "eval", "train", "curve", "explain")

app = typer.Typer(
    name="tokenloss",
    help="The cross-entropy loss of language models: compute it, read it, learn it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMANDS:
    if importlib.util.find_spec(f"tokenloss.cli.{_name}") is not None:
        importlib.import_module(f"tokenloss.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenloss`` script; returns the exit status."""
    try:
        # With standalone_mode=False click returns a command's `typer.Exit(code)` as its exit code.
        result = app(args=argv, standalone_mode=False)
    except SystemExit as exit_:  # pragma: no cover - typer/click exit paths
        return int(exit_.code or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, UnicodeDecodeError) as error:
        if os.environ.get("TOKENLOSS_DEBUG"):
            raise
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # click's own usage errors come here with standalone_mode=False
        import click

        if isinstance(error, (click.exceptions.Abort, typer.Abort)):
            print("Aborted.", file=sys.stderr)
            return 1
        # typer >= 0.2x raises its own copy of click's exceptions (subclasses of typer.TyperException)
        if isinstance(error, (click.ClickException, typer.TyperException)) and hasattr(error, "show"):
            error.show()
            return error.exit_code
        raise
    return result if isinstance(result, int) else 0
