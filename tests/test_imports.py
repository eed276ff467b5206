"""fusionlib has no import cycles: its modules form layers that import downwards only.

The graph is read from the source with ``ast``, not by importing: every
``import`` counts, at module level and inside functions (a function-level
import only postpones a cycle, it does not remove it), except those under
``if TYPE_CHECKING:``, which never run.

How an import becomes edges, ``m`` being the importing module:

* ``import a.b.c`` and ``from a.b import c`` (``c`` a module) point to
  ``a.b.c``; ``from a.b import name`` (``name`` not a module) to ``a.b``.
* Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so
  those packages are targets too, except the packages that contain ``m``
  itself: Python has started them before ``m`` runs. That keeps the usual
  re-export (``fusionlib/data/__init__.py`` importing ``.shapes``, whose
  siblings import ``.shapes``) out of the report, while a submodule that
  names its own package (``from fusionlib.models import X`` inside
  ``fusionlib.models.vilbert``) still gets the edge, so a package whose
  ``__init__`` imports that submodule back is reported: that order-dependent
  cycle is real.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = "fusionlib"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


def find_modules(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: source file}`` for every ``.py`` under ``package_dir`` (packages by ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:`` (not their ``else``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that importing ``module`` (source at ``path``) runs directly."""
    is_package = path.name == "__init__.py"
    named: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = module if is_package else module.rpartition(".")[0]
            base_parts = base.split(".")
            if node.level - 1 >= len(base_parts):
                raise ValueError(
                    f"{path}:{node.lineno}: relative import of level {node.level} goes above "
                    f"the top package {base_parts[0]!r}"
                )
            base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            named.add(submodule if submodule in modules else source)
    edges = set()
    own_packages = set(_ancestors(module))
    for target in named:
        # `import a.b.c` where only `a.b` is ours (c a name, or not a module at all): the longest known prefix.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if not target or target == module:
            continue
        edges.add(target)
        edges.update(p for p in _ancestors(target) if p not in own_packages and p != module)
    return edges


def import_graph(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the whole package."""
    modules = find_modules(package_dir, package)
    return {name: module_imports(name, path, modules) for name, path in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _shortest_cycle(graph: dict[str, set[str]], nodes: list[str]) -> list[str]:
    """The shortest cycle inside ``nodes`` (a strongly connected set), as ``[a, b, ..., a]``."""
    inside = set(nodes)
    best: list[str] | None = None
    for start in nodes:
        parent = {start: None}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph.get(v, ()):
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                cycle = [*reversed(path), start]
                if best is None or len(cycle) < len(best):
                    best = cycle
                break
            for w in sorted(graph.get(v, ())):
                if w in inside and w not in parent:
                    parent[w] = v
                    queue.append(w)
    assert best is not None, f"{nodes} is not strongly connected"
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per group of modules that import each other (and every module importing itself)."""
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1 or component[0] in graph.get(component[0], ()):
            cycles.append(_shortest_cycle(graph, component))
    return cycles


def describe_cycles(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


# ---------------------------------------------------------------------------
# The cycle finder and the parser on graphs and packages whose answer is known
# ---------------------------------------------------------------------------


def test_find_cycles_reports_each_cycle_once_and_shortest():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"d"}, "e": {"a"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "a"], ["d", "d"]]
    assert describe_cycles(find_cycles(graph)) == "a -> b -> a\nd -> d"
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_reads_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "from .low import helper\n",
        "pkg/low.py": "import os\n\ndef helper():\n    pass\n",
        "pkg/mid.py": (
            "from typing import TYPE_CHECKING\n"
            "from pkg import low\n"
            "if TYPE_CHECKING:\n    from pkg.top import Top\n"
            "else:\n    from . import sub\n"
        ),
        "pkg/top.py": "def late():\n    from .mid import sub\n    import pkg.sub.leaf\n",
        "pkg/sub/__init__.py": "from . import leaf\n",
        "pkg/sub/leaf.py": "from .. import low\nfrom ..low import helper\nfrom pkg.sub import name_in_init\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "pkg", "pkg")
    assert graph == {
        "pkg": {"pkg.low"},
        "pkg.low": set(),
        "pkg.mid": {"pkg.low", "pkg.sub"},  # not pkg.top: under TYPE_CHECKING; not pkg: its own
        "pkg.top": {
            "pkg.mid",
            "pkg.sub",
            "pkg.sub.leaf",
        },  # function-level; pkg.sub's __init__ runs too
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.low", "pkg.sub"},  # its own package, named explicitly
    }
    # pkg/__init__ re-exporting pkg.low is no cycle; pkg.sub's __init__ importing a leaf that imports
    # a name from that __init__ is one (it works only if the name is defined before the import).
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.sub"]]


def test_fusionlib_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "fusionlib.train" in graph and "fusionlib.models.vilbert" in graph
    assert "fusionlib.runtime" in graph["fusionlib.train"]  # module level
    assert "fusionlib.train" in graph["fusionlib.metrics"]  # inside a function
    assert "fusionlib.data.truth" in graph["fusionlib.itm"]  # relative, into a subpackage
    assert "fusionlib.data" in graph["fusionlib.itm"]  # ... whose package __init__ runs first
    assert (
        "fusionlib.models" not in graph["fusionlib.models.vilbert"]
    )  # its own package: already running


# ---------------------------------------------------------------------------
# The library itself
# ---------------------------------------------------------------------------


def test_fusionlib_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail(
            f"fusionlib has {len(cycles)} import cycle(s); break each by moving what one side needs "
            f"into a lower module:\n{describe_cycles(cycles)}",
            pytrace=False,
        )
