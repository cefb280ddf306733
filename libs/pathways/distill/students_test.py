"""Student modules learn their teacher boundary maps alone; the assembled student tracks the
teacher end to end."""

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.data import TokenData
from pathways.distill import store as store_lib
from pathways.distill.request import DistillConfig, DistillRequest
from pathways.distill.store import ActivationStore, record
from pathways.distill.students import train_module
from pathways.executor.local import LocalExecutor

TEACHER = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 23, "d_model": 12, "max_seq_len": 16},
            "a0": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 2,
                "n_heads": 3,
                "max_seq_len": 16,
            },
            "head": {"kind": "decoding", "d_model": 12, "vocab_size": 23},
        },
        "pathways": {"p": ["embed", "a0", "head"]},
    }
)
SMALL_ATTN = spec_lib.from_dict(
    {
        "modules": {
            "a": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 16,
                "d_ff": 7,
            },
            "e": {"kind": "embedding", "vocab_size": 23, "d_model": 12, "max_seq_len": 16},
            "h": {"kind": "decoding", "d_model": 12, "vocab_size": 23},
        },
        "pathways": {"p": ["e", "a", "h"]},
    }
).modules
DATA = TokenData(
    train=np.random.default_rng(0).integers(0, 23, 4000).astype(np.int32),
    eval=np.arange(200, dtype=np.int32) % 23,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    ex = LocalExecutor(TEACHER, seed=4)
    record(ex, "p", DATA, path, rows=32, seq_len=9, batch_size=8, shard_rows=16)
    return ActivationStore(path), ex


@pytest.mark.parametrize("position,name", [(0, "e"), (1, "a"), (2, "h")])
def test_each_student_module_fits_its_boundary_map(store, position, name):
    st, _ = store
    cfg = DistillConfig(steps=60, batch_size=8, lr=1e-2, warmup=2)
    first = []
    _, out = train_module(
        st,
        position,
        SMALL_ATTN[name],
        cfg,
        on_step=lambda r: first.append(r["loss"]) if r["step"] <= 3 else None,
    )
    assert out["steps"] == 60 and out["loss"] < 0.5 * np.mean(first), (first, out)


def test_head_distills_from_the_teacher_head_when_logits_are_not_stored(
    store, tmp_path, monkeypatch
):
    _, ex = store
    monkeypatch.setattr(store_lib, "LOGITS_MAX_VOCAB", 8)
    record(ex, "p", DATA, tmp_path / "s", rows=16, seq_len=9, batch_size=8)
    st = ActivationStore(tmp_path / "s")
    cfg = DistillConfig(steps=5, batch_size=8, warmup=1)
    with pytest.raises(ValueError, match=r"store has no logits \(vocab 23 > 8\)"):
        train_module(st, 2, SMALL_ATTN["h"], cfg)
    rt = ex.runtimes["head"]
    _, out = train_module(st, 2, SMALL_ATTN["h"], cfg, teacher_head=(rt.graphdef, rt.state))
    assert np.isfinite(out["loss"])


def test_mismatched_positions_and_settings_are_named(store):
    st, _ = store
    cfg = DistillConfig(steps=3, batch_size=4, warmup=0)
    with pytest.raises(
        ValueError,
        match="position 1 of the teacher maps hidden to hidden; the student module there "
        r"\(decoding\) maps hidden to logits",
    ):
        train_module(st, 1, SMALL_ATTN["h"], cfg)
    with pytest.raises(ValueError, match=r"position must be in \[0, 2\], got 3"):
        train_module(st, 3, SMALL_ATTN["h"], cfg)
    with pytest.raises(ValueError, match=r"warmup must be in \[0, steps=3\), got 3"):
        DistillConfig(steps=3, warmup=3)
    with pytest.raises(ValueError, match="unknown distillation field"):
        DistillRequest.from_dict(
            {"teacher": "t", "student_spec": "s", "out": "o", "store": "x", "stepz": 1}
        )
