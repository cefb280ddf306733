"""tools/bench/applications.py --tasks sharing with the robotics pathways of
examples/multitask.yaml (issue 20): each task alone and all of them through the shared
attention modules, the robotics metrics from rollouts of the trained policies."""

import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from tools.bench import applications

# examples/multitask.yaml's text and reacher pathways at width 16: building the example spec
# itself compiles ~80 initialisers (a minute on a loaded 2-vCPU machine).
TINY = """
tokenizer: {kind: byte}
modules:
  text-embed: {kind: embedding, vocab_size: 257, d_model: 16, max_seq_len: 128}
  reacher-obs:
    kind: observation_embedding
    observation: vector
    obs_dim: 10
    scale: [1, 1, 1, 1, 5, 5, 0.1, 0.1, 20, 20]
    hidden: 16
    d_model: 16
    max_seq_len: 16
  shared-0: {kind: attention, d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 128}
  shared-1: {kind: attention, d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 128}
  text-head: {kind: decoding, d_model: 16, vocab_size: 257}
  reacher-torques: {kind: action, d_model: 16, space: continuous, actions: 2, squash: tanh}
pathways:
  text: [text-embed, shared-0, shared-1, text-head]
  reacher: [reacher-obs, shared-0, shared-1, reacher-torques]
"""


def test_sharing_table_has_robotics_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "spec.yaml").write_text(TINY)
    args = applications.parse_args(
        f"--tasks sharing --sharing-spec {tmp_path / 'spec.yaml'} --sharing-tasks reacher text "
        "--sharing-settings weighted --sharing-steps 2 --sharing-task-steps reacher=3 "
        "--shared-lr-scale 0.25 --robotics-episodes 3 --robotics-test-episodes 2 "
        "--text-bytes 30000".split()
    )
    rows = applications.sharing(args)
    label = "shared, reacher at lr x 0.25"
    assert [(r["task"], r["setting"], r["steps"]) for r in rows] == [
        ("text", label, 2),
        ("reacher", label, 3),
    ]
    assert rows[0]["metric"] == "eval loss" and rows[0]["value"] > 0
    # Rollouts of the trained policy on unseen seeds: Reacher's final fingertip distance.
    assert rows[1]["metric"] == "mean final distance (m)" and 0 < rows[1]["value"] < 1
    # One copy of shared-0 and shared-1 for both pathways (the reacher adapter is not used).
    spec = spec_lib.load(args.sharing_spec)
    ex = LocalExecutor(spec)
    assert rows[0]["params"] == rows[1]["params"]
    assert rows[1]["params"] == sum(ex.runtimes[m].param_count() for m in spec.modules)


def test_shared_lr_factors_one_for_all_or_one_per_task():
    others = ("digits", "speech", "doorkey", "reacher")
    assert applications._per_task((0.3,), others) == dict.fromkeys(others, 0.3)
    with pytest.raises(ValueError, match="2 factors for 4 tasks"):
        applications._per_task((0.1, 0.7), others)
    # The labels of the records BENCHMARKS.md cites (text, digits and speech) are unchanged.
    two = applications._per_task(applications._scales("0.1:0.7"), ("digits", "speech"))
    assert (
        applications._weights_label(two) == "digits and speech at lr x 0.1 (digits), 0.7 (speech)"
    )
    one = applications._per_task(applications._scales("0.1"), ("digits", "speech"))
    assert applications._weights_label(one) == "digits and speech at lr x 0.1"
