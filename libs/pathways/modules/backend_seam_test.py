"""Model files reach device-specific ops only through `pathways.backends`: none imports a
backend (the native CPU kernels), so the model code runs wherever that backend does not."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent
BACKENDS = ("pathways.kernels",)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_model_file_imports_a_backend():
    files = [p for p in HERE.glob("*.py") if not p.stem.endswith("_test")]
    assert any(p.name == "layers.py" for p in files)  # the files are really read
    offenders = {
        p.name: sorted(i for i in _imports(p) if i.startswith(BACKENDS))
        for p in files
        if any(i.startswith(BACKENDS) for i in _imports(p))
    }
    assert offenders == {}


def test_no_kind_step_takes_a_backend():
    """The runtime picks the backend while it traces a step (`backends.using`): a kind's step
    has the interface's arguments only (`modules.kind`), none naming a backend."""
    import inspect

    from pathways.modules import registry

    kinds = registry.names()
    assert len(kinds) >= 10  # every built-in kind is really looked at
    extra = {}
    for name in kinds:
        params = list(inspect.signature(registry.get(name).module.step).parameters)
        # (self, inputs, positions, cache, slots, window, causal); kinds name their inputs and
        # slots after their shapes (x_btd, obs_bto, slots_b).
        tail = [p.split("_")[0] for p in params[3:]]
        if len(params) != 7 or tail != ["cache", "slots", "window", "causal"]:
            extra[name] = params
    assert extra == {}


def test_the_backend_is_chosen_while_tracing():
    """Attention's decode step is the backend's op only inside `backends.using(True)`."""
    import jax.numpy as jnp
    import numpy as np

    from pathways import backends
    from pathways import modules as mod

    calls = []

    def fake_attend(q, k, v, positions, slots, ks, vs, *, layer, window):
        calls.append(layer)
        return jnp.zeros((*q.shape[:2], q.shape[2] * q.shape[3]), q.dtype), ks, vs

    cfg = mod.AttentionConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
    m = mod.build(cfg, seed=0)
    cache = mod.registry.of(cfg).empty_cache(cfg, 1)
    x, pos, slots = (
        np.zeros((1, 1, 16), np.float32),
        np.zeros((1, 1), np.int32),
        np.zeros(1, np.int32),
    )
    saved = backends._OPS.get("attend_cached")
    backends.register("attend_cached", fake_attend)
    try:
        m.step(x, pos, cache, slots, window=8)
        assert calls == []  # plain JAX by default, whatever is loaded
        with backends.using(True):
            m.step(x, pos, cache, slots, window=8)
        assert calls == [0, 1]
        m.step(x, pos, cache, slots, window=8)
        assert calls == [0, 1]  # the choice ended with the block
    finally:
        if saved is None:
            backends._OPS.pop("attend_cached")
        else:
            backends._OPS["attend_cached"] = saved
