"""Tests for the digits data set: the stratified split, deterministic batches, pathway checks."""

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.datasets.digits import digits

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "patches": {
                "kind": "image_embedding",
                "image_size": 8,
                "channels": 1,
                "patch_size": 2,
                "d_model": 12,
            },
            "wide": {
                "kind": "image_embedding",
                "image_size": 6,
                "channels": 3,
                "patch_size": 2,
                "d_model": 12,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 16,
            },
            "classes": {"kind": "classification", "d_model": 12, "n_classes": 10},
            "few": {"kind": "classification", "d_model": 12, "n_classes": 7},
        },
        "pathways": {
            "ok": ["patches", "attn", "classes"],
            "rgb": ["wide", "attn", "classes"],
            "few": ["patches", "attn", "few"],
        },
    }
)


def test_stratified_quarter_split_is_deterministic():
    d = digits()
    assert d.train_images.shape == (1347, 8, 8, 1) and d.test_images.shape == (450, 8, 8, 1)
    assert (
        d.train_images.dtype == np.float32
        and 0 <= d.train_images.min() <= d.train_images.max() <= 1
    )
    # Stratified: each class's share of the test split is its share of the whole, to one image.
    whole = np.bincount(np.concatenate([d.train_labels, d.test_labels]), minlength=10)
    np.testing.assert_allclose(np.bincount(d.test_labels, minlength=10), whole * 0.25, atol=1)
    again = digits.__wrapped__()  # built afresh, not the cached copy
    np.testing.assert_array_equal(again.test_labels, d.test_labels)
    np.testing.assert_array_equal(again.train_images, d.train_images)


def test_training_batches_are_epochs_of_the_training_split():
    d = digits()
    n = len(d.train_labels)
    x, y = d.batch(3, 64, 0, seed=5)
    x2, y2 = d.batch(3, 64, 0, seed=5)
    np.testing.assert_array_equal(x, x2)  # a pure function of (seed, step)
    assert not np.array_equal(y, d.batch(3, 64, 0, seed=6)[1])
    # One epoch of batches (here 449 x 3 = n) sees every training image exactly once.
    seen = np.concatenate([d.batch(s, 3, 0, seed=1)[0] for s in range(n // 3)])
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(seen) == key(d.train_images)


def test_eval_batches_are_slices_of_the_test_split():
    d = digits()
    x, y = d.batch(1, 100, 0, seed=0, split="eval")
    np.testing.assert_array_equal(x, d.test_images[100:200])
    np.testing.assert_array_equal(y, d.test_labels[100:200])


def test_pathway_checks_name_module_and_values():
    digits().check_pathway(SPEC, "ok")
    with pytest.raises(ValueError, match=r"'wide' .*image_size 6, channels 3.* are 8x8x1"):
        digits().check_pathway(SPEC, "rgb")
    with pytest.raises(ValueError, match=r"'few' .*classes of size 7 .* has 10 classes"):
        digits().check_pathway(SPEC, "few")
