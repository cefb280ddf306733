"""local_decode's baseline (the pathway's step written by hand as one program) computes on the
backend the executor chose for each shape class: the same native ops in both programs. A baseline
on another backend measures the backend, not the fusing (fcced52 moved the backend out of the
step's arguments, and the baseline ran XLA's attention against the executor's native one)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from pathways import runtime
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.kernels.testing import force_decision
from tools.bench.local_decode import ROOT, fused_step_fn


def _native_calls(lowered) -> list[str]:
    return sorted(re.findall(r"custom_call @([\w.]+)", lowered.as_text()))


def _executor_program(chain, prefill: bool, t: int, window: int):
    """The executor's own fused program for one greedy row, lowered."""
    cached = [rt for rt in chain if rt.kind.has_cache]
    one = np.zeros(1, np.int32)
    return runtime.fused_step(chain, prefill).lower(
        [rt._serving_flat(prefill)[0] for rt in chain],
        [rt.kind.empty_cache(rt.cfg, 1) for rt in cached],
        np.zeros((1, t), np.int32),
        np.arange(t, dtype=np.int32)[None],
        [one] * len(cached),
        one,
        np.zeros(1, np.float32),
        one,
        np.ones(1, np.float32),
        one,
        None,
        window=window,
        draw=False,
        with_logits=False,
    )


@pytest.mark.parametrize(
    "decode,prefill", [(False, False), (True, False), (True, True)], ids=["xla", "decode", "both"]
)
def test_baseline_computes_with_the_executors_backend(monkeypatch, decode, prefill):
    force_decision(monkeypatch, decode=decode, prefill=prefill)
    spec = spec_lib.load(ROOT / "examples/tiny.yaml")
    ex = LocalExecutor(spec)
    chain = ex.chain(spec.default_pathway)
    cached = [rt for rt in chain if rt.kind.has_cache]
    window = 32
    for is_prefill, t in ((False, 1), (True, 8)):
        step, params = fused_step_fn(ex, spec.default_pathway, prefill=is_prefill)
        baseline = step.lower(
            params,
            [rt.kind.empty_cache(rt.cfg, 1) for rt in cached],
            np.zeros((1, t), np.int32),
            np.arange(t, dtype=np.int32)[None],
            np.array([t - 1], np.int32),
            window=window,
        )
        ours = _native_calls(_executor_program(chain, is_prefill, t, window))
        assert _native_calls(baseline) == ours, f"prefill={is_prefill}"
        # Not vacuous: where the kernels were chosen for this shape class, both programs call them.
        assert bool(ours) == (prefill if is_prefill else decode), ours
    jax.clear_caches()
