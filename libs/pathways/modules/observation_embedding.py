"""`observation_embedding` module: observations (B, T, obs_dim) -> hidden states (B, T, D), one
position per time step, learned positions.

Two encoders, one per kind of observation:
- "vector": floats (Reacher's joint angles, velocities, target), each multiplied by a fixed
  per-feature `scale` from the spec, through an MLP.
- "grid": a small fully observed grid, rows x columns x 3 ints (minigrid's (object, colour,
  state) per cell, sent as floats): a learned vector per object, colour and state, summed per
  cell, then 3x3 convolutions (so nearby cells combine) and one projection of the whole grid.
  With `frame: agent` the grid is first re-drawn around the agent (the cell holding object
  `agent_object`, its state the direction it faces): a `view` x `view` window centred on it,
  turned so that it faces up, cells outside the grid object 0 ("unseen"). Nothing is hidden
  (the default view covers the whole grid from any cell), but what the agent must do next
  looks the same wherever it stands, which a convolution learns from far fewer examples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pathways.config import one_of, positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import dense

OBSERVATIONS = ("vector", "grid")
FRAMES = ("world", "agent")
STEP = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (row, column) ahead for directions 0 (east)..3


@dataclasses.dataclass(frozen=True)
class ObservationEmbeddingConfig:
    observation: str  # "vector" or "grid"
    obs_dim: int  # floats per time step; a grid's rows * columns * 3
    d_model: int
    max_seq_len: int  # time steps a window holds (learned positions)
    hidden: int = 128  # vector: the MLP's width
    scale: tuple[float, ...] = ()  # vector: a fixed factor per feature (empty: all 1)
    grid_rows: int = 0  # grid: its shape
    grid_columns: int = 0
    cell_dim: int = 16  # grid: width of a cell's vector
    conv_channels: int = 32  # grid: channels of each 3x3 convolution
    conv_layers: int = 2  # grid: 0 projects the cells directly
    vocab: tuple[int, int, int] = (11, 6, 4)  # grid: objects, colours, states (minigrid's)
    frame: str = "world"  # grid: "world" as observed, or "agent": centred on it, facing up
    view: int = 0  # grid, frame agent: the window's side (odd); 0: 2 * max(rows, columns) - 1
    agent_object: int = 10  # grid, frame agent: the object index of the agent (minigrid's)
    init_std: float = 0.02
    kind: str = dataclasses.field(default="observation_embedding", init=False)

    def __post_init__(self):
        # YAML gives lists; configs are hashed (they are part of a module's static graph).
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        one_of("observation", self.observation, OBSERVATIONS)
        for name in ("obs_dim", "d_model", "max_seq_len", "hidden", "cell_dim", "conv_channels"):
            positive_int(name, getattr(self, name))
        require(
            isinstance(self.conv_layers, int) and self.conv_layers >= 0,
            f"conv_layers must be a non-negative integer, got {self.conv_layers!r}",
        )
        positive_number("init_std", self.init_std)
        if self.observation == "vector":
            require(
                not self.scale or len(self.scale) == self.obs_dim,
                f"scale has {len(self.scale)} factors but obs_dim is {self.obs_dim}",
            )
            for s in self.scale:
                positive_number("scale", s)
            return
        positive_int("grid_rows", self.grid_rows)
        positive_int("grid_columns", self.grid_columns)
        require(
            self.obs_dim == self.grid_rows * self.grid_columns * 3,
            f"obs_dim ({self.obs_dim}) must be grid_rows * grid_columns * 3 "
            f"({self.grid_rows} * {self.grid_columns} * 3)",
        )
        require(len(self.vocab) == 3, f"vocab must be 3 sizes, got {list(self.vocab)}")
        for v in self.vocab:
            positive_int("vocab", v)
        one_of("frame", self.frame, FRAMES)
        require(
            isinstance(self.view, int) and self.view >= 0 and (self.view == 0 or self.view % 2),
            f"view must be 0 or an odd positive integer, got {self.view!r}",
        )
        require(
            isinstance(self.agent_object, int) and 0 <= self.agent_object < self.vocab[0],
            f"agent_object must be an object index below vocab[0] ({self.vocab[0]}), "
            f"got {self.agent_object!r}",
        )

    @property
    def cells(self) -> tuple[int, int]:
        """The (rows, columns) the convolutions see."""
        if self.frame == "world":
            return self.grid_rows, self.grid_columns
        side = self.view or 2 * max(self.grid_rows, self.grid_columns) - 1
        return side, side

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("observation", self.obs_dim)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


class ObservationEmbedding(nnx.Module):
    def __init__(self, cfg: ObservationEmbeddingConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.init_std
        init = nnx.initializers.normal(std)
        if cfg.observation == "vector":
            self.fc = dense(cfg.obs_dim, cfg.hidden, bias=True, std=std, rngs=rngs)
            self.out = dense(cfg.hidden, cfg.d_model, bias=True, std=std, rngs=rngs)
        else:
            self.objects = nnx.Embed(cfg.vocab[0], cfg.cell_dim, embedding_init=init, rngs=rngs)
            self.colours = nnx.Embed(cfg.vocab[1], cfg.cell_dim, embedding_init=init, rngs=rngs)
            self.states = nnx.Embed(cfg.vocab[2], cfg.cell_dim, embedding_init=init, rngs=rngs)
            convs, width = [], cfg.cell_dim
            for _ in range(cfg.conv_layers):
                convs.append(nnx.Conv(width, cfg.conv_channels, (3, 3), padding="SAME", rngs=rngs))
                width = cfg.conv_channels
            self.convs = nnx.List(convs)
            cells = cfg.cells[0] * cfg.cells[1] * width
            self.out = dense(cells, cfg.d_model, bias=True, std=std, rngs=rngs)
        self.positions = nnx.Param(init(rngs.params(), (cfg.max_seq_len, cfg.d_model)))

    def encode(self, obs_bto: jax.Array) -> jax.Array:
        """One vector per time step, before positions: (B, T, obs_dim) -> (B, T, D)."""
        cfg = self.cfg
        if obs_bto.ndim != 3 or obs_bto.shape[2] != cfg.obs_dim:
            raise ValueError(
                f"observation_embedding expects observations of shape (B, T, {cfg.obs_dim}) "
                f"(obs_dim {cfg.obs_dim}); got {tuple(obs_bto.shape)}"
            )
        x = obs_bto.astype(jnp.float32)
        if cfg.observation == "vector":
            if cfg.scale:
                x = x * jnp.asarray(cfg.scale, jnp.float32)
            return self.out(jax.nn.gelu(self.fc(x)))
        b, t, _ = x.shape
        ids = jnp.round(x).astype(jnp.int32).reshape(b * t, cfg.grid_rows, cfg.grid_columns, 3)
        # Values outside a vocabulary (never minigrid's) are clipped rather than wrapped.
        ids = jnp.clip(ids, 0, jnp.asarray(cfg.vocab, jnp.int32) - 1)
        if cfg.frame == "agent":
            ids = agent_view(ids, cfg.cells[0], cfg.agent_object)
        cells = self.objects(ids[..., 0]) + self.colours(ids[..., 1]) + self.states(ids[..., 2])
        for conv in self.convs:
            cells = jax.nn.gelu(conv(cells))  # (B*T, rows, columns, channels)
        return self.out(cells.reshape(b, t, -1))

    def __call__(self, obs_bto: jax.Array, positions_bt: jax.Array) -> jax.Array:
        # Padding positions may be out of range (== max_seq_len); clip, they are masked later.
        pos = jnp.clip(positions_bt, 0, self.cfg.max_seq_len - 1)
        return self.encode(obs_bto) + self.positions[...][pos]

    def step(self, obs_bto, positions_bt, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): no cache, so (hidden states, None)."""
        return self(obs_bto, positions_bt), None


def agent_view(ids_nhw3: jax.Array, side: int, agent_object: int) -> jax.Array:
    """Grids (N, H, W, 3) -> (N, side, side, 3) windows centred on the agent and turned so that
    it faces up (row 0 ahead, the last column on its right); cells off the grid are zeros."""
    n, h, w, _ = ids_nhw3.shape
    flat = ids_nhw3.reshape(n, h * w, 3)
    at = jnp.argmax(flat[..., 0] == agent_object, axis=1)  # (N,) the agent's cell
    ay, ax = at // w, at % w
    d = jnp.take_along_axis(flat[..., 2], at[:, None], axis=1)[:, 0] % 4  # facing
    step = jnp.asarray(STEP, jnp.int32)
    (fy, fx), (ry, rx) = step[d].T, step[(d + 1) % 4].T  # ahead, and to its right
    r = side // 2
    ahead = (r - jnp.arange(side))[:, None]  # (side, 1): rows above the centre are ahead
    right = (jnp.arange(side) - r)[None, :]  # (1, side)
    y = ay[:, None, None] + ahead * fy[:, None, None] + right * ry[:, None, None]
    x = ax[:, None, None] + ahead * fx[:, None, None] + right * rx[:, None, None]
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)  # (N, side, side)
    idx = jnp.where(inside, y * w + x, 0).reshape(n, side * side)
    cells = jnp.take_along_axis(flat, idx[..., None], axis=1).reshape(n, side, side, 3)
    return jnp.where(inside[..., None], cells, 0)


def _details(c: ObservationEmbeddingConfig) -> str:
    if c.observation == "vector":
        return f"vector of {c.obs_dim}, MLP {c.hidden}, max_seq_len {c.max_seq_len}"
    frame = "" if c.frame == "world" else f", agent's frame {c.cells[0]}x{c.cells[1]}"
    return (
        f"grid {c.grid_rows}x{c.grid_columns}{frame}, {c.conv_layers} conv x {c.conv_channels}, "
        f"max_seq_len {c.max_seq_len}"
    )


KIND = registry.register(
    Kind(
        "observation_embedding", ObservationEmbeddingConfig, ObservationEmbedding, details=_details
    )
)
