import subprocess
import sys

import pytest

from pathways import messages
from pathways.sampling import SamplingParams
from pathways.train import TrainConfig
from pathways.v1 import gateway_pb2, training_pb2


def test_gateway_options_unset_take_the_library_defaults():
    p = messages.sampling_from_options(gateway_pb2.SamplingOptions(temperature=0.5, stop=["\n"]))
    assert p == SamplingParams(temperature=0.5, top_p=1.0, max_new_tokens=64, stop=("\n",))
    o = gateway_pb2.SamplingOptions(top_p=0.25, max_new_tokens=0)  # set to 0: kept
    assert (messages.sampling_from_options(o).top_p, o.max_new_tokens) == (0.25, 0)


def test_row_sampling_round_trip():
    p = SamplingParams(temperature=0.75, top_k=7, top_p=0.5, seed=2**40 + 3)
    assert messages.sampling_from_row(messages.row_sampling(p)) == p


def test_optimizer_round_trip_and_errors_name_the_field():
    cfg = TrainConfig(steps=30, lr=0.25, warmup=3, min_lr_ratio=0.5, weight_decay=0.125, clip=2)
    back = messages.train_config(messages.optimizer_config(cfg))
    for name in ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip"):
        assert getattr(back, name) == getattr(cfg, name)
    with pytest.raises(ValueError, match="lr must be a positive number, got 0.0"):
        messages.train_config(training_pb2.OptimizerConfig(steps=3, lr=0.0))


def test_client_options_unset_take_the_gateway_defaults():
    o = messages.sampling_options(temperature=0.5, stop=["\n"])
    assert not o.HasField("top_p") and not o.HasField("max_new_tokens")
    assert messages.sampling_from_options(o) == SamplingParams(temperature=0.5, stop=("\n",))
    o = messages.sampling_options(top_k=3, top_p=0.25, seed=7, max_new_tokens=0)
    assert messages.sampling_from_options(o) == SamplingParams(
        top_k=3, top_p=0.25, seed=7, max_new_tokens=0
    )


def test_clients_import_it_without_jax():
    code = "import sys, pathways.messages; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
