"""Tests of the explain page's server: assets only from static/, the scoring endpoint, its limits, the lazy model."""

from __future__ import annotations

import http.client
import json
import math
import socket

import pytest
import torch

import tokenloss.models
from tokenloss.evaluation.scoring import score_text
from tokenloss.explain.server import (
    DEFAULT_HOST,
    MAX_BODY_BYTES,
    MAX_TEXT_CHARS,
    STATIC_DIR,
    ExplainServer,
    load_assets,
)

SERVER_SOURCE_MARK = b"class ExplainHandler"  # a line of server.py: must never be served


@pytest.fixture(scope="module")
def server(tiny_model, serve):
    with serve(model=tiny_model, max_text_chars=200, max_body_bytes=2048) as server:
        yield server


def request(server, method, path, body=None, headers=None):
    """Send one request with ``path`` exactly as given (no normalisation); returns (status, headers, body)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post_json(server, payload, content_type="application/json"):
    body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    return request(server, "POST", "/api/score", body, {"Content-Type": content_type})


def test_default_bind_is_loopback():
    """Without a host the server listens on 127.0.0.1 only."""
    server = ExplainServer(port=0)
    try:
        assert DEFAULT_HOST == "127.0.0.1"
        assert server.server_address[0] == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.server_close()


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/", "text/html", b"tokenloss explain"),
        ("/static/index.html", "text/html", b"<!doctype html>"),
        ("/static/app.js", "text/javascript", b"tokenlossMath"),
        ("/static/math.js", "text/javascript", b"logSumExp"),
        ("/static/style.css", "text/css", b":root"),
        ("/?from=somewhere#top", "text/html", b"tokenloss explain"),
    ],
)
def test_serves_the_page_files(server, path, content_type, needle):
    """The page and its assets come back with their content type and a same-origin-only policy."""
    status, headers, body = request(server, "GET", path)
    assert status == 200
    assert headers["Content-Type"].startswith(content_type)
    assert needle in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_page_uses_no_network_assets():
    """Every file the page references is local: no http(s) URL in the shipped HTML, JS or CSS."""
    for file in STATIC_DIR.iterdir():
        text = file.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), file.name
        assert "https://" not in text, file.name
        assert "@import" not in text, file.name


def test_head_has_headers_without_body(server):
    status, headers, body = request(server, "HEAD", "/static/style.css")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/static/../server.py",
        "/static/../../explain/server.py",
        "/static/%2e%2e/server.py",
        "/static/%2E%2E/server.py",
        "/static/..%2fserver.py",
        "/static/%2e%2e%2fserver.py",
        "/static/.%2e/__init__.py",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/../../../../../../etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/" + str(STATIC_DIR.parent / "server.py"),
        str(STATIC_DIR.parent / "server.py"),
        "/static/app.js/../../server.py",
        "/static/app.js%00.html",
        "/static/",
        "/static",
        "/static/.",
        "/static/App.JS",
        "/server.py",
        "/__init__.py",
    ],
)
def test_never_serves_a_file_outside_static(server, path):
    """Traversal, encoded traversal and absolute paths give 404 and nothing from outside static/."""
    status, _, body = request(server, "GET", path)
    assert status == 404
    assert SERVER_SOURCE_MARK not in body
    assert b"root:" not in body


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/nope"), ("GET", "/favicon.ico"), ("POST", "/api/info")])
def test_unknown_route_is_404(server, method, path):
    status, _, _ = request(server, method, path, b"{}" if method == "POST" else None)
    assert status == 404


def test_assets_are_a_fixed_table_of_static_files():
    """The route table holds exactly the files of static/ (and /), read at start-up."""
    table = load_assets()
    names = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
    assert sorted(table) == sorted(["/"] + [f"/static/{name}" for name in names])
    assert table["/"] == table["/static/index.html"]


def test_info_does_not_load_the_model(server):
    status, _, body = request(server, "GET", "/api/info")
    assert status == 200
    assert json.loads(body) == {"model": "tiny random byte GPT", "max_text_chars": 200, "max_tokens": 2048, "top_k": 5}


def test_score_matches_score_text(server, tiny_model):
    """The endpoint's numbers are score_text's: per-token loss = -log p, rank, top-k, and their mean."""
    text = "Hello, fox!"
    status, _, body = post_json(server, {"text": text})
    assert status == 200
    data = json.loads(body)
    expected = score_text(tiny_model, text, top_k=5)
    assert [t["text"] for t in data["tokens"]] == expected.token_text
    assert [t["scored"] for t in data["tokens"]] == expected.scored.tolist() == [False] + [True] * (len(text) - 1)
    scored = [t for t in data["tokens"] if t["scored"]]
    losses = torch.tensor([t["loss_nats"] for t in scored], dtype=torch.float64)
    torch.testing.assert_close(losses, -expected.log_prob[1:].double(), rtol=0, atol=1e-6)
    probs = torch.tensor([t["p"] for t in scored], dtype=torch.float64)
    torch.testing.assert_close(probs, torch.exp(-losses), rtol=1e-6, atol=1e-8)
    assert [t["rank"] for t in scored] == expected.rank[1:].tolist()
    assert all(len(t["top"]) == 5 and t["top"][0]["p"] >= t["top"][-1]["p"] for t in scored)
    assert data["n_scored"] == len(text) - 1
    mean = float(losses.mean())
    assert data["mean_loss_nats"] == pytest.approx(mean, abs=1e-6)
    assert data["mean_loss_bits"] == pytest.approx(mean / math.log(2), abs=1e-6)
    assert data["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    assert data["model"] == "tiny random byte GPT"


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "message"),
    [
        ({"text": "x" * 201}, "application/json", 413, "the text is 201 characters long; the limit is 200 characters"),
        ({"text": "é" * 300}, "application/json", 413, "the limit is 200 characters"),
        (b'{"text": "' + b"x" * 3000 + b'"}', "application/json", 413, "the limit is 2048 bytes"),
        ({"text": "   "}, "application/json", 400, "the text is empty"),
        ({"words": "hello"}, "application/json", 400, 'JSON like {"text"'),
        ({"text": 42}, "application/json", 400, 'JSON like {"text"'),
        (b"not json", "application/json", 400, 'JSON like {"text"'),
        (b"\xff\xfe", "application/json", 400, 'JSON like {"text"'),
        ({"text": "hi"}, "text/plain", 415, "Content-Type: application/json"),
    ],
)
def test_score_rejects_bad_requests_with_a_clear_json_error(server, payload, content_type, status, message):
    got_status, headers, body = post_json(server, payload, content_type)
    assert got_status == status
    assert headers["Content-Type"].startswith("application/json")
    assert message in json.loads(body)["error"]


def test_score_without_content_length_is_refused(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as raw:
        head = f"POST /api/score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n\r\n"
        raw.sendall(head.encode())
        reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 411")
    assert b"Content-Length" in reply


def test_default_limits_are_bounded():
    assert 0 < MAX_TEXT_CHARS <= 10_000 and 0 < MAX_BODY_BYTES <= 1 << 20
    with pytest.raises(ValueError, match="max_text_chars"):
        ExplainServer(port=0, max_text_chars=0)


def test_model_is_loaded_lazily_and_once(monkeypatch, serve, tiny_model):
    """No load before the first scoring request; one load for many requests."""
    calls = []

    def fake_load_model(path=None, **kwargs):
        calls.append(path)
        return tiny_model

    monkeypatch.setattr(tokenloss.models, "load_model", fake_load_model)
    with serve(model_path="some/dir") as server:
        assert request(server, "GET", "/api/info")[0] == 200
        assert json.loads(request(server, "GET", "/api/info")[2])["model"] == "dir"  # a name, never a path
        assert calls == []
        for _ in range(3):
            assert post_json(server, {"text": "abc"})[0] == 200
    assert calls == ["some/dir"]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (FileNotFoundError("model directory 'nowhere' does not exist"), "model directory 'nowhere' does not exist"),
        (ImportError("No module named 'transformers'"), "No module named 'transformers'"),
    ],
)
def test_failed_model_load_is_reported_not_retried(monkeypatch, serve, capsys, error, message):
    """A model that cannot be loaded gives a JSON 500 naming the cause, on every request, with one load attempt."""
    calls = []

    def broken_load_model(path=None, **kwargs):
        calls.append(path)
        raise error

    monkeypatch.setattr(tokenloss.models, "load_model", broken_load_model)
    with serve(model_path="nowhere") as server:
        for _ in range(2):
            status, _, body = post_json(server, {"text": "abc"})
            assert status == 500
            assert json.loads(body)["error"] == f"could not score the text: {message}"
    assert calls == ["nowhere"]
    assert f"could not score a text: {type(error).__name__}: {message}" in capsys.readouterr().err
