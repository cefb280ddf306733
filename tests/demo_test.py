"""`pathways demo`, the README's main job, end to end (shortened): every process, real broker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pathways.serving import launcher

pytestmark = pytest.mark.slow


def test_demo_trains_through_the_services_generates_and_stops_everything(tmp_path):
    env = launcher.child_env({"PATHWAYS_HOME": str(tmp_path / "home")})
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "demo",
            "--out",
            str(out),
            "--steps",
            "6",
            "--max-tokens",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.startswith("def ")
    for line in ("loss ", "throughput ", "module time ", "on the wire ", "loss plot "):
        assert f"\n  {line}" in stdout, stdout
    assert "embed" in stdout and "attn-0" in stdout and "head" in stdout
    assert (out / "checkpoint" / "loss.png").exists()
    assert (out / "checkpoint" / "train" / "meta.json").exists()
    # Every process the demo started is gone (servers, gateway, worker, broker).
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    assert str(out) not in ps
