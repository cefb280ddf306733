"""Tests for the image embedding: patch order, projection plus learned positions, shape errors."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.image_embedding import ImageEmbedding, ImageEmbeddingConfig, patches

# Odd sizes: 6x6 images with 3 channels in 2x2 patches -> 9 positions of 12 values each.
CFG = ImageEmbeddingConfig(image_size=6, channels=3, patch_size=2, d_model=7)


def _images(seed, b=2):
    return np.random.default_rng(seed).standard_normal((b, 6, 6, 3), dtype=np.float32)


def test_patches_are_row_major_blocks():
    x = _images(0)
    got = np.asarray(patches(x, 2))
    assert got.shape == (2, 9, 12)
    for i in range(3):
        for j in range(3):
            block = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].reshape(2, 12)
            np.testing.assert_array_equal(got[:, 3 * i + j], block)


def test_projection_plus_learned_position():
    m = ImageEmbedding(CFG, nnx.Rngs(0))
    x = _images(1)
    h, cache = m.step(x, None)
    assert cache is None and h.shape == (2, 9, 7) and h.dtype == np.float32
    w, b = np.asarray(m.project.kernel[...]), np.asarray(m.project.bias[...])
    pos = np.asarray(m.positions[...])
    want = np.asarray(patches(x, 2)) @ w + b + pos[None]
    np.testing.assert_allclose(np.asarray(h), want, rtol=1e-5, atol=1e-6)
    assert np.abs(pos).max() > 0  # learned positions start random, not zero


def test_wrong_image_shape_names_the_config():
    m = ImageEmbedding(CFG, nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"\(B, 6, 6, 3\).*image_size 6, channels 3.*\(2, 6, 6, 1\)"
    ):
        m(np.zeros((2, 6, 6, 1), np.float32))


def test_contracts_and_length():
    assert CFG.input_contract == ("image", 3)
    assert CFG.output_contract == ("hidden", 7)
    assert CFG.output_length == 9


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(patch_size=4), "patch_size (4) must divide image_size (6)"),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(image_size=-6), "image_size must be a positive integer, got -6"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, words):
    fields = dict(image_size=6, channels=3, patch_size=2, d_model=7) | kwargs
    with pytest.raises(ConfigError) as e:
        ImageEmbeddingConfig(**fields)
    assert words in str(e.value)
