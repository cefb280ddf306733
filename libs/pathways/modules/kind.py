"""The one interface every module kind implements, and what the code around modules asks of it.

A kind is a frozen config dataclass (with a `kind` name, `input_contract` and `output_contract`)
plus a Flax NNX module built as `module(cfg, rngs)` with one step:

    module.step(x, positions, cache=None, slots=None, window=None, causal=True)
        -> (y, cache)

`cache=None` is the stateless forward (training, whole batches); kinds without a per-session
cache always take and return None. `causal` is the call's attention mask (the pathway's: text
is causal, an image or an utterance is not); kinds that do not attend ignore it, and sessions
(with a cache) generate text, so they are causal. A head (`is_head`) maps hidden states to its
outputs (a decoding head: logits of any leading shape; a classification head pools (B, T, D)
into (B, classes)) and has `loss(h, targets, mask=None)`, where targets are whatever its task
predicts (next tokens (B, T), labels (B,)). No step takes a backend: an op with a faster
implementation on some device is asked of `pathways.backends` while the step is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx


def _no_details(cfg: Any) -> str:
    return ""


@dataclasses.dataclass(frozen=True)
class Kind:
    """A module kind: its config and module classes and the facts the code around it needs.

    Attributes:
        name: the spec's `kind:` value (equal to the config's `kind` field).
        config: the frozen config dataclass; `input_contract` / `output_contract` give
            (activation name, size): "tokens" (int32 (B, T) ids < size), "image" (float
            (B, H, W, size channels)), "audio" (float (B, samples) at size Hz), "hidden" (float
            (B, T, size)), "logits" (float (B, T, size): next-token scores), "classes" (float
            (B, size)) or "characters" (float (B, T, size): per-position CTC scores). A config
            may also have `output_length`: the most positions it outputs (an image's patches,
            the frames of the longest waveform), checked against the `max_seq_len` of the
            modules after it.
        module: the NNX module class, `module(cfg, rngs)`.
        is_head: maps hidden states to logits, has `loss`, and ends a pathway (samples).
        empty_cache: `(cfg, slots) -> cache` for kinds that keep a per-session cache (a pytree
            whose leaves have the slot on axis 1); None for kinds without one.
        identity: `cfg -> cfg` whose fresh module computes the identity (hidden -> hidden kinds
            that can be inserted into a trained pathway, or start a distilled student so);
            None where the kind cannot.
        details: one line describing a config (`pathways inspect`).
        partition: `(cfg, path, shape) -> [spec, ...]` for a parameter (path: its names, e.g.
            ("blocks", "0", "q", "kernel")): how it may be split over a tensor-parallel mesh,
            in order of preference; a spec names the mesh axis ("tp") or None per array axis
            (see `pathways.sharding`). None or [] replicates. None for the whole kind: all
            replicated.
        cache_partition: the same for the leaves of its cache (path: the leaf's key).
        score_heads: `cfg -> n`: attention scores a position computes per attended position
            (its heads; 0 for kinds that do not attend), for the memory a call reserves.
    """

    name: str
    config: type
    module: type
    is_head: bool = False
    empty_cache: Callable[[Any, int], Any] | None = None
    identity: Callable[[Any], Any] | None = None
    details: Callable[[Any], str] = _no_details
    partition: Callable[[Any, tuple, tuple], list] | None = None
    cache_partition: Callable[[Any, tuple, tuple], list] | None = None
    score_heads: Callable[[Any], int] = lambda cfg: 0

    def __post_init__(self):
        field = next((f for f in dataclasses.fields(self.config) if f.name == "kind"), None)
        if field is None or field.default != self.name:
            raise ValueError(
                f"kind {self.name!r}: config {self.config.__name__} must have a field "
                f"`kind` defaulting to {self.name!r}"
            )
        if not callable(getattr(self.module, "step", None)):
            raise ValueError(f"kind {self.name!r}: module {self.module.__name__} has no step()")
        if self.is_head and not callable(getattr(self.module, "loss", None)):
            raise ValueError(f"kind {self.name!r}: a head's module must have loss()")

    def __str__(self) -> str:  # messages name the kind as the spec does
        return self.name

    @property
    def has_cache(self) -> bool:
        """Whether sessions keep a per-session cache of this kind (owned by whoever serves)."""
        return self.empty_cache is not None

    def build(self, cfg: Any, seed: int = 0) -> nnx.Module:
        """The module for `cfg` with freshly initialised parameters."""
        return self.module(cfg, nnx.Rngs(seed))
