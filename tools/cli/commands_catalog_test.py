"""`pathways bench-pathways`: every pathway of a (random) checkpoint measured in-process, stored in
its catalog.json, printed as a table and plotted."""

from __future__ import annotations

import json
import math

import pytest

from pathways import catalog
from pathways.serving.testing import make_checkpoint
from tools.cli.main import main

pytestmark = pytest.mark.slow


def test_bench_pathways_stores_tokens_per_s_and_eval_loss(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    argv = ["bench-pathways", str(ckpt), "--data", str(data), "--tokens", "6"]
    assert main(argv) == 0
    stored = json.loads((ckpt / catalog.MEASURED).read_text())["pathways"]
    assert set(stored) == {"tiny", "tiny-shallow"}
    for m in stored.values():
        assert m["tokens_per_s"] > 0
        # Random weights: about the entropy of a uniform guess over the byte vocabulary.
        assert abs(m["eval_loss"] - math.log(257)) < 1.0
    out = capsys.readouterr().out
    assert "tiny-shallow" in out and "eval loss" in out
    assert (ckpt / "catalog.png").stat().st_size > 1000
    assert main(["bench-pathways", str(ckpt), "--pathway", "nope"]) == 2
