import dataclasses

import pytest

from pathways.config import ConfigError, positive_int, unknown_fields


@dataclasses.dataclass(frozen=True)
class _Cfg:
    steps: int = 3
    lr: float = 0.5


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "3", None])
def test_positive_int_names_the_field_and_value(value):
    with pytest.raises(ConfigError, match=f"steps must be a positive integer, got {value!r}"):
        positive_int("steps", value)


def test_positive_int_errors_are_value_errors():
    positive_int("steps", 7)
    with pytest.raises(ValueError):
        positive_int("steps", 0)


def test_unknown_fields_are_sorted_and_ignore_known_ones():
    assert unknown_fields(_Cfg, {"steps": 1, "zeta": 0, "alpha": 0}) == ["alpha", "zeta"]
    assert unknown_fields(_Cfg, {"lr": 1.0}) == []
