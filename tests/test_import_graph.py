"""The project's import graph has no cycle and no upward import (scripts/import_graph.py)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_checks_find_what_they_look_for():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(graph) == [["a", "b", "c"]]
    assert import_graph.upward_imports({"crowdseg.models.x": {"crowdseg.losses.y"}, "crowdseg.losses.y": set()}) \
        == [("crowdseg.models.x", "crowdseg.losses.y")]


def test_type_checking_imports_are_not_run_time_edges():
    import ast
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import crowdseg.methods\n"
                     "def f():\n    import crowdseg.io\n")
    assert import_graph._runtime_imports(tree) == ["typing", "typing.TYPE_CHECKING", "crowdseg.io"]


def test_the_project_has_no_cycle_and_no_upward_import():
    graph = import_graph.import_graph()
    assert len(graph) > 100 and "crowdseg.train" in graph
    assert import_graph.cycles(graph) == []
    assert import_graph.upward_imports(graph) == []
