"""The CLI's modules import each other without cycles (function-level imports included): main
registers the command groups, command groups may use each other, nothing imports main back."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "tools.cli":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools.cli."):
            out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("tools.cli.")}
    return out


def test_no_import_cycles_between_cli_modules():
    graph = {p.stem: _imports(p) for p in HERE.glob("*.py") if not p.stem.endswith("_test")}
    assert "commands_demo" in graph["main"]  # the graph is really read

    def visit(node, stack):
        assert node not in stack, " -> ".join([*stack, node])
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for node in graph:
        visit(node, [])
