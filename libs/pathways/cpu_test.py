import json
import os
import subprocess
import sys

import pytest

import pathways.runtime  # noqa: F401 - the dispatch probe imports it (a dependency for Pants)
from pathways import cpu

PROBE = """
import json, os, sys
from pathways import cpu
n = cpu.limit_threads(int(sys.argv[1]))
import jax.numpy as jnp
(jnp.ones((512, 512)) @ jnp.ones((512, 512))).block_until_ready()
threads = cpu.thread_affinities()
print(json.dumps({
    "n": n,
    "eigen": sorted(sorted(c) for t, c in threads.items() if "XLAEigen" in t),
    "all": sorted(os.sched_getaffinity(0)),
    "started": cpu.backend_started(),
}))
"""


def probe(n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(n)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"},
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_two = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least two CPUs to tell one XLA thread from many",
)


@needs_two
def test_one_thread_pool_and_the_full_mask_back():
    r = probe(1)
    assert r["n"] == 1 and r["started"]
    assert len(r["eigen"]) == 1, r  # one compute thread ...
    assert r["eigen"][0] == r["all"], r  # ... that may still run on every CPU


@needs_two
def test_default_pool_has_a_thread_per_cpu():
    r = probe(0)
    assert r["n"] == len(r["all"])
    assert len(r["eigen"]) == len(r["all"]), r


def test_too_late_is_an_error_not_a_silent_no_op(monkeypatch):
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least two CPUs")
    monkeypatch.setattr(cpu, "backend_started", lambda: True)
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        cpu.limit_threads(1)


DISPATCH_PROBE = """
import json, time
import pathways.runtime  # sets the dispatch mode on import
import jax, jax.numpy as jnp

@jax.jit
def slow(x):  # ~20 ms of matmuls, on XLA's pool: what JAX dispatches asynchronously
    return ((x @ x) @ x) @ x

x = jnp.ones((1024, 1024))
slow(x).block_until_ready()  # compiled
t0 = time.perf_counter(); y = slow(x); call = time.perf_counter() - t0
y.block_until_ready(); total = time.perf_counter() - t0
print(json.dumps({"async": jax.config.read("jax_cpu_enable_async_dispatch"),
                  "call": call, "total": total}))
"""


def dispatch_probe(mode: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    env.pop(cpu.DISPATCH_ENV, None)
    if mode is not None:
        env[cpu.DISPATCH_ENV] = mode
    out = subprocess.run(
        [sys.executable, "-c", DISPATCH_PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_steps_run_on_the_calling_thread_when_sync_is_asked_for():
    sync = dispatch_probe("sync")
    assert sync["async"] is False
    assert sync["call"] > 0.8 * sync["total"], sync  # the call returned with the result
    default = dispatch_probe(None)  # JAX's asynchronous dispatch
    assert default["async"] is True
    assert default["call"] < 0.5 * default["total"], default


def test_an_unknown_dispatch_mode_warns_and_keeps_the_default(monkeypatch, caplog):
    monkeypatch.setenv(cpu.DISPATCH_ENV, "eager")
    with caplog.at_level("WARNING", logger="pathways.cpu"):
        assert cpu.configure_dispatch() == "async"  # JAX's default, left as it is
    assert "PATHWAYS_CPU_DISPATCH='eager' is not one of sync, async" in caplog.text
