"""Training a speech pathway through real module servers: spoken words (waveforms in, CTC labels
as the head's targets) through every module's TrainingService give the losses of the same steps
in this process (bidirectional, rel 1e-5), and a few steps lower the CTC loss."""

from __future__ import annotations

import numpy as np
import pytest

from pathways import certs
from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.datasets import speech
from pathways.deploy.local import LocalDeployment
from pathways.executor.local import LocalExecutor
from pathways.pipeline.client import remote_stages
from pathways.pipeline.runner import run_step
from pathways.pipeline.stage import LocalStage
from pathways.tokenizers import ByteTokenizer
from pathways.train import PipelineEngine, TrainConfig, make_optimizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not speech.espeak_available(),
        reason="espeak-ng is not installed (Debian package espeak-ng; .ci/run installs it)",
    ),
]
SPEC = {
    "modules": {
        "wav": {
            "kind": "audio_embedding",
            "sample_rate": 16000,
            "max_samples": 16000,
            "d_model": 16,
            "n_mels": 20,
        },
        "attn": {
            "kind": "attention",
            "d_model": 16,
            "n_layers": 1,
            "n_heads": 2,
            "max_seq_len": 32,
        },
        "chars": {"kind": "ctc", "d_model": 16},
    },
    "pathways": {"speech": ["wav", "attn", "chars"]},
}
STEPS = 8


def test_speech_trains_through_the_servers_as_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path / "cache"))
    data = speech.speech.__wrapped__(
        train_per_word=2, test_per_word=1, unseen_per_word=1, vocabulary=27
    )
    spec = spec_lib.from_dict(SPEC)
    data.check_pathway(spec, "speech")
    ex = LocalExecutor(spec, seed=0)
    path = tmp_path / "ckpt"
    ckpt.save_spec(path, spec, ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(path, name, ex.state(name))
    cfg = TrainConfig(steps=STEPS, warmup=1, lr=1e-2, batch_size=8, seq_len=25)
    batches = [data.batch(s, 8, 25, seed=0) for s in range(STEPS)]
    with LocalDeployment(path, coordinator=False, secure_dir=tmp_path / "home") as dep:
        addresses = {m: dep.fleet.endpoints[m][0] for m in spec.pathway("speech").modules}
        tls = dep.identities.tls(certs.COORDINATOR)  # TrainingService takes service certificates
        stages = remote_stages(spec, "speech", addresses, cfg, tls=tls)
        try:
            engine = PipelineEngine(stages, 2, "1f1b")
            remote = [engine.step(x, y)["loss"] for x, y in batches]
        finally:
            for st in stages:
                st.close()
    fresh = LocalExecutor(spec)
    for m in spec.pathway("speech").modules:
        fresh.set_state(m, ckpt.load_module(path, m, fresh.state(m)))
    local_stages = [
        LocalStage(rt, make_optimizer(cfg), causal=False) for rt in fresh.chain("speech")
    ]
    local = [run_step(local_stages, x, y, 2, "1f1b")["loss"] for x, y in batches]
    assert remote == pytest.approx(local, rel=1e-5)
    assert np.mean(remote[-2:]) < 0.8 * remote[0], remote
