"""Model files reach device-specific ops only through `pathways.backends`: none imports a
backend (the native CPU kernels), so the model code runs wherever that backend does not."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent
BACKENDS = ("pathways.kernels",)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_model_file_imports_a_backend():
    files = [p for p in HERE.glob("*.py") if not p.stem.endswith("_test")]
    assert any(p.name == "layers.py" for p in files)  # the files are really read
    offenders = {
        p.name: sorted(i for i in _imports(p) if i.startswith(BACKENDS))
        for p in files
        if any(i.startswith(BACKENDS) for i in _imports(p))
    }
    assert offenders == {}
