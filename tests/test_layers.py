"""ARCHITECTURE.md's layering holds: each module imports only modules of layers below its own.

Imports made only for type checking count too: a lower layer that needs to
call an upper one declares a protocol of its own (``LiveSink`` for the stores,
``Recipient`` for the hub), as ARCHITECTURE.md says.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import starlette_replay

# Lowest first; a module may import only modules of a lower layer (the modules
# of a package, such as stores/, also import each other). A new module gets its
# row here and in ARCHITECTURE.md's layout.
LAYERS = {
    "_checks": 0,
    "errors": 0,
    "events": 1,
    "metrics": 1,
    "protocol": 2,
    "stores": 2,
    "hub": 3,
    "_client": 3,
    "client": 4,
    "connection": 4,
    "publisher": 5,
    "registry": 5,
    "endpoint": 6,
    "sse": 7,
    "replay": 8,
    "__init__": 9,
    # beside the facade, on its public API: token streams, the MCP event store
    "streams": 9,
    "mcp": 9,
}

PACKAGE = Path(starlette_replay.__file__).parent


def _layer_of(module: str) -> str:
    """``starlette_replay.stores.redis._store`` -> ``stores``; ``starlette_replay`` -> ``__init__``."""
    parts = module.split(".")[1:]
    return parts[0] if parts else "__init__"


def _internal_imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if base == "starlette_replay" and node.module is None:
                found.update(f"starlette_replay.{alias.name}" for alias in node.names)
            else:
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "starlette_replay" or name.startswith("starlette_replay.")}


def _modules() -> list[tuple[str, Path]]:
    found = [("starlette_replay", PACKAGE / "__init__.py")]
    for info in pkgutil.walk_packages([str(PACKAGE)], "starlette_replay."):
        relative = Path(*info.name.split(".")[1:])
        path = PACKAGE / relative / "__init__.py" if info.ispkg else (PACKAGE / relative).with_suffix(".py")
        found.append((info.name, path))
    return found


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[name for name, _ in _modules()])
def test_each_module_imports_only_layers_below_it(module: str, path: Path) -> None:
    layer = _layer_of(module)
    assert layer in LAYERS, f"{module} has no layer: add it to LAYERS here and to ARCHITECTURE.md's layout"
    for imported in sorted(_internal_imports(module, path)):
        other = _layer_of(imported)
        if imported == module or (other == layer and (PACKAGE / layer).is_dir()):
            continue  # itself, or a module of the same package (stores/, _client/)
        assert other in LAYERS, f"{module} imports {imported}, which has no layer"
        assert LAYERS[other] < LAYERS[layer], f"{module} ({layer}) imports {imported} ({other}): a layer above it"


def test_the_hub_and_the_stores_do_not_know_the_layers_above() -> None:
    hub = _internal_imports("starlette_replay.hub", PACKAGE / "hub.py")
    assert not {"starlette_replay.connection", "starlette_replay.replay"} & hub
    connection = _internal_imports("starlette_replay.connection", PACKAGE / "connection.py")
    assert "starlette_replay.replay" not in connection
