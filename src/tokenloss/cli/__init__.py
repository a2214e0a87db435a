"""The ``tokenloss`` command line: one module per command, each a thin layer over the library.

Known user errors (:class:`tokenloss.cli.errors.CLIError`, ``ValueError``, ``TypeError``, any
``OSError`` such as a missing file, a directory where a file is expected or a read-only directory,
undecodable text, numbers too large for a float, absurdly nested JSON) print one line and exit with
status 2; Ctrl-C prints one line and exits with 130. Set ``TOKENLOSS_DEBUG=1`` to see the full
traceback.
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


def describe_error(error: BaseException) -> str:
    """One line for a user's mistake: what went wrong, with which file, and what to do."""
    if isinstance(error, RecursionError):
        return "the input is nested too deeply to read (JSON nested thousands of levels?)"
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename is not None:
        reason = error.strerror or type(error).__name__
        hints = {
            IsADirectoryError: "a file is expected, not a directory",
            NotADirectoryError: "a part of the path is a file, not a directory",
            PermissionError: "choose a place you may write to",
        }
        hint = next((text for kind, text in hints.items() if isinstance(error, kind)), "")
        return f"{reason}: {error.filename}" + (f" ({hint})" if hint else "")
    if isinstance(error, OverflowError):
        return f"a number is too large to handle: {error}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenloss`` script; returns the exit status."""
    try:
        # With standalone_mode=False click returns a command's `typer.Exit(code)` as its exit code.
        result = app(args=argv, standalone_mode=False)
    except SystemExit as exit_:  # pragma: no cover - typer/click exit paths
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        if os.environ.get("TOKENLOSS_DEBUG"):
            raise
        print("Interrupted.", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, UnicodeError, OverflowError, RecursionError) as error:
        if os.environ.get("TOKENLOSS_DEBUG"):
            raise
        print(f"Error: {describe_error(error)}", file=sys.stderr)
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
