"""`pathways rollout --checkpoint`: a trained policy's episodes in its simulator, in-process
through main(), equal to the library's rollout of the same parameters; bad input is one line."""

import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.robotics.policy import Policy, rollout
from pathways.tokenizers import ByteTokenizer
from tools.cli.main import main

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "arm": {
                "kind": "observation_embedding",
                "observation": "vector",
                "obs_dim": 10,
                "hidden": 13,
                "d_model": 12,
                "max_seq_len": 6,
                "init_std": 0.3,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 6,
            },
            "torques": {
                "kind": "action",
                "d_model": 12,
                "space": "continuous",
                "actions": 2,
                "squash": "tanh",
                "init_std": 0.3,
            },
            "arm2": {
                "kind": "observation_embedding",
                "observation": "vector",
                "obs_dim": 10,
                "d_model": 12,
                "max_seq_len": 6,
            },
        },
        "pathways": {"arm": ["arm", "attn", "torques"], "other": ["arm2", "attn", "torques"]},
    }
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    ex = LocalExecutor(SPEC, seed=5)
    ckpt.save_spec(out, SPEC, ByteTokenizer())
    for name in ("arm", "attn", "torques"):
        ckpt.save_module(out, name, ex.state(name))
    return out, ex


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_rollout_prints_each_episode_and_equals_the_library(capsys, checkpoint):
    path, ex = checkpoint
    argv = [
        "rollout",
        "--checkpoint",
        str(path),
        "--env",
        "reacher",
        "--episodes",
        "2",
        "--seed",
        "3",
        "--pathway",
        "arm",
    ]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("seed 3: ") and lines[1].startswith("seed 4: ")
    assert "success rate" in lines[-1] and "mean final distance" in lines[-1]
    want = rollout("reacher", Policy(ex, "arm"), [3, 4])
    for line, e in zip(lines, want.episodes):
        assert f"return {e.ret:.3f}" in line and f"final distance {e.final_distance:.4f}" in line
    assert f"mean final distance {want.mean_final_distance:.4f}" in lines[-1]
    assert "window 6" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--env", "pong"], "unknown environment 'pong'; known: doorkey"),
        (["--env", "doorkey"], "no pathway of the checkpoint reads doorkey observations"),
        (["--env", "reacher"], "pathways arm, other all fit reacher: name one"),
        (["--env", "reacher", "--pathway", "other"], "no weights for module(s) arm2"),
        (["--env", "reacher", "--pathway", "arm", "--episodes", "0"], "--episodes must be >= 1"),
        (["--env", "reacher", "--pathway", "arm", "--window", "9"], r"window must be in [1, 6]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, checkpoint, extra, message):
    path, _ = checkpoint
    code, out, err = _run(capsys, ["rollout", "--checkpoint", str(path), *extra])
    assert code == 2 and out == ""
    assert err.startswith("pathways rollout: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_checkpoint_is_named(capsys, tmp_path):
    code, _, err = _run(
        capsys, ["rollout", "--checkpoint", str(tmp_path / "nope"), "--env", "reacher"]
    )
    assert code == 2 and "is not a Pathways checkpoint" in err


def test_render_writes_a_gif_of_the_first_episode(capsys, checkpoint, tmp_path):
    import imageio.v3 as iio

    from pathways.robotics import render

    try:
        render.gl_backend()
    except render.RenderError as e:
        pytest.skip(str(e))
    path, _ = checkpoint
    gif = tmp_path / "arm.gif"
    argv = ["rollout", "--checkpoint", str(path), "--env", "reacher", "--pathway", "arm"]
    code, out, err = _run(capsys, [*argv, "--episodes", "2", "--render", str(gif)])
    assert code == 0, err
    frames = iio.imread(gif)
    assert frames.shape[0] == 51 and frames.shape[-1] == 3  # the first state and 50 steps
    assert frames[0].std() > 0 and np.abs(frames[-1] - frames[0]).max() > 0  # the arm moved
    assert f"wrote {gif} (51 frames, seed 0)" in err


def test_render_without_a_headless_gl_library_says_what_to_install(
    capsys, checkpoint, tmp_path, monkeypatch
):
    from pathways.robotics import render

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(render.ctypes.util, "find_library", lambda name: None)
    path, _ = checkpoint
    argv = ["rollout", "--checkpoint", str(path), "--env", "reacher", "--pathway", "arm"]
    code, out, err = _run(capsys, [*argv, "--render", str(tmp_path / "a.gif")])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "neither EGL" in err and "libosmesa6" in err
    code, _, err = _run(capsys, [*argv, "--render", str(tmp_path / "a.png")])
    assert code == 2 and "--render writes a GIF" in err
