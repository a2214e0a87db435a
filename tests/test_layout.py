"""The package layout: the loss at the top, every other concern in a package that depends on it, never the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenloss"

# What each part of the package may import from tokenloss. "core" is every top-level module and
# ops/ (the loss); each other entry is a subpackage.
ALLOWED = {
    "core": {"core"},
    "utils": {"utils"},
    "models": {"core", "utils", "models"},
    "integrations": {"core", "utils", "integrations"},
    "evaluation": {"core", "utils", "models", "evaluation"},
    "training": {"core", "utils", "models", "evaluation", "training"},
    "explain": {"core", "utils", "models", "evaluation", "explain"},
    "cli": {"core", "utils", "models", "evaluation", "training", "integrations", "explain", "cli"},
}
PACKAGES = set(ALLOWED) - {"core"}


def _part(module: str) -> str:
    """``tokenloss.evaluation.meter`` -> ``evaluation``; a top-level module or ``ops`` -> ``core``.

    ``tokenloss.__main__`` (``python -m tokenloss``) is the command line's entry point.
    """
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "core"


def _module_name(path: Path) -> str:
    relative = path.relative_to(SRC.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every tokenloss module ``path`` imports, at the top or inside a function (``package``: the
    package relative imports start from; by default the one ``path`` is in)."""
    found = set()
    if package is None:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "tokenloss" or name.startswith("tokenloss.")}


SOURCES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    """A module imports only from the parts its layer may depend on (the loss imports no other package)."""
    part = _part(_module_name(path))
    wrong = sorted(name for name in _imports(path) if _part(name) not in ALLOWED[part])
    assert not wrong, f"{path.relative_to(SRC)} ({part}) imports {wrong}; allowed: {sorted(ALLOWED[part])}"


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The layer check is not vacuous: a core module importing evaluation is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tokenloss.evaluation.meter import LossMeter\n")
    assert _part("tokenloss.evaluation.meter.LossMeter") == "evaluation"
    assert "tokenloss.evaluation.meter" in _imports(bad, package="tokenloss")


def test_import_tokenloss_loads_only_the_loss():
    """`import tokenloss` loads the loss and none of the other packages, and needs only torch."""
    code = (
        "import sys, tokenloss; "
        "loaded = sorted(m for m in sys.modules if m.startswith('tokenloss.') and m.split('.')[1] in "
        f"{sorted(PACKAGES)!r}); assert not loaded, loaded; "
        "heavy = sorted({'matplotlib', 'transformers', 'typer', 'triton'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
