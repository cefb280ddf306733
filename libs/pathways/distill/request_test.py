"""A distillation request's checks (made without jax) name the field and the value."""

from __future__ import annotations

import pytest

from pathways.config import ConfigError
from pathways.distill.request import DistillRequest

REQ = {"teacher": "t", "student_spec": "s", "out": "o", "store": "x"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": 0}, "lr must be a positive number, got 0"),
        ({"lr": "1e-3"}, "lr must be a positive number, got '1e-3'"),
        ({"steps": 3, "warmup": 3}, r"warmup must be in \[0, steps=3\), got 3"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"ce_weight": -1.0}, "ce_weight must be >= 0, got -1.0"),
    ],
)
def test_bad_settings_raise_config_errors_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        DistillRequest.from_dict({**REQ, **fields})


def test_train_config_carries_the_settings():
    cfg = DistillRequest(**REQ, steps=30, batch_size=4, lr=0.5, warmup=2, seed=3)
    t = cfg.distill_config().train_config()
    assert (t.steps, t.batch_size, t.lr, t.warmup, t.seed) == (30, 4, 0.5, 2, 3)
