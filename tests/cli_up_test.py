"""`pathways up` starts every module + a gateway; `pathways generate --gateway` streams from it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pathways import generate as gen
from pathways.sampling import SamplingParams
from pathways.serving import launcher, testing
from pathways.tokenizers import ByteTokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_up_then_generate_via_gateway_then_clean_stop(tmp_path):
    local = testing.make_checkpoint(tmp_path / "ckpt")
    want = gen.generate(
        local, "tiny-shallow", ["def "], ByteTokenizer(), SamplingParams(max_new_tokens=12)
    )[0].text
    # `up` records its addresses in $PATHWAYS_HOME for `train --remote` and `jobs`.
    env = launcher.child_env({"PATHWAYS_HOME": str(tmp_path / "home")})
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "up",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--replicas",
            "attn-0=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = up.stdout.readline()
        assert line.startswith("gateway 127.0.0.1:"), line
        address = line.split()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.cli.main",
                "generate",
                "--gateway",
                address,
                "--pathway",
                "tiny-shallow",
                "--prompt",
                "def ",
                "--max-tokens",
                "12",
                "--temperature",
                "0",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "def " + want + "\n"
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.cli.main",
                "generate",
                "--gateway",
                address,
                "--pathway",
                "nope",
                "--prompt",
                "x",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr

        def cli(*argv, timeout=300):
            return subprocess.run(
                [sys.executable, "-m", "tools.cli.main", *argv],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
            )

        # Training through the deployment's module services, under its coordinator.
        run = tmp_path / "run"
        trained = cli(
            "train",
            "--remote",
            "--spec",
            str(ROOT / "examples/tiny.yaml"),
            "--out",
            str(run),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--micro-batches",
            "2",
            "--max-data-mb",
            "0.2",
            "--eval-every",
            "2",
            "--save-every",
            "2",
        )
        assert trained.returncode == 0, trained.stderr
        assert "(services, 1f1b, 2 micro-batches)" in trained.stderr
        assert (run / "loss.png").exists() and (run / "train" / "meta.json").exists()
        jobs = cli("jobs", "list", timeout=60)
        assert jobs.returncode == 0 and "SUCCESS" in jobs.stdout and str(run) in jobs.stdout
        unknown = cli("jobs", "status", "no-such-job", timeout=60)
        assert unknown.returncode == 2 and "unknown job 'no-such-job'" in unknown.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(up.pid)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # no server left behind
