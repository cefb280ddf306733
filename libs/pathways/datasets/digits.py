"""scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as image data:
a stratified 25 % test split with seed 0, batches a pure function of (seed, step)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pathways.spec import PathwaySpec


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Labelled images split into train and test; `batch` has `TokenData.batch`'s signature, so
    the same `Trainer` loop trains on it (targets are labels; `seq_len` is not used)."""

    train_images: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, H, W, C)
    test_labels: np.ndarray  # (M,)
    n_classes: int
    name: str = "images"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """(images (B, H, W, C) float32, labels (B,) int32). Train: epochs of the training
        images, each shuffled by (seed, epoch); eval: consecutive slices of the test split."""
        if split == "train":
            n = len(self.train_labels)
            at = step * batch_size + np.arange(batch_size)
            idx = np.empty(batch_size, np.int64)
            for epoch in np.unique(at // n):
                rows = at // n == epoch
                idx[rows] = np.random.default_rng([seed, int(epoch)]).permutation(n)[at[rows] % n]
            return self.train_images[idx], self.train_labels[idx]
        n = len(self.test_labels)
        idx = (step * batch_size + np.arange(batch_size)) % n
        return self.test_images[idx], self.test_labels[idx]

    def check_pathway(self, spec: PathwaySpec, pathway: str) -> None:
        """Raises ValueError naming the module, field and values when `pathway` cannot read
        these images or predict their classes."""
        chain = spec.pathway(pathway).modules
        first, last = spec.modules[chain[0]], spec.modules[chain[-1]]
        h, w, c = self.image_shape
        size = getattr(first, "image_size", None)
        if first.input_contract != ("image", c) or size != h or h != w:
            raise ValueError(
                f"pathway {pathway!r}: {chain[0]!r} ({first.kind}) reads "
                f"{first.input_contract[0]} (image_size {size}, channels "
                f"{first.input_contract[1]}) but the {self.name} images are {h}x{w}x{c}"
            )
        kind, n = last.output_contract
        if kind != "classes" or n < self.n_classes:
            raise ValueError(
                f"pathway {pathway!r}: {chain[-1]!r} ({last.kind}) outputs {kind} of size {n} "
                f"but the {self.name} data set has {self.n_classes} classes"
            )


@functools.cache
def digits(test_fraction: float = 0.25, split_seed: int = 0) -> ImageData:
    """The digits as (8, 8, 1) images scaled to [0, 1]; the test split is stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    labels = d.target.astype(np.int32)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    return ImageData(tr_x, tr_y, te_x, te_y, n_classes=10, name="digits")
