"""The command-line entry point: exit codes and one-line errors for user mistakes."""

import pytest
import typer

from tokenloss import cli


@pytest.fixture
def scratch_app(monkeypatch):
    """A throwaway typer app with commands that exit or fail in known ways."""
    app = typer.Typer()

    @app.command("exit-three")
    def exit_three() -> None:
        raise typer.Exit(3)

    @app.command("bad-value")
    def bad_value() -> None:
        raise ValueError("stride must be <= max_length - 1, got 9")

    @app.command("ok")
    def ok() -> None:
        print("fine")

    monkeypatch.setattr(cli, "app", app)
    return app


def test_a_commands_exit_code_is_returned(scratch_app):
    assert cli.main(["exit-three"]) == 3


def test_success_returns_zero(scratch_app, capsys):
    assert cli.main(["ok"]) == 0
    assert capsys.readouterr().out == "fine\n"


def test_user_error_is_one_line_and_status_two(scratch_app, capsys, monkeypatch):
    monkeypatch.delenv("TOKENLOSS_DEBUG", raising=False)
    assert cli.main(["bad-value"]) == 2
    err = capsys.readouterr().err
    assert err == "Error: stride must be <= max_length - 1, got 9\n"


def test_debug_variable_shows_the_traceback(scratch_app, monkeypatch):
    monkeypatch.setenv("TOKENLOSS_DEBUG", "1")
    with pytest.raises(ValueError, match="stride"):
        cli.main(["bad-value"])


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err
