"""Settings between their dataclasses and their wire messages, in one place: sampling
(`SamplingParams` <-> `SamplingOptions`, `RowSampling`) and the optimizer (`TrainConfig` <->
`OptimizerConfig`). Values are checked where the dataclass is built; errors name the field.

Light on purpose (no jax at import): clients build their `SamplingOptions` here too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pathways.v1 import gateway_pb2, module_pb2, training_pb2

if TYPE_CHECKING:
    from pathways.sampling import SamplingParams
    from pathways.train import TrainConfig


def sampling_options(
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    stop: Sequence[str] = (),
) -> gateway_pb2.SamplingOptions:
    """A client's options, sent unchecked: the gateway checks them and names the bad one (as a
    gRPC status). `top_p`, `max_new_tokens` None: unset, so the gateway's defaults apply."""
    o = gateway_pb2.SamplingOptions(temperature=temperature, top_k=top_k, seed=seed, stop=stop)
    if top_p is not None:
        o.top_p = top_p
    if max_new_tokens is not None:
        o.max_new_tokens = max_new_tokens
    return o


def sampling_from_options(o: gateway_pb2.SamplingOptions) -> SamplingParams:
    """Proto options -> SamplingParams (unset top_p/max_new_tokens take the library defaults)."""
    from pathways.sampling import SamplingParams  # jax: servers only

    return SamplingParams(
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p if o.HasField("top_p") else 1.0,
        seed=o.seed,
        max_new_tokens=o.max_new_tokens if o.HasField("max_new_tokens") else 64,
        stop=tuple(o.stop),
    )


def row_sampling(s: SamplingParams) -> module_pb2.RowSampling:
    """What a head module needs of one row's sampling (stops and lengths stay with the caller)."""
    return module_pb2.RowSampling(
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed
    )


def sampling_from_row(r: module_pb2.RowSampling) -> SamplingParams:
    from pathways.sampling import SamplingParams

    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed)


def optimizer_config(cfg: TrainConfig) -> training_pb2.OptimizerConfig:
    """The optimizer part of a TrainConfig, for a module that trains in its own server."""
    return training_pb2.OptimizerConfig(
        lr=cfg.lr,
        warmup=cfg.warmup,
        steps=cfg.steps,
        min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay,
        clip=cfg.clip,
    )


def train_config(opt: training_pb2.OptimizerConfig) -> TrainConfig:
    """The optimizer part of a TrainConfig from the wire; bad values raise ValueError naming
    their field."""
    from pathways.train import TrainConfig  # optax: the gateway converts sampling only

    return TrainConfig(
        steps=opt.steps,
        lr=opt.lr,
        warmup=opt.warmup,
        min_lr_ratio=opt.min_lr_ratio,
        weight_decay=opt.weight_decay,
        clip=opt.clip,
    )
