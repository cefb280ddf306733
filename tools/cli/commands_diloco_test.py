"""`pathways train --parallel diloco|dipaco`: bad input exits 2 with one line naming the value
(the jobs themselves run in tests/diloco_coordinator_test.py and tests/dipaco_coordinator_test.py).
"""

from __future__ import annotations

import pytest

from tools.cli.main import main

BASE = ["train", "--spec", "spec.yaml", "--out", "out", "--broker", "redis://127.0.0.1:1/0"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--parallel", "diloco", "--workers", "0"], "workers must be a positive integer, got 0"),
        (
            ["--parallel", "diloco", "--steps", "7", "--inner-steps", "2"],
            "steps (7) must be a positive multiple of inner_steps (2)",
        ),
        (["--parallel", "diloco", "--outer-momentum", "1"], "outer_momentum must be in [0, 1)"),
        (["--parallel", "diloco", "--engine", "fused"], "--engine does not apply to --parallel"),
        (["--workers", "2", "--inner-steps", "5"], "--workers, --inner-steps only apply with"),
        (
            ["--parallel", "diloco", "--steps", "4", "--inner-steps", "2"],
            "cannot reach the coordinator's broker at redis://127.0.0.1:1/0",
        ),
        (["--parallel", "dipaco"], "--parallel dipaco needs --grid MODULE=N[,MODULE=N...]"),
        (["--parallel", "dipaco", "--grid", "attn-0"], "--grid must be MODULE=N[,MODULE=N...]"),
        (
            ["--parallel", "dipaco", "--grid", "attn-0=2,attn-1=0"],
            "grid['attn-1'] must be an integer >= 1, got 0",
        ),
        (["--parallel", "dipaco", "--workers", "2"], "--workers does not apply to --parallel"),
        (["--parallel", "diloco", "--grid", "a=2"], "--grid only apply with --parallel dipaco"),
        (["--doc-len", "64"], "--doc-len only apply with --parallel diloco or dipaco"),
        (
            ["--parallel", "dipaco", "--grid", "attn-0=2", "--steps", "4", "--inner-steps", "2"],
            "cannot reach the coordinator's broker at redis://127.0.0.1:1/0",
        ),
    ],
)
def test_bad_parallel_input_exits_2_with_one_line(capsys, argv, words):
    code = main([*BASE, *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pathways train: error: "), err
    assert words in err
