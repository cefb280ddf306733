"""`image_embedding` module: images (B, H, W, C) -> patch hidden states (B, N, D), learned positions.

A ViT's input: the image is cut into non-overlapping square patches (row-major order), each
patch's pixels are projected to d_model, and a learned vector per patch position is added.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pathways.config import positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import dense


@dataclasses.dataclass(frozen=True)
class ImageEmbeddingConfig:
    image_size: int  # square images: height == width
    channels: int
    patch_size: int
    d_model: int
    init_std: float = 0.02
    kind: str = dataclasses.field(default="image_embedding", init=False)

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "d_model"):
            positive_int(name, getattr(self, name))
        require(
            self.image_size % self.patch_size == 0,
            f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})",
        )
        positive_number("init_std", self.init_std)

    @property
    def grid(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def output_length(self) -> int:
        """Positions every image becomes (checked against the next modules' max_seq_len)."""
        return self.grid * self.grid

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("image", self.channels)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


def patches(images_bhwc: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, P*P*C): non-overlapping patches in row-major order, each patch's
    pixels in (row, column, channel) order."""
    b, h, w, c = images_bhwc.shape
    p = patch_size
    x = images_bhwc.reshape(b, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


class ImageEmbedding(nnx.Module):
    def __init__(self, cfg: ImageEmbeddingConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d_patch = cfg.patch_size * cfg.patch_size * cfg.channels
        self.project = dense(d_patch, cfg.d_model, bias=True, std=cfg.init_std, rngs=rngs)
        init = nnx.initializers.normal(cfg.init_std)
        self.positions = nnx.Param(init(rngs.params(), (cfg.output_length, cfg.d_model)))

    def __call__(self, images_bhwc: jax.Array) -> jax.Array:
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if images_bhwc.ndim != 4 or tuple(images_bhwc.shape[1:]) != want:
            raise ValueError(
                f"image_embedding expects images of shape (B, {', '.join(map(str, want))}) "
                f"(image_size {cfg.image_size}, channels {cfg.channels}); "
                f"got {tuple(images_bhwc.shape)}"
            )
        x_bnp = patches(images_bhwc.astype(jnp.float32), cfg.patch_size)
        return self.project(x_bnp) + self.positions[...][None]  # (B, N, D)

    def step(
        self,
        images_bhwc,
        positions=None,
        cache=None,
        slots=None,
        window=None,
        causal=True,
    ):
        """The kind's one step (see `modules.kind`): patch positions are fixed by the image, so
        `positions` is unused; no cache."""
        return self(images_bhwc), None


KIND = registry.register(
    Kind(
        "image_embedding",
        ImageEmbeddingConfig,
        ImageEmbedding,
        details=lambda c: f"{c.image_size}x{c.image_size}x{c.channels}, patch {c.patch_size}, "
        f"{c.output_length} positions",
    )
)
