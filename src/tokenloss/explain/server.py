"""The local web server of ``tokenloss explain``: the packaged page, and a JSON endpoint that scores a sentence.

Routes (everything else is 404):

- ``GET /`` and ``GET /static/<name>``: the page's files, read once at start-up from the package's
  ``static/`` folder into memory. A request path is only ever looked up in that fixed table, never
  joined to a folder, so ``/../``, ``%2e%2e`` or an absolute path cannot reach another file.
- ``GET /api/info``: the limits and which model scores sentences (does not load it).
- ``POST /api/score`` with ``{"text": "..."}`` (``Content-Type: application/json``): the model's
  per-token scores (see :func:`scores_to_json`). A body over ``max_body_bytes`` gets 413, a text
  over ``max_text_chars`` characters or ``max_tokens`` tokens 413, a malformed request 400 (a bad
  or repeated ``Content-Length``, any ``Transfer-Encoding``, bad JSON, lone surrogates, a text with
  nothing to score); each error is ``{"error": "<message>"}`` and closes the connection, so no
  unread body is taken for a second request.

Defences of a server on the person's own machine:

- It binds 127.0.0.1 unless told otherwise.
- DNS rebinding: a request whose ``Host`` is not this server's address (``localhost``,
  ``127.0.0.1`` or ``[::1]`` with its port, or the ``--host`` given) gets 421, and a POST whose
  ``Origin`` is another site gets 403. ``/api/info`` names the model, never a path.
- Bounded work: each connection times out after ``TIMEOUT_S`` seconds of silence, at most
  ``MAX_WORKERS`` requests run at once (more get 503), the listen backlog is ``BACKLOG``, and
  scoring runs one request at a time.
- Clean stops: a client that disconnects early is not an error; Ctrl-C waits for the request in
  progress (the scoring threads are joined, not killed mid-computation).

The model is loaded once, on the first scoring request or by :meth:`ExplainServer.load_model`.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tokenloss.evaluation.scoring import TextScores
    from tokenloss.models import CausalLM

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 16 * 1024
MAX_TEXT_CHARS = 1000
MAX_TOKENS = 2048  # what costs time: a byte-level model turns 1000 CJK characters into 3000 tokens
TOP_K = 5
TIMEOUT_S = 10.0
MAX_WORKERS = 8
BACKLOG = 16
_DIGITS = re.compile(r"[0-9]{1,12}")
STATIC_DIR = Path(__file__).resolve().parent / "static"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# Only the page's own files, and no inline script: a slip in the page cannot pull anything from elsewhere.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


_JSON_SHAPE = 'the body must be JSON like {"text": "The quick brown fox"}'


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def load_assets(static_dir: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The route table of the page's files: ``{url path: (content, content type)}``.

    Every regular file directly inside ``static_dir`` with a known suffix becomes
    ``/static/<name>``; ``index.html`` is also ``/``.

    Raises:
        FileNotFoundError: ``static_dir`` or its ``index.html`` is missing (a broken install).
    """
    if not (static_dir / "index.html").is_file():
        raise FileNotFoundError(f"the explain page is missing from the package: no {static_dir / 'index.html'}")
    table: dict[str, tuple[bytes, str]] = {}
    for file in sorted(static_dir.iterdir()):
        content_type = _CONTENT_TYPES.get(file.suffix)
        if file.is_file() and not file.is_symlink() and content_type is not None:
            table[f"/static/{file.name}"] = (file.read_bytes(), content_type)
    table["/"] = table["/static/index.html"]
    return table


class LazyModel:
    """A causal LM loaded on first use, once; ``model`` given up front is used as it is.

    Args:
        model: a loaded :class:`tokenloss.models.CausalLM` (tests inject a tiny one), or None.
        model_path: passed to :func:`tokenloss.models.load_model` when ``model`` is None
            (None: the built-in byte-level demo model).
    """

    def __init__(self, model: CausalLM | None = None, model_path: str | None = None) -> None:
        self._model = model
        self._path = model_path
        self._error: Exception | None = None
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """What the page says about the model: its name, never a filesystem path."""
        if self._model is not None:
            return self._model.name
        return (
            os.path.basename(os.path.normpath(self._path))
            if self._path is not None
            else ("the built-in byte-level demo model")
        )

    def get(self) -> CausalLM:
        """The model, loading it on the first call; a failed load is raised again, not retried."""
        with self._lock:
            if self._model is None and self._error is None:
                from tokenloss.models import load_model

                try:
                    self._model = load_model(self._path)
                except Exception as error:  # kept so that every request reports the same cause
                    self._error = error
            if self._error is not None:
                raise self._error
            return self._model


def _finite(x: float | None, digits: int = 6) -> float | None:
    """``x`` rounded for JSON; None for a missing, NaN or infinite value (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def scores_to_json(scores: TextScores) -> dict:
    """The JSON answer of ``/api/score`` from :func:`tokenloss.evaluation.scoring.score_text`'s result.

    Returns:
        ``{"model", "text", "tokens": [...], "n_scored", "mean_loss_nats", "mean_loss_bits",
        "perplexity"}``. Each token is ``{"text", "start", "end", "scored"}`` (character span in
        ``text``) and, when scored, ``"p"``, ``"loss_nats"``, ``"loss_bits"``, ``"rank"`` (1 = the
        model's top guess), ``"entropy_nats"`` and ``"top"``: ``[{"text", "p"}, ...]``, the model's
        most likely tokens at that position. A token is not scored when the model had nothing to
        predict it from (the first token of a model without a BOS token). The means are over the
        scored tokens, None if there is none.
    """
    tokens = []
    losses = []
    for row in scores.rows():
        entry: dict[str, Any] = {key: row[key] for key in ("start", "end", "scored")}
        entry["text"] = row["token"]
        if row["scored"]:
            loss = -row["log_prob_nats"]
            losses.append(loss)
            entry.update(
                p=_finite(row["probability"], 8),
                loss_nats=_finite(loss),
                loss_bits=_finite(loss / math.log(2)),
                rank=row["rank"],
                entropy_nats=_finite(row["entropy_nats"]),
                top=[{"text": alt["token"], "p": _finite(alt["p"], 8)} for alt in row["top"]],
            )
        tokens.append(entry)
    mean = math.fsum(losses) / len(losses) if losses else None
    return {
        "model": scores.model_name,
        "text": scores.text,
        "tokens": tokens,
        "n_scored": len(losses),
        "mean_loss_nats": _finite(mean),
        "mean_loss_bits": None if mean is None else _finite(mean / math.log(2)),
        "perplexity": None if mean is None else _finite(math.exp(mean), 4),
    }


def _loopback_names(host: str) -> set[str]:
    names = {"localhost", "127.0.0.1", "[::1]"}
    names.add(f"[{host}]" if ":" in host else host)
    return names


class ExplainServer(ThreadingHTTPServer):
    """The explain page's HTTP server (a bounded number of request threads).

    Args:
        host: address to bind (default 127.0.0.1: reachable only from this machine).
        port: port to bind; 0 picks a free one (see :attr:`url`).
        model: an already loaded causal LM to score sentences with (for tests and embedding).
        model_path: what :func:`tokenloss.models.load_model` loads on the first scoring request
            when ``model`` is None (None: the built-in demo model).
        max_text_chars: the longest text ``/api/score`` accepts.
        max_body_bytes: the largest request body ``/api/score`` reads.
        max_tokens: the most tokens a text may turn into.

    Raises:
        OSError: the address cannot be bound (port in use, unknown host).
        ValueError: a limit that is not positive.
    """

    # Request threads are joined on close (not killed mid-computation: a torch op cut off at
    # interpreter exit aborts the process); TIMEOUT_S bounds how long that can take.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        model: CausalLM | None = None,
        model_path: str | None = None,
        max_text_chars: int = MAX_TEXT_CHARS,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        if min(max_text_chars, max_body_bytes, max_tokens) < 1:
            raise ValueError(
                f"max_text_chars, max_body_bytes and max_tokens must be >= 1, got "
                f"{max_text_chars}, {max_body_bytes}, {max_tokens}"
            )
        self.assets = load_assets()
        self.model = LazyModel(model, model_path)
        self.max_text_chars = max_text_chars
        self.max_body_bytes = max_body_bytes
        self.max_tokens = max_tokens
        self._score_lock = threading.Lock()
        self._workers = threading.BoundedSemaphore(MAX_WORKERS)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), ExplainHandler)
        bound_port = self.server_address[1]
        wildcard = host in ("0.0.0.0", "::", "")
        # Host values this server answers to; None (a wildcard bind) accepts any.
        self.allowed_hosts = None if wildcard else {f"{name}:{bound_port}" for name in _loopback_names(host)}

    def load_model(self) -> None:
        """Loads the model now (at start-up), so that a broken one is reported before any request."""
        self.model.get()

    def process_request(self, request, client_address) -> None:
        """Serves the request in a thread if fewer than ``MAX_WORKERS`` run, else answers 503 at once."""
        if not self._workers.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def handle_error(self, request, client_address) -> None:
        """A client that went away (or timed out) is not an error; anything else is one line, no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            return
        print(f"tokenloss explain: a request failed: {type(error).__name__}: {error}", file=sys.stderr)

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8765/``."""
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def info(self) -> dict:
        """The answer of ``/api/info``."""
        return {
            "model": self.model.label,
            "max_text_chars": self.max_text_chars,
            "max_tokens": self.max_tokens,
            "top_k": TOP_K,
        }

    def score(self, text: str) -> dict:
        """Score ``text`` with the model (loading it first if needed), one request at a time.

        Raises:
            RequestError: 413 for a text of more than ``max_tokens`` tokens, 422 for one with
                nothing to score (a single token and no BOS).
        """
        from tokenloss.evaluation.scoring import score_text

        model = self.model.get()
        with self._score_lock:
            n_tokens = len(model.encode(text))
            if n_tokens > self.max_tokens:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the text is {n_tokens} tokens long for this model; the limit is {self.max_tokens} tokens",
                )
            try:
                scores = score_text(model, text, top_k=TOP_K)
            except ValueError as error:  # e.g. a single token and no BOS: nothing to score
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None
        return scores_to_json(scores)


class ExplainHandler(BaseHTTPRequestHandler):
    """Routes requests of :class:`ExplainServer`; see the module docstring."""

    server: ExplainServer
    server_version = "tokenloss-explain"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT_S  # seconds a connection may stay silent (socket timeout)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the terminal shows the address and errors, not one line per request

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json; charset=utf-8")

    def _refuse(self, status: HTTPStatus, message: str, *, head: bool = False) -> None:
        self.close_connection = True
        if head:
            self._send(status, b"", "application/json; charset=utf-8", head=True)
        else:
            self._send_json(status, {"error": message})

    def _host_allowed(self, head: bool = False) -> bool:
        """False (and 400/421 sent) unless the Host header names this server (DNS rebinding)."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            self._refuse(HTTPStatus.BAD_REQUEST, "the request needs exactly one Host header", head=head)
            return False
        allowed = self.server.allowed_hosts
        if allowed is not None and hosts[0].strip().lower() not in allowed:
            self._refuse(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server answers only to {', '.join(sorted(allowed))}; open the address it printed",
                head=head,
            )
            return False
        return True

    def _route_get(self, head: bool) -> None:
        if not self._host_allowed(head):
            return
        path = urlsplit(self.path).path
        if path == "/api/info":
            self._send_json(HTTPStatus.OK, self.server.info())
            return
        asset = self.server.assets.get(path)
        if asset is None:
            self._send(HTTPStatus.NOT_FOUND, b"404: not a file of this page\n", "text/plain; charset=utf-8", head=head)
            return
        self._send(HTTPStatus.OK, asset[0], asset[1], head=head)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._route_get(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route_get(head=True)

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_allowed():
            return
        origin = self.headers.get("Origin")
        allowed = self.server.allowed_hosts
        if origin is not None and allowed is not None and urlsplit(origin).netloc.lower() not in allowed:
            self._refuse(HTTPStatus.FORBIDDEN, "requests from other sites are refused")
            return
        if urlsplit(self.path).path != "/api/score":
            self._refuse(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {urlsplit(self.path).path}")
            return
        try:
            text = self._read_text()
            payload = self.server.score(text)
        except RequestError as error:
            self._refuse(error.status, error.message)
            return
        except Exception as error:  # the model cannot be loaded or run: tell the page, and the terminal, why
            print(f"tokenloss explain: could not score a text: {type(error).__name__}: {error}", file=sys.stderr)
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not score the text: {error}")
            return
        self._send_json(HTTPStatus.OK, payload)

    def _read_text(self) -> str:
        """The ``text`` of a scoring request, checked; the body is read only when its size is allowed."""
        limit = self.server.max_body_bytes
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted: send a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        if len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request needs exactly one Content-Length of ASCII digits")
        length = int(lengths[0].strip())
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is {length} bytes; the limit is {limit} bytes",
            )
        body = self.rfile.read(length)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the text as JSON: Content-Type: application/json"
            )
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # bad JSON, huge integers, deep nesting
            raise RequestError(HTTPStatus.BAD_REQUEST, _JSON_SHAPE) from None
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, _JSON_SHAPE)
        if not text.strip():
            raise RequestError(HTTPStatus.BAD_REQUEST, "the text is empty: type a sentence to score")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "the text holds lone surrogates (broken UTF-16): fix it"
            ) from None
        if len(text) > self.server.max_text_chars:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the text is {len(text)} characters long; the limit is {self.server.max_text_chars} characters",
            )
        return text
