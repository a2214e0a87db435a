"""Tests of ``tokenloss explain``: arguments reach the server, the address is printed, user errors are one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import tokenloss.cli.explain as explain_cli
from tokenloss.cli import main
from tokenloss.explain.server import ExplainServer


@pytest.fixture
def served(monkeypatch):
    """Make serve_forever return at once and record the servers and browser calls the command made."""
    record = {"servers": [], "opened": []}

    def fake_serve_forever(self, poll_interval=0.5):
        record["servers"].append(self)

    monkeypatch.setattr(ExplainServer, "serve_forever", fake_serve_forever)
    monkeypatch.setattr("webbrowser.open", lambda url: record["opened"].append(url))
    return record


def test_help_lists_options_and_examples(capsys):
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--port", "--host", "--model", "--no-browser", "Examples", "tokenloss explain --port 0"):
        assert option in out


def test_arguments_reach_run(monkeypatch, tmp_path):
    """Each option is passed through; the defaults are 127.0.0.1:8765, the built-in model, a browser."""
    calls = []
    monkeypatch.setattr(explain_cli, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["explain"]) == 0
    assert main(["explain", "--port", "0", "--host", "::1", "--model", str(tmp_path), "--no-browser"]) == 0
    assert calls == [
        (("127.0.0.1", 8765, None), {"open_browser": True}),
        (("::1", 0, str(tmp_path)), {"open_browser": False}),
    ]


def test_prints_the_address_and_opens_the_browser(served, capsys):
    assert main(["explain", "--port", "0"]) == 0
    (server,) = served["servers"]
    assert server.server_address[0] == "127.0.0.1"
    out = capsys.readouterr().out
    assert f"open {server.url} in your browser" in out
    assert "reachable from other machines" not in out
    assert served["opened"] == [server.url]


def test_no_browser_and_a_note_for_a_public_host(served, capsys):
    assert main(["explain", "--port", "0", "--host", "0.0.0.0", "--no-browser"]) == 0
    (server,) = served["servers"]
    assert server.server_address[0] == "0.0.0.0"
    assert "Note: 0.0.0.0 is reachable from other machines" in capsys.readouterr().out
    assert served["opened"] == []


def test_model_path_is_passed_to_the_server_and_loaded_at_start(served, tmp_path):
    from tokenloss.models.bytegpt import ByteGPT, GPTConfig

    ByteGPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)).save_pretrained(tmp_path / "mine")
    assert main(["explain", "--port", "0", "--no-browser", "--model", str(tmp_path / "mine")]) == 0
    assert served["servers"][0].model._model is not None  # loaded before serving


def test_a_broken_model_is_found_at_start(served, tmp_path, capsys):
    """A directory that is no model, or a corrupt weights file: one line at start-up, no server."""
    (tmp_path / "empty").mkdir()
    assert main(["explain", "--port", "0", "--no-browser", "--model", str(tmp_path / "empty")]) == 2
    assert "cannot load it" in capsys.readouterr().err
    assert served["servers"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model/dir"], "Error: --model /no/such/model/dir: no such file or directory"),
        (["--host", "999.1.1.1"], "Error: cannot listen on 999.1.1.1:0"),
    ],
)
def test_user_errors_are_one_line(served, capsys, args, message):
    assert main(["explain", "--port", "0", "--no-browser", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert served["servers"] == []


def test_port_in_use_is_a_clear_error(served, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explain", "--port", str(port), "--no-browser"]) == 2
    assert f"Error: port {port} on 127.0.0.1 is in use; pick another with --port" in capsys.readouterr().err


def test_port_out_of_range_is_refused(capsys):
    assert main(["explain", "--port", "70000"]) == 2
    assert "Invalid value for '--port'" in capsys.readouterr().err


def start_explain() -> tuple[subprocess.Popen, str]:
    """`python -m tokenloss explain --port 0 --no-browser` in a child process, and the address it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenloss", "explain", "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    match = re.search(r"open (http://127\.0\.0\.1:\d+/) in your browser", line)
    if match is None:
        process.kill()
        raise AssertionError(f"no address in {line!r}: {process.stderr.read()}")
    return process, match.group(1)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_end_to_end_serves_until_ctrl_c():
    """`python -m tokenloss explain` prints its address, serves the page there, and stops cleanly on Ctrl+C."""
    process, url = start_explain()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"tokenloss explain" in response.read()
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            assert json.loads(response.read())["max_text_chars"] > 0
        score = urllib.request.Request(
            url + "api/score", data=b'{"text": "Hi there"}', headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(score, timeout=60) as response:  # loads the built-in model on first use
            scored = json.loads(response.read())
        assert scored["model"] == "builtin byte GPT" and scored["n_scored"] == len("Hi there") - 1
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Stopped." in out


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_while_scoring_exits_cleanly():
    """SIGINT while a long text is scored: the request finishes or is answered, the process exits 0,
    and nothing aborts ("terminate called without an active exception")."""
    process, url = start_explain()
    try:
        replies = []

        def score():
            data = json.dumps({"text": "The loss is the average surprise. " * 29}).encode()
            request = urllib.request.Request(url + "api/score", data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    replies.append(response.status)
            except OSError as error:
                replies.append(error)

        thread = threading.Thread(target=score)
        thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        thread.join(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "terminate called" not in err and "Traceback" not in err
    assert "Stopped." in out
