"""Only the kind files and the registry name module kinds: the code around modules asks the
`Kind` object (has_cache, is_head, ...) or the activation contracts (issue 18). Reads the
library, the services and the CLI as text."""

from __future__ import annotations

import re
from pathlib import Path

from pathways.modules import registry

ROOT = Path(__file__).resolve().parents[2]
# Every kind the library registers, but "classification": also the name of an Infer result
# (`InferResponse.classification`, `infer.Result.kind`), which callers do switch on.
BUILT_IN = tuple(n for n in registry.names() if n != "classification")
EXEMPT = "# not a module kind"  # a line's string that only looks like a kind's name
# A kind's own file names it (its registration); the registry looks kinds up by name.
ALLOWED = {f"libs/pathways/modules/{name}.py" for name in BUILT_IN} | {
    "libs/pathways/modules/registry.py",
}
NAME = "|".join(BUILT_IN)
SWITCHES = [
    re.compile(rf'(==|!=)\s*"({NAME})"'),  # cfg.kind == "attention"
    re.compile(rf'"({NAME})"\s*(==|!=)'),
    re.compile(rf'\bin\s*[(\[{{][^)\]}}]*"({NAME})"'),  # kind in ("embedding", ...)
    re.compile(r"\[\s*[\w.]*\bkind\s*\]"),  # TABLE[cfg.kind]
    re.compile(rf'^\s*"({NAME})"\s*:'),  # a table keyed by kind names
]


def _sources() -> list[Path]:
    files = [
        *ROOT.glob("libs/pathways/**/*.py"),
        *ROOT.glob("services/**/*.py"),
        *ROOT.glob("tools/cli/*.py"),
        *ROOT.glob("tools/bench/*.py"),
    ]
    return [p for p in files if not p.name.endswith("_test.py") and "_pb2" not in p.name]


def test_no_string_switches_on_kind_names():
    files = _sources()
    seen = {p.relative_to(ROOT).as_posix() for p in files}
    # The scan really reads the code around modules (under Pants too: see the BUILD file).
    assert len(BUILT_IN) >= 9, BUILT_IN
    for must in (
        "libs/pathways/runtime.py",
        "libs/pathways/serving/engine.py",
        "libs/pathways/executor/remote.py",
        "libs/pathways/pipeline/stage.py",
        "libs/pathways/http/app.py",
        "libs/pathways/robotics/policy.py",
        "tools/cli/commands_local.py",
        "tools/bench/remote_decode.py",
    ):
        assert must in seen, must
    found = []
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if EXEMPT not in line and any(s.search(line) for s in SWITCHES):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "ask the Kind object instead of comparing names:\n" + "\n".join(found)
