"""``tokenloss explain``: serve the interactive page that teaches the cross-entropy loss, on this machine."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from tokenloss.cli.errors import CLIError
from tokenloss.explain.server import DEFAULT_HOST, ExplainServer

EXAMPLES = """
Examples:

  tokenloss explain                        # opens http://127.0.0.1:8765/

  tokenloss explain --port 0 --no-browser  # any free port, print it

  tokenloss explain --model ./gpt2         # score with a local HF model
"""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_server(host: str, port: int, model_path: str | None):
    """Bind the page's server; a taken port or a bad host becomes a :class:`CLIError`."""
    try:
        return ExplainServer(host, port, model_path=model_path)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            message = f"port {port} on {host} is in use; pick another with --port (--port 0: any free port)"
            raise CLIError(message) from None
        raise CLIError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def run(host: str, port: int, model_path: str | None, open_browser: bool) -> None:
    """Serve the page until Ctrl+C: the command's work, separate from argument parsing."""
    if model_path is not None and not Path(model_path).exists():
        raise FileNotFoundError(f"--model {model_path}: no such file or directory (give a local model folder)")
    server = start_server(host, port, model_path)
    if model_path is not None:  # a broken model is reported now, not on the first request
        try:
            server.load_model()
        except Exception as error:
            server.server_close()
            raise CLIError(f"--model {model_path}: cannot load it: {error}") from None
    url = server.url
    typer.echo(f"tokenloss explain: open {url} in your browser (Ctrl+C to stop)")
    if not _is_loopback(host):
        typer.echo(f"Note: {host} is reachable from other machines; anyone who can reach it can use the page.")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("Stopping: finishing the request in progress...")
    finally:
        server.server_close()  # joins the request threads (each bounded by the socket timeout)
    typer.echo("Stopped.")


def register(app: typer.Typer) -> None:
    """Add the ``explain`` command to the ``tokenloss`` app."""

    @app.command("explain", help="Serve the interactive page that teaches the loss, on this machine.", epilog=EXAMPLES)
    def explain(
        port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port; 0: any free one.")] = 8765,
        host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")] = (
            DEFAULT_HOST
        ),
        model: Annotated[
            str | None,
            typer.Option("--model", "-m", help="Model directory that scores sentences (default: built-in byte GPT)."),
        ] = None,
        no_browser: Annotated[bool, typer.Option("--no-browser", help="Only print the address.")] = False,
    ) -> None:
        run(host, port, model, open_browser=not no_browser)
