"""Test support: the default backend's per-shape decision (`build.chosen`) forced for one test,
not read from the machine's cached measurement, so a test of what a decision changes runs the
same on every machine (kernels faster for every shape, for decode steps only, for none)."""

from __future__ import annotations

import jax
import pytest

from pathways.kernels import build


def force_decision(monkeypatch: pytest.MonkeyPatch, decode: bool, prefill: bool) -> None:
    """Makes `PATHWAYS_KERNELS=auto` use the native kernels for decode steps and prefill chunks
    as given, for the rest of the test (`monkeypatch` undoes it). Skips the test, saying why,
    where the kernels cannot run: turned off (PATHWAYS_KERNELS=xla), no C++ compiler, or JAX
    on an accelerator."""
    if build.mode() == "xla":
        pytest.skip("the native kernels are turned off here (PATHWAYS_KERNELS=xla)")
    if jax.default_backend() != "cpu":
        pytest.skip(f"the native kernels are CPU kernels; JAX computes on {jax.default_backend()}")
    if build._lib is None and not build._load_library():  # built and registered once
        pytest.skip("the native kernels do not build here (the log says why)")
    monkeypatch.setattr(build, "_loaded", True)
    monkeypatch.setitem(build._chosen, "decode", decode)
    monkeypatch.setitem(build._chosen, "prefill", prefill)
