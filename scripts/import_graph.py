"""The import graph of `crowdseg` and `datamodules`, read from the source (ast; nothing is imported).

Edges are the imports a module runs, at module level or inside functions; imports under
`if TYPE_CHECKING:` are annotations only and left out. `python scripts/import_graph.py` prints the
cycles and the imports that go against the layering (none, when the code is healthy);
`--dot FILE` writes the graph for Graphviz (`dot -Tsvg FILE`). tests/test_import_graph.py runs the checks.

Layering (lower layers never import higher ones at run time):
  models, metrics, losses < lit < methods    (a model never imports its losses or its LightningModule,
                                              a LightningModule never its method's config module)
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "src" / "crowdseg", ROOT / "datamodules")
# (importer prefix, forbidden imported prefixes)
LAYERS = (("crowdseg.models", ("crowdseg.losses", "crowdseg.lit", "crowdseg.methods")),
          ("crowdseg.metrics", ("crowdseg.lit", "crowdseg.methods", "crowdseg.models", "crowdseg.losses")),
          ("crowdseg.losses", ("crowdseg.lit", "crowdseg.methods")),
          ("crowdseg.lit", ("crowdseg.methods",)))


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            parts = path.relative_to(package.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[str]:
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports at run time} (a package's own parents left out)."""
    found = modules()

    def resolve(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in found.items():
        targets = {resolve(n) for n in _runtime_imports(ast.parse(path.read_text()))}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for lower, banned in LAYERS if m.startswith(lower)
                  for t in targets if t.startswith(banned))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", type=Path, help="write the graph in Graphviz format")
    args = parser.parse_args()
    graph = import_graph()
    if args.dot:
        lines = [f'  "{m}" -> "{t}";' for m in sorted(graph) for t in sorted(graph[m])]
        args.dot.write_text("digraph imports {\n  rankdir=LR;\n" + "\n".join(lines) + "\n}\n")
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    problems += [f"upward import: {m} imports {t}" for m, t in upward_imports(graph)]
    print("\n".join(problems) or f"{len(graph)} modules, no cycle, no upward import")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
