"""safetensors reading and writing: dtypes, layout, and agreement with the reference library."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from pathways.hf import files


def test_write_then_read_float_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.bf16": rng.standard_normal((2, 3)).astype(jnp.bfloat16),
    }
    files.write_safetensors(tmp_path / files.WEIGHTS, tensors)
    t = files.Tensors(tmp_path)
    assert t.names() == set(tensors)
    for name, arr in tensors.items():
        got = t.get(name, arr.shape)
        assert got.dtype == np.float32  # widened losslessly
        np.testing.assert_array_equal(got, arr.astype(np.float32))


def test_reference_library_reads_what_we_write(tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
    files.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(back[name], arr)


def test_we_read_what_the_reference_library_writes(tmp_path):
    tensors = {"x": np.linspace(0, 1, 10, dtype=np.float32), "y": np.eye(3, dtype=np.float16)}
    safetensors.numpy.save_file(tensors, str(tmp_path / files.WEIGHTS))
    t = files.Tensors(tmp_path)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(t.get(name, arr.shape), arr.astype(np.float32))


def test_unconsumed_tensors_are_reported(tmp_path):
    path = tmp_path / files.WEIGHTS
    files.write_safetensors(
        path,
        {
            "used": np.zeros(2, np.float32),
            "buffer.bias": np.zeros(2, np.float32),
            "extra.weight": np.zeros(2, np.float32),
        },
    )
    t = files.Tensors(tmp_path)
    t.get("used", (2,))
    assert t.taken == {"used"}
    with pytest.raises(files.HfFormatError) as e:
        t.check_all_taken()
    # The first one left, in name order, with the file it is in and how many more there are.
    assert str(e.value) == (
        f"{path}: unexpected tensor 'buffer.bias' (and 1 more) for this architecture"
    )
    with pytest.raises(files.HfFormatError, match=r"unexpected tensor 'extra\.weight' for"):
        t.check_all_taken(ignore=(".bias",))  # an ignored buffer is fine, the weight is not
    t.get("extra.weight", (2,))
    t.check_all_taken(ignore=(".bias",))  # everything else taken: no error
