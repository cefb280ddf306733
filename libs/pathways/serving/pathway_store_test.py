"""The gateway's pathway table changes recorded in a file and applied again to a fresh table
(RemoteExecutors over unreachable addresses: nothing here dials)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathways import spec as spec_lib
from pathways.config import to_dict
from pathways.executor.remote import RemoteExecutor
from pathways.serving.pathway_store import PathwayStore, StoreError

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny.yaml"
ADDRESSES = {m: [f"127.0.0.1:{i + 1}"] for i, m in enumerate(["embed", "attn-0", "attn-1", "head"])}


def _executor() -> RemoteExecutor:
    return RemoteExecutor(spec_lib.load(TINY), ADDRESSES)


def _table(ex: RemoteExecutor) -> dict[str, list[str]]:
    return {n: list(p.modules) for n, p in ex.spec.pathways.items() if n in ex.served}


def test_changes_survive_into_a_new_table(tmp_path):
    path, ckpt = tmp_path / "pathways.json", tmp_path / "ckpt"
    live = _executor()
    store = PathwayStore(path, ckpt, live.spec.pathways)
    attn = live.spec.modules["attn-1"]
    config = json.loads(json.dumps(to_dict(attn)))  # as Describe's config_json carries it
    live.add_module("attn-2", attn, ["127.0.0.1:9"])
    store.added_module("attn-2", "attention", config, ["127.0.0.1:9"])
    for name, chain in [
        ("deep", ["embed", "attn-0", "attn-1", "attn-2", "head"]),
        ("x", ["embed", "head"]),
    ]:
        live.set_pathway(name, chain)
        store.set_pathway(name, chain)
    for name in ("tiny-shallow", "x"):  # a checkpoint's pathway, and one only added
        live.remove_pathway(name)
        store.removed_pathway(name)
    saved = json.loads(path.read_text())
    assert saved["removed"] == ["tiny-shallow"] and set(saved["pathways"]) == {"deep"}
    assert saved["checkpoint"] == str(ckpt.absolute())

    restarted = _executor()
    PathwayStore(path, ckpt, restarted.spec.pathways).apply(restarted)
    assert (
        _table(restarted)
        == _table(live)
        == {
            "tiny": ["embed", "attn-0", "attn-1", "head"],
            "deep": ["embed", "attn-0", "attn-1", "attn-2", "head"],
        }
    )
    assert restarted.spec.modules["attn-2"] == attn

    # Setting a removed pathway again takes it off the removed list.
    again = PathwayStore(path, ckpt, restarted.spec.pathways)
    again.set_pathway("tiny-shallow", ["embed", "attn-0", "head"])
    assert json.loads(path.read_text())["removed"] == []


@pytest.mark.parametrize(
    "content, message",
    [
        ("{nope", "not a readable JSON file"),
        ('{"checkpoint": "/other"}', "checkpoint: written for '/other'"),
        ('{"CKPT": 1, "pathways": {"p": "embed"}}', "pathways['p']: expected a list"),
        ('{"CKPT": 1, "modules": {"m": {"kind": "attention"}}}', "modules['m']: expected kind"),
        ('{"CKPT": 1, "pathways": {"p": ["embed", "nope"]}}', "pathways['p']:"),
    ],
)
def test_a_file_that_does_not_apply_names_the_entry(tmp_path, content, message):
    path, ckpt = tmp_path / "pathways.json", tmp_path / "ckpt"
    path.write_text(content.replace('"CKPT": 1', f'"checkpoint": "{ckpt.absolute()}"'))
    ex = _executor()
    with pytest.raises(StoreError) as e:
        PathwayStore(path, ckpt, ex.spec.pathways).apply(ex)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
