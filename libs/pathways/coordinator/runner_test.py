"""A job on a library data set (JobRequest.dataset): validated at submission, and its trainer
reads the data set the pathway takes (labelled images here) instead of text."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathways.coordinator.jobs import JobRequest
from pathways.coordinator.runner import build_trainer

DIGITS = str(Path(__file__).resolve().parents[3] / "examples/digits.yaml")


def test_a_digits_job_trains_on_the_images(tmp_path):
    req = JobRequest(
        spec=DIGITS,
        out=str(tmp_path / "run"),
        dataset="digits",
        engine="fused",
        steps=60,
        batch_size=32,
        seq_len=16,
        lr=3e-3,
        eval_every=60,
    )
    trainer = build_trainer(JobRequest.from_dict(req.to_dict()))  # as a worker receives it
    before = trainer.eval_loss()
    trainer.run()
    assert trainer.eval_loss() < before - 0.3


def test_bad_dataset_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of digits, speech"):
        JobRequest(spec=DIGITS, out=str(tmp_path), dataset="mnist")
    tiny = str(Path(DIGITS).with_name("tiny.yaml"))
    req = JobRequest(spec=tiny, out=str(tmp_path), dataset="digits", engine="fused", seq_len=16)
    with pytest.raises(ValueError, match="pathway 'tiny'.*reads tokens"):
        build_trainer(req)
