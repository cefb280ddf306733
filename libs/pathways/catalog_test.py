"""The pathway catalog: entries from a spec, measurements stored beside them, `model: "auto"`'s
choice under latency and size bounds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pathways import catalog
from pathways import spec as spec_lib

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


@dataclasses.dataclass
class P:
    name: str
    parameters: int
    tokens_per_s: float | None = None
    eval_loss: float | None = None


def test_entry_counts_each_module_once_per_pathway():
    spec = spec_lib.load(TINY)
    tiny, shallow = catalog.entry(spec, "tiny"), catalog.entry(spec, "tiny-shallow")
    # tiny = tiny-shallow + attn-1 (same shapes as attn-0).
    attn = catalog.module_size(spec.modules["attn-1"])
    assert tiny["parameters"] == shallow["parameters"] + attn[0]
    assert tiny["weight_bytes"] == 4 * tiny["parameters"] and tiny["max_seq_len"] == 256
    assert tiny["tokens_per_s"] is None and tiny["eval_loss"] is None


def test_a_routed_family_lists_its_paths_and_counts_shared_modules_once():
    import yaml

    from pathways.parallel import dipaco

    spec = spec_lib.from_dict(
        dipaco.grid(yaml.safe_load(TINY.read_text()), "tiny", {"attn-1": 2}), source="grid"
    )
    fam = catalog.family_entry(spec, "tiny", ["tiny.0", "tiny.1"], {"tiny": {"eval_loss": 2}})
    path = catalog.entry(spec, "tiny.0")
    attn = catalog.module_size(spec.modules["attn-1.1"])
    assert fam["paths"] == ["tiny.0", "tiny.1"] and fam["modules"] == []
    assert fam["parameters"] == path["parameters"]  # one routed request runs one path
    assert fam["weight_bytes"] == path["weight_bytes"] + attn[1]  # the second attn-1 only
    assert fam["max_seq_len"] == 256 and fam["eval_loss"] == 2.0 and fam["tokens_per_s"] is None
    with pytest.raises(ValueError, match="'tiny' has no served paths"):
        catalog.family_entry(spec, "tiny", [])


def test_measurements_round_trip_and_bad_files_read_as_none(tmp_path):
    assert catalog.read_measured(tmp_path) == {}
    catalog.write_measured(tmp_path, "a", {"tokens_per_s": 10.0, "eval_loss": 3.0})
    catalog.write_measured(tmp_path, "b", {"tokens_per_s": 20.0})
    assert catalog.read_measured(tmp_path)["a"]["eval_loss"] == 3.0
    assert set(catalog.read_measured(tmp_path)) == {"a", "b"}
    (tmp_path / catalog.MEASURED).write_text("[1]")
    assert catalog.read_measured(tmp_path) == {}


PATHWAYS = [
    P("small", 100, tokens_per_s=200.0, eval_loss=3.0),  # 5 ms/token
    P("mid", 400, tokens_per_s=50.0, eval_loss=2.5),  # 20 ms/token
    P("big", 900, tokens_per_s=None, eval_loss=None),  # not measured
]


def test_choose_the_lowest_loss_within_the_bounds():
    assert catalog.choose(PATHWAYS).name == "mid"  # measured loss beats unmeasured size
    assert catalog.choose(PATHWAYS, max_ms_per_token=10).name == "small"
    assert catalog.choose(PATHWAYS, max_parameters=399).name == "small"
    assert catalog.choose(PATHWAYS[2:]).name == "big"  # nothing measured: the largest
    assert catalog.choose([P("x", 5), P("y", 7)], max_parameters=6).name == "x"


def test_no_pathway_names_the_bound_and_lists_the_candidates():
    with pytest.raises(catalog.NoPathway) as e:
        catalog.choose(PATHWAYS, max_ms_per_token=1)
    assert e.value.param == "max_ms_per_token" and "big: 900 parameters, not measured" in str(e)
    with pytest.raises(catalog.NoPathway) as e:
        catalog.choose(PATHWAYS, max_parameters=10)
    assert e.value.param == "max_parameters"
