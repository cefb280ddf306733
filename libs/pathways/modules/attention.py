"""`attention` module: a stack of pre-norm transformer blocks with a slot-addressed KV cache.

The KV cache is not module state: it is a pytree {"k", "v"} of shape (L, S, T_max, K, H) owned by
whoever serves sessions (an executor or a module server). A session owns one or more slots S.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import backends
from pathways.config import one_of, positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import MLPS, NORMS, Mlp, attend, dense, make_norm, rope


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (multi-head)
    d_ff: int | None = None  # None means 4 * d_model
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    positions: str = "none"  # "rope" rotates q/k; "none" relies on the embedding's positions
    rope_theta: float = 10000.0
    bias: bool = True
    init_std: float = 0.02
    # Zero-initialised residual output projections make a freshly inserted module the identity.
    zero_init_output: bool = False
    kind: str = dataclasses.field(default="attention", init=False)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            positive_int(name, getattr(self, name))
        require(
            self.d_model % self.n_heads == 0,
            f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})",
        )
        if self.n_kv_heads is not None:
            positive_int("n_kv_heads", self.n_kv_heads)
            require(
                self.n_heads % self.n_kv_heads == 0,
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})",
            )
        if self.d_ff is not None:
            positive_int("d_ff", self.d_ff)
        one_of("norm", self.norm, NORMS)
        one_of("mlp", self.mlp, MLPS)
        one_of("positions", self.positions, ("none", "rope"))
        if self.positions == "rope":
            require(
                self.head_dim % 2 == 0,
                f"rope needs an even head_dim, got {self.head_dim} "
                f"(d_model {self.d_model} / n_heads {self.n_heads})",
            )
        positive_number("rope_theta", self.rope_theta)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * itemsize


class Block(nnx.Module):
    def __init__(self, cfg: AttentionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.d_model, cfg.head_dim
        std = cfg.init_std
        # GPT-2's residual-projection scaling keeps the residual stream's variance flat with depth.
        out_std = 0.0 if cfg.zero_init_output else std / math.sqrt(2 * cfg.n_layers)
        self.norm1 = make_norm(cfg.norm, d, cfg.norm_eps, rngs)
        self.q = dense(d, cfg.n_heads * h, bias=cfg.bias, std=std, rngs=rngs)
        self.k = dense(d, cfg.kv_heads * h, bias=cfg.bias, std=std, rngs=rngs)
        self.v = dense(d, cfg.kv_heads * h, bias=cfg.bias, std=std, rngs=rngs)
        self.o = dense(cfg.n_heads * h, d, bias=cfg.bias, std=out_std, rngs=rngs)
        self.norm2 = make_norm(cfg.norm, d, cfg.norm_eps, rngs)
        self.mlp = Mlp(cfg.mlp, d, cfg.ff_dim, bias=cfg.bias, std=std, out_std=out_std, rngs=rngs)

    def qkv(self, x_btd, positions_bt):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        h = self.norm1(x_btd)
        q = self.q(h).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.k(h).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v = self.v(h).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cfg.positions == "rope":
            q = rope(q, positions_bt, cfg.rope_theta)
            k = rope(k, positions_bt, cfg.rope_theta)
        return q, k, v

    def finish(self, x_btd, attn_btf):
        x = x_btd + self.o(attn_btf)
        return x + self.mlp(self.norm2(x))


class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, causal: bool = True):
        """Full forward without a cache (training, stateless batches). `causal`: each position
        attends to those at or before it (text); False: to every position (an image, an
        utterance). The mask belongs to the call, not the module: pathways of both kinds share
        one attention module."""
        if causal:
            mask = positions_bt[:, None, :] <= positions_bt[:, :, None]  # (B, T, S)
        else:
            b, t = positions_bt.shape
            mask = jnp.ones((b, t, t), bool)
        for block in self.blocks:
            q, k, v = block.qkv(x_btd, positions_bt)
            x_btd = block.finish(x_btd, attend(q, k, v, mask))
        return x_btd

    def step(self, x_btd, positions_bt, cache=None, slots_b=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): the stateless forward without a cache
        (with the call's mask), else `forward_cached` (sessions generate text: causal).
        Returns (y_btd, cache)."""
        if cache is None:
            return self(x_btd, positions_bt, causal), None
        return self.forward_cached(x_btd, positions_bt, cache, slots_b, window)

    def forward_cached(self, x_btd, positions_bt, cache, slots_b, window: int):
        """Prefill (T > 1) or decode (T == 1) for the sessions in `slots_b`.

        Writes this chunk's keys/values at (slot, position) and attends to the first `window`
        cache positions with a causal mask. Padding rows carry position == max_seq_len: their
        writes are dropped and their outputs are garbage the caller ignores. Where the runtime
        traces the step using an optional backend (`pathways.backends.using`), a decode step's
        (T == 1) cache update and attention are that backend's `attend_cached`, in place; prefill
        chunks keep XLA's batched dots, which are faster when many queries share the keys.

        Returns:
            (y_btd, new_cache).
        """
        attend_cached = backends.optional("attend_cached") if x_btd.shape[1] == 1 else None
        if attend_cached is not None:

            def attend_layer(i, q, k, v, ks, vs):
                return attend_cached(q, k, v, positions_bt, slots_b, ks, vs, layer=i, window=window)

        else:
            rows = slots_b[:, None]  # (B, 1) broadcasts against positions (B, T)
            key_pos = jnp.arange(window)
            mask = key_pos[None, None, :] <= positions_bt[:, :, None]  # (B, T, W)

            def attend_layer(i, q, k, v, ks, vs):
                ks = ks.at[i, rows, positions_bt].set(k, mode="drop")
                vs = vs.at[i, rows, positions_bt].set(v, mode="drop")
                k_ctx = ks[i, slots_b, :window]  # (B, W, K, H)
                v_ctx = vs[i, slots_b, :window]
                return attend(q, k_ctx, v_ctx, mask), ks, vs

        ks, vs = cache["k"], cache["v"]
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(x_btd, positions_bt)
            attn, ks, vs = attend_layer(i, q, k, v, ks, vs)
            x_btd = block.finish(x_btd, attn)
        return x_btd, {"k": ks, "v": vs}


def empty_cache(cfg: AttentionConfig, slots: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    shape = (cfg.n_layers, slots, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


_COLUMNS = ("q", "k", "v", "fc", "gate", "up")  # output features split: heads, MLP columns
_ROWS = ("o", "down")  # input features split; their outputs are summed across devices


def partition(cfg: AttentionConfig, path: tuple, shape: tuple) -> list:
    """Megatron-style tensor parallelism: q/k/v and the MLP's first layer by output column
    (heads, hidden units), the output projections by input row; norms and the row-parallel
    layers' biases replicated."""
    layer, leaf = (path[-2], path[-1]) if len(path) >= 2 else ("", "")
    if layer in _COLUMNS:
        return [(None, "tp")] if leaf == "kernel" else [("tp",)]
    if layer in _ROWS and leaf == "kernel":
        return [("tp", None)]
    return []


def cache_partition(cfg: AttentionConfig, path: tuple, shape: tuple) -> list:
    """Keys and values (L, S, T, K, H) split by kv head, as k and v are computed."""
    return [(None, None, None, "tp", None)]


KIND = registry.register(
    Kind(
        "attention",
        AttentionConfig,
        Attention,
        empty_cache=empty_cache,
        # Zero residual outputs: a new block stack adds nothing to the residual stream.
        identity=lambda c: dataclasses.replace(c, zero_init_output=True),
        details=lambda c: f"{c.n_layers} layers, {c.n_heads} heads, "
        f"{c.kv_heads} kv heads, {c.mlp}, {c.norm}",
        partition=partition,
        cache_partition=cache_partition,
        score_heads=lambda c: c.n_heads,
    )
)
