"""`pathways train --parallel diloco|dipaco`: bad input exits 2 with one line naming the value
(the jobs themselves run in tests/diloco_coordinator_test.py and tests/dipaco_coordinator_test.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


@pytest.mark.parametrize(
    "grid, words",
    [
        (
            None,
            "--parallel dipaco needs --grid MODULE=N[,MODULE=N...] or a grid: in pathway 'tiny'",
        ),
        ({"attn-0": 2, "attn-1": 2}, "cannot reach the coordinator's broker"),  # the job is sent
        ({"attn-9": 2}, "pathway 'tiny': grid names 'attn-9', which is not in the pathway"),
        ({"attn-0": 0}, "pathway 'tiny': grid['attn-0'] must be an integer >= 1, got 0"),
    ],
)
def test_dipaco_takes_the_grid_the_spec_declares(tmp_path, capsys, grid, words):
    data = yaml.safe_load(TINY.read_text())
    if grid is not None:
        chain = data["pathways"]["tiny"]
        chain = chain["modules"] if isinstance(chain, dict) else chain
        data["pathways"]["tiny"] = {"modules": chain, "grid": grid}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    argv = ["train", "--spec", str(spec), "--out", str(tmp_path / "out")]
    argv += ["--broker", "redis://127.0.0.1:1/0", "--parallel", "dipaco"]
    code = main([*argv, "--steps", "4", "--inner-steps", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert words in err
