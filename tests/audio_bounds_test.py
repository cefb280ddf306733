"""A module server counts a waveform's log-mel frames, not its samples, against max_call_tokens
(issue 19 on issue 17's bounds): one second at 16 kHz is 98 positions, not 16,000, so a batch of
utterances fits the default bound; a batch over it is refused naming what was counted. Real
module server (in this process, a tiny audio embedding), Forward and TrainingService.Forward."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import yaml

from pathways import codec, transport
from pathways.modules.attention import AttentionConfig
from pathways.pipeline import service as training
from pathways.serving import limits
from pathways.serving.server import ModuleServer
from pathways.serving.settings import ModuleServerSettings
from pathways.serving.testing import make_checkpoint
from pathways.v1 import module_pb2, module_pb2_grpc, training_pb2, training_pb2_grpc

pytestmark = pytest.mark.slow
SPEC = {
    "tokenizer": {"kind": "byte"},
    "modules": {
        "frames": {"kind": "audio_embedding", "sample_rate": 16000, "max_samples": 16000,
                   "d_model": 16, "n_mels": 20},
        "attn": {"kind": "attention", "d_model": 16, "n_layers": 1, "n_heads": 2,
                 "max_seq_len": 32},
        "chars": {"kind": "ctc", "d_model": 16},
    },
    "pathways": {"speech": ["frames", "attn", "chars"]},
}  # fmt: skip
MAX_CALL_TOKENS = 512  # 5 one-second utterances of 98 frames fit; 8 (padded: 100 each) do not


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio-bounds")
    (d / "speech.yaml").write_text(yaml.safe_dump(SPEC))
    make_checkpoint(d / "ckpt", d / "speech.yaml")
    s = ModuleServer(
        ModuleServerSettings(
            str(d / "ckpt"), "frames", insecure=True, max_call_tokens=MAX_CALL_TOKENS
        ),
        add_ons=[training.ADD_ON],
    )
    s.start()
    try:
        yield s
    finally:
        s.stop(0)


def _status(call, request):
    try:
        return call(request, timeout=60), None, ""
    except grpc.RpcError as e:
        return None, e.code(), e.details()


def _waves(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).uniform(-0.5, 0.5, (rows, 16000)).astype(np.float32)


def test_positions_are_frames_for_audio_and_the_length_otherwise():
    from pathways.modules.audio_embedding import AudioEmbeddingConfig

    audio = AudioEmbeddingConfig(sample_rate=16000, max_samples=16000, d_model=16)
    assert limits.call_positions(audio, 16000) == 98  # 1 + (16000 - 400) // 160
    assert limits.positions_field(audio, "input", 16384) == (
        100,
        "input (16384 audio values = 100 positions)",
    )
    attn = AttentionConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    assert limits.positions_field(attn, "input", 24) == (24, "input")


def test_forward_counts_frames(server):
    with transport.channel(f"127.0.0.1:{server.port}", tls=transport.TLSConfig.plaintext()) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        # 4 utterances: 4 x 100 frames (16,384 samples, the padded length) = 400 <= 512; as
        # samples they were 65,536.
        ok, code, msg = _status(
            stub.Forward,
            module_pb2.ForwardRequest(input=codec.encode(_waves(4)), bidirectional=True),
        )
        assert code is None, msg
        assert codec.decode(ok.output).shape == (4, 25, 16)
        _, code, msg = _status(
            stub.Forward,
            module_pb2.ForwardRequest(input=codec.encode(_waves(8)), bidirectional=True),
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert msg.startswith(
            "input (padded) (16384 audio values = 100 positions) has 8 rows x 100 positions "
            "= 800, over max_call_tokens = 512"
        ), msg


def test_training_forward_counts_frames(server):
    with transport.channel(f"127.0.0.1:{server.port}", tls=transport.TLSConfig.plaintext()) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        stub.Configure(
            training_pb2.ConfigureRequest(
                module="frames",
                optimizer=training_pb2.OptimizerConfig(lr=1e-3, steps=10),
                bidirectional=True,
            ),
            timeout=60,
        )
        ok, code, msg = _status(
            stub.Forward, training_pb2.TrainForwardRequest(input=codec.encode(_waves(5)))
        )
        assert code is None, msg
        assert codec.decode(ok.output).shape == (5, 25, 16)
        _, code, msg = _status(
            stub.Forward,
            training_pb2.TrainForwardRequest(micro_batch=1, input=codec.encode(_waves(8))),
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert msg.startswith(
            "input (16000 audio values = 98 positions) has 8 rows x 98 positions, over "
            "max_call_tokens = 512"
        ), msg
        stub.Reset(training_pb2.ResetRequest(), timeout=30)
