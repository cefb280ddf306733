"""Infer through the services: vision and speech pathways sharing one attention module, every
module its own server process, a gateway with TLS and API keys. Results equal the in-process
paths (Classifier, Transcriber, the executor's forward); bad input gets a status naming the field;
the CLI's classify and transcribe work against the gateway and in-process alike. (Text pathways'
refusals are checked in process by libs/pathways/infer_test.py.)"""

from __future__ import annotations

import os

import grpc
import imageio.v3 as iio
import numpy as np
import pytest

from pathways import audio, certs, codec, transport
from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.datasets.digits import digits
from pathways.deploy.local import LocalDeployment
from pathways.executor.local import LocalExecutor
from pathways.pipeline.client import remote_stages
from pathways.pipeline.runner import run_step
from pathways.pipeline.stage import LocalStage
from pathways.serving import auth
from pathways.tokenizers import ByteTokenizer
from pathways.train import PipelineEngine, TrainConfig, make_optimizer
from pathways.transcribe import Transcriber
from pathways.v1 import gateway_pb2, gateway_pb2_grpc
from tools.cli.main import main

pytestmark = pytest.mark.slow
READER_KEY = auth.new_key()  # the generate role: enough for Infer
SPEC = {
    "modules": {
        "img": {
            "kind": "image_embedding",
            "image_size": 8,
            "channels": 1,
            "patch_size": 2,
            "d_model": 32,
            "init_std": 0.5,  # untrained, yet classes far apart: no near-ties to flip
        },
        "wav": {
            "kind": "audio_embedding",
            "sample_rate": 8000,
            "max_samples": 2400,
            "d_model": 32,
            "n_mels": 12,
            "n_fft": 256,
            "win_length": 200,
            "hop_length": 80,
        },
        "shared": {
            "kind": "attention",
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 4,
            "max_seq_len": 32,
        },
        "classes": {"kind": "classification", "d_model": 32, "n_classes": 10, "init_std": 0.5},
        "chars": {"kind": "ctc", "d_model": 32, "init_std": 0.5},
    },
    "pathways": {
        "digits": ["img", "shared", "classes"],
        "speech": ["wav", "shared", "chars"],
    },
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    spec = spec_lib.from_dict(SPEC)
    ex = LocalExecutor(spec, seed=0)
    path = tmp_path_factory.mktemp("ckpt")
    ckpt.save_spec(path, spec, ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(path, name, ex.state(name))
    home = tmp_path_factory.mktemp("home")
    auth.KeyStore([auth.hashed("reader", "generate", READER_KEY)]).save(home / "api-keys.json")
    saved = os.environ.get("PATHWAYS_HOME")
    os.environ["PATHWAYS_HOME"] = str(home)  # the CLI finds the gateway, TLS and key there
    try:
        with LocalDeployment(path, coordinator=False, secure_dir=home) as dep:
            tls = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
            with transport.channel(dep.gateway, tls=tls) as ch:
                yield dep, gateway_pb2_grpc.GatewayServiceStub(ch), ex, path
    finally:
        if saved is None:
            os.environ.pop("PATHWAYS_HOME", None)
        else:
            os.environ["PATHWAYS_HOME"] = saved


def _infer(stub, key=READER_KEY, **fields):
    return stub.Infer(
        gateway_pb2.InferRequest(**fields), timeout=60, metadata=auth.client_metadata(key)
    )


def _png(image_hw1: np.ndarray) -> bytes:
    return iio.imwrite(
        "<bytes>", (image_hw1[..., 0] * 255).round().astype(np.uint8), extension=".png"
    )


def _tone(n: int = 1800) -> np.ndarray:
    t = np.arange(n) / 8000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.hanning(n)).astype(np.float32)


def test_classify_through_the_gateway_equals_in_process(deployment):
    _, stub, ex, _ = deployment
    data = digits()
    x = data.test_images[:48]
    r = _infer(stub, pathway="digits", tensor=codec.encode(x))
    assert r.pathway == "digits" and r.WhichOneof("result") == "classification"
    want = Classifier(ex, "digits").probabilities(x)
    for item, p in zip(r.classification.items, want, strict=True):
        assert item.classes[0] == p.argmax() and sorted(item.classes) == list(range(10))
        assert list(item.probabilities) == sorted(item.probabilities, reverse=True)
        np.testing.assert_allclose(item.probabilities, p[list(item.classes)], atol=1e-5)
    assert len({i.classes[0] for i in r.classification.items}) > 1  # not one answer for all
    # A PNG: 8-bit pixels / 255, the pathway chosen by what it reads; top_k cuts the list.
    png = _png(x[0])
    r = _infer(stub, image=png, top_k=3)
    assert r.pathway == "digits" and len(r.classification.items[0].classes) == 3
    decoded = (iio.imread(png).astype(np.float32) / 255)[None, ..., None]
    p = Classifier(ex, "digits").probabilities(decoded)[0]
    top = r.classification.items[0]
    assert top.classes[0] == p.argmax()
    np.testing.assert_allclose(top.probabilities, np.sort(p)[::-1][:3], atol=1e-5)


def test_transcribe_and_embeddings_through_the_gateway_equal_in_process(deployment):
    _, stub, ex, _ = deployment
    wave = _tone()
    wav = audio.encode_wav(wave, 8000)
    r = _infer(stub, wav=wav)
    assert r.pathway == "speech" and r.WhichOneof("result") == "transcript"
    decoded, _ = audio.decode_wav(wav)
    assert list(r.transcript.texts) == [Transcriber(ex, "speech").transcribe(decoded, 8000)]
    x = digits().test_images[:3]
    embedding = gateway_pb2.InferRequest.OUTPUT_EMBEDDING
    r = _infer(stub, tensor=codec.encode(x), pathway="digits", output=embedding)
    got = codec.decode(r.embedding)
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, ex.forward("digits", x, head=False).mean(1), atol=1e-5)


def _wav_with(channels=1, rate=8000, bits=16, n=1800):
    w = audio.encode_wav(np.zeros(n, np.float32), rate)
    return w[:22] + channels.to_bytes(2, "little") + w[24:34] + bits.to_bytes(2, "little") + w[36:]


IMG = np.zeros((8, 8, 1), np.float32)
BAD = [
    # (request fields, status, the message starts with / contains)
    ({}, "INVALID_ARGUMENT", "input:"),
    ({"image": b"GIF89a..."}, "INVALID_ARGUMENT", "image: not a readable PNG or JPEG"),
    ({"image": "16x16"}, "INVALID_ARGUMENT", "image: 16x16 pixels"),
    ({"image": "rgb"}, "INVALID_ARGUMENT", "image: 3 channel(s)"),
    ({"wav": b"RIFF0000WAVE"}, "INVALID_ARGUMENT", "wav: WAV file has no fmt chunk"),
    ({"wav": _wav_with(channels=2)}, "INVALID_ARGUMENT", "wav: WAV has 2 channels"),
    ({"wav": _wav_with(rate=16000)}, "INVALID_ARGUMENT", "wav: sample rate 16000 Hz"),
    ({"wav": _wav_with(bits=24)}, "INVALID_ARGUMENT", "wav: WAV sample format 1 with 24 bits"),
    ({"wav": _wav_with(n=5000)}, "INVALID_ARGUMENT", "wav: module 'wav' (audio_embedding)"),
    (
        {"pathway": "digits", "tensor": np.zeros((2, 8, 8), np.float32)},
        "INVALID_ARGUMENT",
        "tensor: module 'img'",
    ),
    (
        {"pathway": "digits", "tensor": np.zeros((1, 8, 8, 1), np.int32)},
        "INVALID_ARGUMENT",
        "got int32",
    ),
    (
        {"pathway": "digits", "tensor": np.full((1, 8, 8, 1), np.nan, np.float32)},
        "INVALID_ARGUMENT",
        "tensor: has NaN",
    ),
    ({"pathway": "nope", "image": b""}, "NOT_FOUND", "unknown pathway 'nope'"),
    (
        {"pathway": "speech", "image": "ok"},
        "FAILED_PRECONDITION",
        "image: pathway 'speech' reads audio",
    ),
    (
        {"pathway": "digits", "tensor": IMG[None], "top_k": -1},
        "INVALID_ARGUMENT",
        "top_k must be >= 0",
    ),
    (
        {"pathway": "digits", "tensor": IMG[None], "session_id": "s"},
        "NOT_FOUND",
        "session_id: unknown episode 's'",
    ),
    (
        {"pathway": "digits", "tensor": IMG[None], "start_session": True},
        "FAILED_PRECONDITION",
        "only a pathway from observations to actions runs episodes",
    ),
]


@pytest.mark.parametrize("fields,code,says", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_requests_get_a_status_naming_the_field(deployment, fields, code, says):
    _, stub, _, _ = deployment
    fields = dict(fields)
    images = {"16x16": np.zeros((16, 16, 1)), "rgb": np.zeros((8, 8, 3)), "ok": IMG}
    if isinstance(fields.get("image"), str):
        a = images[fields["image"]]
        pixels = a[..., 0] if a.shape[-1] == 1 else a
        fields["image"] = iio.imwrite("<bytes>", pixels.astype(np.uint8), extension=".png")
    if isinstance(fields.get("tensor"), np.ndarray):
        fields["tensor"] = codec.encode(fields["tensor"])
    with pytest.raises(grpc.RpcError) as e:
        _infer(stub, **fields)
    assert e.value.code().name == code, e.value.details()
    assert says in e.value.details(), e.value.details()


def test_generate_on_a_vision_pathway_is_refused_and_keys_apply(deployment):
    _, stub, _, _ = deployment
    req = gateway_pb2.GenerateRequest(pathway="digits", prompt="x")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=30, metadata=auth.client_metadata(READER_KEY)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pathway 'digits' reads image" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _infer(stub, key=None, pathway="digits", tensor=codec.encode(IMG[None]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_classify_and_transcribe(deployment, tmp_path, capsys):
    dep, _, ex, path = deployment
    x = digits().test_images[:1]
    png = tmp_path / "digit.png"
    png.write_bytes(_png(x[0]))
    wav = tmp_path / "tone.wav"
    wav.write_bytes(audio.encode_wav(_tone(), 8000))
    capsys.readouterr()
    outs = []
    for where in (["--gateway", dep.gateway], ["--checkpoint", str(path)]):
        assert main(["classify", "--image", str(png), "--top-k", "2", *where]) == 0
        assert main(["transcribe", "--wav", str(wav), *where]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # through the services == in this process
    lines = outs[0].splitlines()
    label, prob = lines[0].split("\t")
    p = Classifier(ex, "digits").probabilities(
        (iio.imread(png).astype(np.float32) / 255)[None, ..., None]
    )[0]
    assert int(label) == int(p.argmax()) and abs(float(prob) - p.max()) < 1e-4
    # Bad input: exit code 2 and one readable line naming the problem.
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for argv, says in (
        (["classify", "--image", str(text)], "image: not a readable PNG or JPEG"),
        (["classify", "--image", str(tmp_path / "missing.png")], "No such file"),
        (["transcribe", "--wav", str(png)], "wav: not a WAV file"),
        (
            ["classify", "--image", str(png), "--checkpoint", str(path), "--pathway", "speech"],
            "reads audio",
        ),
        (["classify", "--image", str(png), "--top-k", "-1"], "--top-k must be >= 0"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (argv, err)


def test_training_through_the_services_uses_the_pathways_mask(deployment):
    """Last in the file: it changes the servers' weights. A few pipeline steps of the digits
    pathway through the module servers (images in, labels as the head's targets) give the
    losses and gradients of the same steps in this process with the bidirectional mask (a
    server training with a causal mask would not: checked below, so the test can fail)."""
    dep, _, ex, path = deployment
    cfg = TrainConfig(steps=3, warmup=1, lr=1e-2, batch_size=8, seq_len=16)
    data = digits()
    batches = [data.batch(s, 8, 16, seed=0) for s in range(3)]
    spec, _ = ckpt.load_spec(path)
    addresses = {m: dep.fleet.endpoints[m][0] for m in spec.pathway("digits").modules}
    tls = dep.identities.tls(certs.COORDINATOR)  # TrainingService takes service certificates
    stages = remote_stages(spec, "digits", addresses, cfg, tls=tls)
    try:
        engine = PipelineEngine(stages, 2, "1f1b")
        outs = [engine.step(x, y) for x, y in batches]
    finally:
        for st in stages:
            st.close()

    def local(causal: bool) -> list[float]:
        fresh = LocalExecutor(spec)
        for m in spec.pathway("digits").modules:
            fresh.set_state(m, ckpt.load_module(path, m, fresh.state(m)))
        chain = fresh.chain("digits")
        st = [LocalStage(rt, make_optimizer(cfg), causal=causal) for rt in chain]
        return [run_step(st, x, y, 2, "1f1b")["loss"] for x, y in batches]

    assert [o["loss"] for o in outs] == pytest.approx(local(causal=False), rel=1e-5)
    assert [o["loss"] for o in outs] != pytest.approx(local(causal=True), rel=1e-3)
