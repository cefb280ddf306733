"""`pathways demo --task vision|speech|robotics`: the coordinator worker may read the example
spec wherever it ships (inside the PEX when users run `./pants run` or the packaged CLI)."""

import argparse

import pytest

from tools.cli import demo_tasks
from tools.cli.commands_local import EXAMPLES


class _Stop(Exception):
    pass


@pytest.mark.parametrize("task", ["vision", "robotics"])
def test_task_demo_lets_the_job_read_the_example_spec(tmp_path, monkeypatch, task):
    seen = {}

    def deployment(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("pathways.deploy.local.LocalDeployment", deployment)
    monkeypatch.setattr(demo_tasks, "_data", lambda task: None)
    monkeypatch.setattr(demo_tasks, "initial_checkpoint", lambda directory, task: None)
    args = argparse.Namespace(
        task=task, steps=3, micro_batches=4, examples=0, out=str(tmp_path), insecure=True
    )
    with pytest.raises(_Stop):
        demo_tasks.run(args, follow=None)
    assert EXAMPLES in [type(EXAMPLES)(p) for p in seen["job_roots"]]
    assert (EXAMPLES / demo_tasks.TASKS[task].spec).is_file()
