"""The import graph of the package (``semmim/`` and ``kernels/`` as ``semmim.kernels``), read
from the source with ``ast``: no cycles among its modules' top-level imports; none either when
the imports inside functions count (a cycle there is a layering error that a later top-level
import turns into an import-time failure), except the one listed in :data:`KNOWN_LAZY_CYCLES`;
and no module imports another module's private (``_name``) names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    out = {}
    for path in [*(ROOT / "semmim").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("").parts
        parts = ["semmim", *rel] if rel[0] == "kernels" else list(rel)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()

# Function-level import cycles that exist on purpose (none: SemMIM.from_pretrained reads through
# semmim.hf_format, which imports no model; the writer, semmim.export, imports the model).
KNOWN_LAZY_CYCLES: list[list[str]] = []


def _imports(name: str, top_only: bool = False) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) of every import in module ``name`` (only
    the module-level ones, run at import time, with ``top_only``)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""])
                base = base.rstrip(".")
            else:
                base = node.module or ""
            found += [(node.lineno, base, a.name) for a in node.names]
    return found


def _edges(top_only: bool = False) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for _, module, what in _imports(name, top_only):
            # `from a import b` imports module a.b when there is one, else a name of a
            target = f"{module}.{what}" if f"{module}.{what}" in MODULES else module
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_module_graph_is_read():
    edges = _edges()
    assert {"semmim.cli", "semmim.ablate", "semmim.kernels.registry", "semmim.train.loop"} <= set(
        edges
    )
    assert "semmim.kernels.registry" in edges["semmim.config"]
    assert "semmim.eval" in edges["semmim.train.loop"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_the_package_modules():
    assert _cycles(_edges(top_only=True)) == []
    assert _cycles(_edges()) == KNOWN_LAZY_CYCLES


def test_no_module_imports_another_module_s_private_names():
    private = [
        f"{MODULES[name].relative_to(ROOT)}:{line}: from {module} import {what}"
        for name in MODULES
        for line, module, what in _imports(name)
        if what and what.startswith("_") and module.startswith("semmim") and what != "_C"
    ]
    assert private == []
