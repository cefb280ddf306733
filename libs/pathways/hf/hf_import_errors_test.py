"""A missing or malformed Hugging Face file gives one clear error naming the file and the field."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pathways.hf import convert, files
from pathways.hf.files import HfFormatError

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "hf"


@pytest.fixture(params=["gpt2", "llama"])
def folder(request, tmp_path):
    dst = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


def _weights(folder: Path) -> Path:
    return (
        folder / "model.safetensors"
        if (folder / "model.safetensors").exists()
        else sorted(folder.glob("model-*.safetensors"))[0]
    )


def _error(folder: Path, split=None) -> str:
    with pytest.raises((HfFormatError, ValueError)) as e:
        convert.load_hf(folder, split)
    return str(e.value)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    assert "config.json: file not found" in _error(folder)


def test_config_not_json(folder):
    (folder / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(folder)


def test_missing_structural_field(folder):
    field = "n_embd" if folder.name == "gpt2" else "hidden_size"
    _edit_config(folder, **{field: _DELETE})
    msg = _error(folder)
    assert "config.json" in msg and f"field {field!r} is missing" in msg


def test_wrongly_typed_field(folder):
    field = "n_layer" if folder.name == "gpt2" else "num_hidden_layers"
    _edit_config(folder, **{field: "three"})
    assert f"field {field!r} must be int, got 'three'" in _error(folder)


def test_unsupported_model_type(folder):
    _edit_config(folder, model_type="bert")
    assert "field 'model_type' = 'bert' is not supported" in _error(folder)


def test_unsupported_options(tmp_path):
    shutil.copytree(FIXTURES / "llama", tmp_path / "m")
    _edit_config(tmp_path / "m", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
    assert "'rope_parameters.rope_type' = 'llama3' is not supported" in _error(tmp_path / "m")
    _edit_config(tmp_path / "m", rope_parameters=_DELETE, hidden_act="gelu")
    assert "field 'hidden_act' must be 'silu'" in _error(tmp_path / "m")


def test_shape_mismatch_names_tensor(folder):
    field = "vocab_size"
    _edit_config(folder, **{field: 300})
    msg = _error(folder)
    assert "has shape [301," in msg and "expected [300," in msg and "tensor '" in msg


def test_missing_weights(folder):
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    assert "no model.safetensors and no model.safetensors.index.json" in _error(folder)


def test_missing_tensor(folder):
    path = _weights(folder)
    t = files.Tensors(folder)
    names = sorted(n for n in t.names() if n in _names_in(path))
    dropped = names[0]
    files.write_safetensors(path, {n: t.get(n, t.get_shape(n)) for n in names[1:]})
    assert f"tensor {dropped!r} is missing" in _error(folder)


def test_unexpected_tensor(folder):
    path = _weights(folder)
    t = files.Tensors(folder)
    kept = {n: t.get(n, t.get_shape(n)) for n in _names_in(path)}
    files.write_safetensors(path, {**kept, "extra.weight": np.zeros(3, np.float32)})
    assert "unexpected tensor 'extra.weight'" in _error(folder)


def test_truncated_safetensors(folder):
    path = _weights(folder)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    msg = _error(folder)
    assert path.name in msg and "data_offsets" in msg


def test_bad_safetensors_header(folder):
    path = _weights(folder)
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    assert f"{path.name}: safetensors header is not valid JSON" in _error(folder)


def test_index_names_missing_shard(tmp_path):
    shutil.copytree(FIXTURES / "llama", tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = _error(tmp_path / "m")
    assert "model.safetensors.index.json: field 'weight_map' names shard" in msg
    assert shard.name in msg


def test_bad_split(folder):
    assert "sums to 2 layers but the model has 3" in _error(folder, "1,1")
    assert "comma-separated layer counts" in _error(folder, "a,b")


def _names_in(path: Path) -> set[str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return set(json.loads(raw[8 : 8 + n])) - {"__metadata__"}


def test_max_seq_len_caps_rope_models_only():
    capped = convert.load_hf(FIXTURES / "llama", max_seq_len=32)
    assert capped.spec.pathway(capped.pathway).max_seq_len == 32
    with pytest.raises(ValueError, match="RoPE models only"):
        convert.load_hf(FIXTURES / "gpt2", max_seq_len=32)


def test_import_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "old.txt").write_text("stale modules would mix in")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.import_hf(FIXTURES / "gpt2", tmp_path)
