"""The test suite's layout: a test module never imports another test module.

Shared helpers live in ``tests/support/`` (or ``tests/conftest.py`` and the other support
modules); importing from a ``test_*.py`` module would make pytest's collection order and one
test file's edits matter to another. Every ``import`` / ``from`` statement counts, also those
inside functions, and in ``tests/fuzz/``; support modules must not import test modules either.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    """A module of this suite (``tests.…``) with a ``test_*`` part, e.g. ``tests.test_login``."""
    parts = dotted.split(".")
    return parts[0] == "tests" and any(part.startswith("test_") for part in parts)


def _package_of(path: Path) -> list[str]:
    """The dotted package a file under ``tests/`` belongs to, e.g. ``["tests", "fuzz"]``."""
    return ["tests", *path.parent.relative_to(TESTS).parts]


def imported_test_modules(path: Path, source: str) -> list[str]:
    """Every test module ``source`` (the text of ``path``) imports, as ``line: dotted.name``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if _is_test_module(module):
                found.append((node.lineno, module))
            elif module.split(".")[0] == "tests":  # ``from tests import test_x``
                found += [
                    (node.lineno, f"{module}.{a.name}")
                    for a in node.names
                    if a.name.startswith("test_")
                ]
    return [f"{line}: {name}" for line, name in sorted(found)]


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts)


def test_no_test_module_imports_another() -> None:
    offenders = {
        str(path.relative_to(TESTS.parent)): hits
        for path in python_files()
        if (hits := imported_test_modules(path, path.read_text()))
    }
    assert offenders == {}, "move shared helpers to tests/support/ and import them from there"


def test_the_check_sees_every_kind_of_import() -> None:
    source = (
        "import tests.test_login\n"
        "from tests.test_refresh import call\n"
        "from tests import test_gate\n"
        "from .test_cli import gateway\n"
        "def f():\n"
        "    from tests.fuzz.test_tokens import x\n"
        "from tests.support.calls import call\n"
        "from tests.fuzz.stack import FuzzStack\n"
        "from . import properties\n"
        "import tests.conftest\n"
        "from aiohttp.test_utils import TestServer\n"
    )
    hits = imported_test_modules(TESTS / "fuzz" / "test_example.py", source)
    assert hits == [
        "1: tests.test_login",
        "2: tests.test_refresh",
        "3: tests.test_gate",
        "4: tests.fuzz.test_cli",
        "6: tests.fuzz.test_tokens",
    ]
