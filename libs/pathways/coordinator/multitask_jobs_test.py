"""A multi-task request's training settings: warmup derived from its rounds, checks by name."""

from __future__ import annotations

import pytest

from pathways.config import ConfigError
from pathways.coordinator.multitask_jobs import MultiTaskRequest


def _request(**fields) -> MultiTaskRequest:
    return MultiTaskRequest(spec="s.yaml", out="out", tasks=[{"pathway": "p"}], **fields)


def test_warmup_defaults_to_a_fifteenth_of_the_rounds_and_stays_below_them():
    assert _request(steps=300).train_config().warmup == 20
    assert _request(steps=1).train_config().warmup == 0
    assert _request(steps=10, warmup=50).train_config().warmup == 9
    cfg = _request(steps=30, lr=0.5, eval_every=3, save_every=5, seed=2).train_config()
    assert (cfg.lr, cfg.eval_every, cfg.save_every, cfg.seed) == (0.5, 3, 5, 2)


def test_a_bad_lr_is_named():
    with pytest.raises(ConfigError, match="lr must be a positive number, got 0"):
        _request(lr=0)
