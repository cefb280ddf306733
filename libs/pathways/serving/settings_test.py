"""Module-server settings: a bad bound is a ConfigError naming the setting and its value."""

from __future__ import annotations

import pytest

from pathways.config import ConfigError
from pathways.serving.settings import ModuleServerSettings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_slots": 0}, "max_slots must be a positive integer, got 0"),
        ({"max_programs": -2}, "max_programs must be a positive integer, got -2"),
        ({"kv_cache_mb": 0.0}, "kv_cache_mb must be a positive number, got 0.0"),
        ({"max_inbox_mb": -1}, "max_inbox_mb must be a positive number, got -1"),
    ],
)
def test_bad_bounds_name_the_setting(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModuleServerSettings(checkpoint="ckpt", module="m", insecure=True, **fields)


def test_good_settings_build():
    s = ModuleServerSettings(checkpoint="ckpt", module="m", insecure=True, kv_cache_mb=1)
    assert s.kv_cache_mb == 1 and s.max_slots == 64
