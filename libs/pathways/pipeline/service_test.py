"""The training add-on names its long-held methods to the module server that mounts it."""

from __future__ import annotations

from pathways.pipeline import service
from pathways.v1 import training_pb2


def test_the_add_on_names_methods_the_training_service_has():
    """Each method named as streaming exists (a renamed RPC would otherwise quietly take the
    threads that health and unary calls keep), and Steps, the stream, is among them."""
    methods = {m.name for m in training_pb2.DESCRIPTOR.services_by_name["TrainingService"].methods}
    named = service.ADD_ON.streaming_methods
    assert f"/{service.SERVICE}/Steps" in named
    for full in named:
        _, svc, method = full.split("/")
        assert svc == service.SERVICE and method in methods, full
