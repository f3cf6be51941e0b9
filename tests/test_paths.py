"""The gateway's own paths are named once (gateway/paths.py), and the handler modules share
through the authentication step, AppKeys and lower modules, never by importing each other.
Both read the package's source; nothing runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gateway import paths

PACKAGE = Path(paths.__file__).resolve().parent
HANDLERS = {"gate", "forward_auth", "login", "logout", "admin"}
OWN_LITERAL = re.compile(r"""["'](/oauth2/[a-z_]*|/healthz|/readyz|/\.well-known/jwks\.json)["']""")


def sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "devidp" not in p.parts]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "gateway":
                names.update(f"gateway.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_own_endpoint_paths_are_string_literals_only_in_paths_py() -> None:
    found = {
        f"{p.relative_to(PACKAGE)}:{m.group(1)}"
        for p in sources()
        if p.name != "paths.py"
        for m in OWN_LITERAL.finditer(p.read_text())
    }
    assert found == set()


def test_no_handler_module_imports_another() -> None:
    for name in HANDLERS:
        imported = imported_modules(PACKAGE / f"{name}.py")
        others = {f"gateway.{h}" for h in HANDLERS - {name}}
        assert imported & others == set(), name
