"""The README's Python code blocks run as pasted, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced ``python`` block of ``text``."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_the_collector_finds_blocks():
    """The collector is not vacuous: it finds a block and its line."""
    assert python_blocks("x\n```python\na = 1\n```\n") == [(3, "a = 1\n")]
    assert len(python_blocks(README.read_text())) >= 5


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every ```python block of the README runs, in order, in one namespace, in an empty directory."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # name the block that failed
            raise AssertionError(f"the README block at line {line} failed: {error!r}") from error
