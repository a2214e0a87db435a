"""The explain server against careless and hostile clients: DNS rebinding, malformed requests,
bounded work, clean stops. Each class gets a 4xx with a message, never a 500 or a traceback."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from tokenloss.explain import server as server_module
from tokenloss.explain.server import ExplainServer


@pytest.fixture(scope="module")
def server(tiny_model, serve):
    with serve(model=tiny_model, max_text_chars=200, max_body_bytes=16384) as server:
        yield server


def raw_exchange(server, data: bytes, *, read_all: bool = True) -> bytes:
    """Sends ``data`` on one connection and returns everything the server sends until it closes."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=15) as connection:
        connection.sendall(data)
        chunks = []
        while True:
            chunk = connection.recv(65536)
            if not chunk or not read_all:
                chunks.append(chunk)
                break
            chunks.append(chunk)
    return b"".join(chunks)


def post(server, body: bytes, *, host_header: str | None = None, extra: str = "", length: str | None = None) -> bytes:
    host, port = server.server_address[:2]
    host_header = host_header or f"{host}:{port}"
    length = str(len(body)) if length is None else length
    head = (
        f"POST /api/score HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    )
    return raw_exchange(server, head.encode("utf-8") + body)


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def error_message(reply: bytes) -> str:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0] or b"{}").get("error", "")


@pytest.mark.parametrize("host_header", ["evil.example:{port}", "127.0.0.1:1", "attacker.test", "localhost:9"])
def test_foreign_host_headers_are_refused(server, host_header):
    """DNS rebinding: a Host that is not this server gets 421 for the page, the info and scoring."""
    port = server.server_address[1]
    for request in (b"GET / HTTP/1.1", b"GET /api/info HTTP/1.1"):
        reply = raw_exchange(server, request + f"\r\nHost: {host_header.format(port=port)}\r\n\r\n".encode())
        assert status(reply) == 421 and b"open the address it printed" in reply
        assert b"/tmp" not in reply and b"/home" not in reply
    assert status(post(server, b'{"text": "hi there"}', host_header=host_header.format(port=port))) == 421


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "LOCALHOST"])
def test_own_host_names_are_served(server, name):
    port = server.server_address[1]
    reply = raw_exchange(server, f"GET /api/info HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n".encode())
    assert status(reply) == 200


def test_missing_or_repeated_host_is_400(server):
    assert status(raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 400
    port = server.server_address[1]
    twice = f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\nHost: localhost:{port}\r\n\r\n".encode()
    assert status(raw_exchange(server, twice)) == 400


def test_foreign_origin_cannot_post(server):
    port = server.server_address[1]
    assert status(post(server, b'{"text": "hi there"}', extra="Origin: https://evil.example\r\n")) == 403
    assert status(post(server, b'{"text": "hi there"}', extra=f"Origin: http://localhost:{port}\r\n")) == 200


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        (b'{"text": "a"}', 422, "nothing can be scored"),  # one byte, no BOS: nothing to score
        (b'{"text": "\\ud800 lone"}', 400, "lone surrogates"),
        (b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "JSON"),
        (b'{"text": "hi", "n": ' + b"9" * 5000 + b"}", 400, "JSON"),
        (b'{"text": "   "}', 400, "empty"),
    ],
    ids=["nothing-to-score", "lone-surrogate", "deep-nesting", "huge-number", "blank"],
)
def test_client_mistakes_are_4xx_with_a_message(server, body, code, needle):
    reply = post(server, body)
    assert status(reply) == code and needle in error_message(reply)


@pytest.mark.parametrize(
    ("length", "extra"),
    [
        ("１２", ""),  # non-ASCII digits
        ("+12", ""),
        ("12, 12", ""),
        ("12", "Content-Length: 12\r\n"),  # repeated
        ("12", "Transfer-Encoding: chunked\r\n"),
    ],
    ids=["unicode-digits", "sign", "list", "duplicate", "transfer-encoding"],
)
def test_bad_framing_is_400_and_closes_the_connection(server, length, extra):
    """A malformed Content-Length or any Transfer-Encoding: 400, and the connection is closed, so the
    bytes after the headers are never read as a second request."""
    smuggled = b'{"text": "hi"}GET /api/info HTTP/1.1\r\nHost: x\r\n\r\n'
    reply = post(server, smuggled, length=length, extra=extra)
    assert status(reply) == 400
    assert reply.count(b"HTTP/1.1 ") == 1  # one response, then the server closed


def test_token_limit_counts_tokens(tiny_model, serve):
    """The limit that bounds the work is in tokens: 60 CJK characters are 180 byte tokens."""
    with serve(model=tiny_model, max_tokens=100) as server:
        reply = post(server, json.dumps({"text": "字" * 60}).encode())
        assert status(reply) == 413 and "180 tokens" in error_message(reply)
        assert status(post(server, json.dumps({"text": "a" * 60}).encode())) == 200


def test_silent_connections_time_out_and_workers_are_bounded(tiny_model, serve, monkeypatch):
    """A connection that sends nothing is closed after the timeout; beyond MAX_WORKERS, 503 at once."""
    monkeypatch.setattr(server_module.ExplainHandler, "timeout", 0.5)
    monkeypatch.setattr(server_module, "MAX_WORKERS", 1)
    with serve(model=tiny_model) as server:
        host, port = server.server_address[:2]
        idle = socket.create_connection((host, port), timeout=10)
        time.sleep(0.1)  # the idle connection holds the only worker
        busy = raw_exchange(server, f"GET /api/info HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert status(busy) == 503
        start = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server's socket timeout
        assert time.monotonic() - start < 5
        idle.close()


def test_client_that_disconnects_early_prints_nothing(server, capfd):
    host, port = server.server_address[:2]
    for _ in range(3):
        with socket.create_connection((host, port), timeout=5) as connection:
            connection.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        # closed without reading the reply
    time.sleep(0.3)
    assert "Traceback" not in capfd.readouterr().err


def test_ipv6_loopback_works(tiny_model):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = ExplainServer("::1", 0, model=tiny_model)
    except OSError as error:
        pytest.skip(f"cannot bind ::1 here: {error}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.url.startswith("http://[::1]:")
        with urllib.request.urlopen(server.url + "api/info", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
