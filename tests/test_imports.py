"""No import circles between gallop_kernels modules.

A circle (radix <-> reference, _env <-> select) works only by import order or by an
import moved into a function; either breaks quietly when someone adds one line. The
graph is read from the source with ast, imports inside functions included, so a
circle dodged by a late import still counts.
"""

import ast
from pathlib import Path

import gallop_kernels

ROOT = Path(gallop_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("gallop_kernels", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, here: str, is_package: bool, modules: set[str]) -> set[str]:
    """The gallop_kernels modules one import statement loads: the named module, each name
    that is itself a module (``from . import radix``), and the packages above them."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif node.level:  # relative: from .x import y, from .. import y
        base = here.split(".")[: len(here.split(".")) - node.level + is_package]
        mod = ".".join(base + ([node.module] if node.module else []))
        targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
    else:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    out = set()
    for t in targets:
        parts = t.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return out - {here}


def import_graph() -> dict[str, set[str]]:
    """gallop_kernels module -> the gallop_kernels modules it imports (anywhere in its source)."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        nodes = ast.walk(ast.parse(path.read_text(), str(path)))
        imports = [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = set().union(*(_imported(n, name, is_package, modules) for n in imports))
        # a module's own packages run before it: importing them is no edge of its making
        graph[name] -= {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert {"gallop_kernels.keys", "gallop_kernels.radix"} <= graph["gallop_kernels.reference"]
    assert "gallop_kernels.keys" in graph["gallop_kernels.ops.select_histogram"]  # from .. import keys, radix
    assert "gallop_kernels.ops.select_triton" in graph["gallop_kernels._env"]  # inside a function
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circles():
    assert find_circle(import_graph()) is None


def test_keys_is_the_bottom_of_the_selection_stack():
    """The score and the order key import nothing of the package but the criterion names."""
    assert import_graph()["gallop_kernels.keys"] == {"gallop_kernels.criteria"}
