"""Building blocks shared by the module kinds: norms, MLPs, rotary embeddings, attention math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import backends, weights

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")

# Large negative instead of -inf so fully masked rows (padding) stay finite.
_MASK_VALUE = -1e30


def make_norm(kind: str, dim: int, eps: float, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama) over the last axis."""
    if kind == "layernorm":
        return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
    return nnx.RMSNorm(dim, epsilon=eps, rngs=rngs)


class Dense(nnx.Linear):
    """nnx.Linear whose kernel may also be packed by an optional backend (serving weights).

    Parameters and their names are nnx.Linear's. A backend that packs weights (the native CPU
    kernels: (K, N) -> (N / 32, K, 32) panels) swaps the kernel, and this layer recognises it by
    its rank and multiplies through the backend's `packed_matmul` (`pathways.backends`); over a
    sequence (x of shape (..., T > 1, K): prefill) it may use faster tiles.
    """

    def __call__(self, x):
        kernel = self.kernel[...]
        if kernel.ndim != 3:
            if kernel.dtype == jnp.float32:
                return super().__call__(x)
            y = weights.matmul(x, kernel)  # a bfloat16 or int8 serving copy (`pathways.weights`)
            return y if self.bias is None else y + self.bias[...]
        prefill = x.ndim >= 3 and x.shape[-2] > 1
        y = backends.op("packed_matmul")(x, kernel, self.out_features, tiles=prefill)
        return y if self.bias is None else y + self.bias[...]


def dense(d_in: int, d_out: int, *, bias: bool, std: float, rngs: nnx.Rngs) -> Dense:
    init = nnx.initializers.normal(std) if std > 0 else nnx.initializers.zeros_init()
    return Dense(d_in, d_out, use_bias=bias, kernel_init=init, rngs=rngs)


class Mlp(nnx.Module):
    """GELU (tanh approximation, as GPT-2) or SwiGLU (Llama) feed-forward."""

    def __init__(
        self,
        kind: str,
        d: int,
        d_ff: int,
        *,
        bias: bool,
        std: float,
        out_std: float,
        rngs: nnx.Rngs,
    ):
        self.kind = kind
        if kind == "gelu":
            self.fc = dense(d, d_ff, bias=bias, std=std, rngs=rngs)
        else:
            self.gate = dense(d, d_ff, bias=bias, std=std, rngs=rngs)
            self.up = dense(d, d_ff, bias=bias, std=std, rngs=rngs)
        self.down = dense(d_ff, d, bias=bias, std=out_std, rngs=rngs)

    def __call__(self, x):
        if self.kind == "gelu":
            return self.down(jax.nn.gelu(self.fc(x), approximate=True))
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split convention (as Hugging Face Llama's rotate_half)."""
    hd = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # (hd/2,)
    freqs = positions_bt[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = x_btnh[..., : hd // 2], x_btnh[..., hd // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


def attend(q_btnh, k_bskh, v_bskh, mask_bts):
    """Grouped-query attention: N query heads share K key/value heads (N % K == 0).

    mask_bts[b, t, s] is True where query t may attend key s. Laid out as one batched matmul
    per K/V head over its G query heads' T rows (XLA's CPU einsum with these labels was ~25 %
    slower for a prefill chunk).
    """
    b, t, n, h = q_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    q = q_btnh.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    scores = jnp.matmul(q, k_bskh.transpose(0, 2, 3, 1)) / jnp.sqrt(jnp.float32(h))
    mask = jnp.broadcast_to(mask_bts[:, None, None], (b, kv, g, t, s)).reshape(b, kv, g * t, s)
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v_bskh.dtype)
    out = jnp.matmul(probs, v_bskh.transpose(0, 2, 1, 3))  # (B, K, G*T, H)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)
