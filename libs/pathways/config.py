"""Checks for frozen, validated config dataclasses (module kinds, training, jobs): positive
integers and numbers, one of a set, unknown and missing fields; each error names the field and
the value. Light on purpose (no jax): request classes that clients build use it too."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config with a bad or missing value (a ValueError); the message names the field and value."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def positive_int(name: str, value: Any) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


def positive_number(name: str, value: Any) -> None:
    # Checks the type too: YAML reads `1e-5` (no dot) as a string, and `"1e-5" > 0` would raise a
    # TypeError that names neither the field nor the value.
    require(
        isinstance(value, int | float) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive number, got {value!r}",
    )


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    require(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def schedule(steps: Any, lr: Any, warmup: Any) -> None:
    """A training run's optimizer schedule: positive steps and learning rate, a warmup in
    [0, steps) (`train.TrainConfig`, and requests that build one without importing jax)."""
    positive_int("steps", steps)
    positive_number("lr", lr)
    require(
        isinstance(warmup, int) and 0 <= warmup < steps,
        f"warmup must be in [0, steps={steps}), got {warmup!r}",
    )


def unknown_fields(cls: type, data: dict[str, Any]) -> list[str]:
    """The keys of `data` that are not init fields of dataclass `cls`, sorted."""
    return sorted(set(data) - {f.name for f in dataclasses.fields(cls) if f.init})


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Builds a config dataclass from a plain dict, rejecting unknown or missing fields by name."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{where}: " if where else ""
    unknown = unknown_fields(cls, data)
    if unknown:
        raise ConfigError(
            f"{prefix}unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known: {', '.join(fields)}"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}missing field(s) {', '.join(missing)} for {cls.__name__}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
