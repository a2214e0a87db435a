"""``tokenloss explain``: serve the interactive page that teaches the cross-entropy loss, on this machine."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import typer

from tokenloss.cli.errors import CLIError

DEFAULT_PORT = 8765

EXAMPLES = """Examples:

  tokenloss explain                        # http://127.0.0.1:8765/, opens your browser

  tokenloss explain --port 0 --no-browser  # any free port; just print the address

  tokenloss explain --model ./my-gpt2      # score sentences with a local Hugging Face model
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
    from tokenloss.explain.server import ExplainServer

    try:
        return ExplainServer(host, port, model_path=model_path)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            message = f"port {port} on {host} is in use; pick another with --port (--port 0: any free port)"
            raise CLIError(message) from None
        raise CLIError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def run(host: str, port: int, model: str | None, open_browser: bool) -> None:
    """Serve the page until Ctrl+C: the command's work, separate from argument parsing."""
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"--model {model}: no such file or directory (give a local model folder)")
    server = start_server(host, port, model)
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
        typer.echo("Stopped.")
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    """Add the ``explain`` command to the ``tokenloss`` app."""

    @app.command("explain", help="Serve the interactive page that teaches the loss, on this machine.", epilog=EXAMPLES)
    def explain(
        port: int = typer.Option(DEFAULT_PORT, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
        model: str = typer.Option(
            None, "--model", help="Local model folder that scores sentences (default: the built-in demo model)."
        ),
        no_browser: bool = typer.Option(False, "--no-browser", help="Only print the address; do not open a browser."),
    ) -> None:
        run(host, port, model, open_browser=not no_browser)
