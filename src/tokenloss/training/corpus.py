"""The default training text: the docstrings of pure-Python standard-library modules, read with ``inspect``.

Nothing is downloaded or shipped: the text comes with Python itself. It is about 0.75 MB of English
prose about programming (plus some code), the same on every machine that runs the same Python
version, in a fixed order: the modules of :data:`MODULES` as listed, and inside each module its own
docstring, then the classes and functions it defines sorted by name, each class followed by its
methods sorted by name. Modules whose contents depend on the operating system (``subprocess``,
``platform``, ``selectors``, ...) are left out on purpose so that Linux, macOS and Windows agree.
A different Python version gives a slightly different text; :func:`corpus_fingerprint` tells them
apart, and ``assets/bytegpt/training.json`` records the fingerprint the shipped model was trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings

# Pure-Python modules present in every CPython 3.10+ build, chosen for long prose docstrings.
MODULES = (
    "textwrap",
    "string",
    "json",
    "json.decoder",
    "json.encoder",
    "argparse",
    "optparse",
    "getopt",
    "collections",
    "collections.abc",
    "functools",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "fractions",
    "_pydecimal",
    "difflib",
    "pathlib",
    "tempfile",
    "glob",
    "fnmatch",
    "filecmp",
    "logging",
    "logging.handlers",
    "unittest.case",
    "doctest",
    "email.message",
    "email.utils",
    "email.header",
    "mailbox",
    "http.client",
    "http.server",
    "http.cookiejar",
    "urllib.parse",
    "urllib.request",
    "smtplib",
    "ftplib",
    "imaplib",
    "socketserver",
    "csv",
    "calendar",
    "typing",
    "dataclasses",
    "enum",
    "abc",
    "numbers",
    "contextlib",
    "inspect",
    "ast",
    "tokenize",
    "pprint",
    "reprlib",
    "copy",
    "weakref",
    "types",
    "operator",
    "warnings",
    "traceback",
    "queue",
    "threading",
    "sched",
    "timeit",
    "trace",
    "profile",
    "pstats",
    "zipfile",
    "tarfile",
    "gzip",
    "base64",
    "quopri",
    "hmac",
    "secrets",
    "ipaddress",
    "html.parser",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "configparser",
    "plistlib",
    "gettext",
    "shlex",
    "cmd",
    "code",
    "codeop",
    "graphlib",
    "wave",
    "colorsys",
    "pkgutil",
    "runpy",
    "pydoc",
    "concurrent.futures._base",
    "asyncio.events",
    "asyncio.tasks",
    "asyncio.queues",
    "importlib.metadata",
)


def _module_docs(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module_name:
            continue  # imported from elsewhere: it belongs to another module's text
        if inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
        elif inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            for _, method in sorted(vars(obj).items()):
                if inspect.isfunction(method) and method.__doc__:
                    docs.append(inspect.getdoc(method) or "")
    return [doc for doc in docs if doc.strip()]


def stdlib_docstrings(modules: tuple[str, ...] = MODULES) -> str:
    """The docstrings of ``modules`` joined by blank lines (see the module docstring for the order).

    A module that this Python does not have is skipped (so the text still builds on a trimmed
    installation; the fingerprint then differs).
    """
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and friends warn when read
        for name in modules:
            try:
                parts.extend(_module_docs(name))
            except ImportError:
                continue
    return "\n\n".join(parts) + "\n"


def default_corpus() -> str:
    """The text ``tokenloss train`` learns from when no ``--text`` is given: :func:`stdlib_docstrings`."""
    return stdlib_docstrings()


def corpus_fingerprint(text: str | bytes) -> dict:
    """Size and SHA-256 of ``text`` (its UTF-8 bytes if a str), with the running Python's version."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "python": ".".join(map(str, sys.version_info[:3])),
    }
