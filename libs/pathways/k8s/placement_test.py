"""Accelerator placement: the spec's `placement:` becomes each module's resources, nodes, mesh and
image in the render; CPU modules are untouched; bad entries are named."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from pathways import spec as spec_lib
from pathways import surgery
from pathways.k8s import render

SPEC = {
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 64, "d_model": 16, "max_seq_len": 8},
        "attn": {"kind": "attention", "d_model": 16, "n_layers": 1, "n_heads": 4, "max_seq_len": 8},
        "attn2": {
            "kind": "attention",
            "d_model": 16,
            "n_layers": 1,
            "n_heads": 4,
            "max_seq_len": 8,
        },
        "head": {"kind": "decoding", "d_model": 16, "vocab_size": 64},
    },
    "pathways": {"p": ["embed", "attn", "attn2", "head"]},
    "placement": {
        "attn": {
            "accelerator": "nvidia.com/gpu",
            "count": 4,
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "memory": "64Gi",
            "image": "reg.test/pw/module-server-cuda:1.0",
        },
        "attn2": {"accelerator": "google.com/tpu", "count": 1, "cpu": "8"},
    },
}


def _deployment(files, module):
    return next(d for d in yaml.safe_load_all(files[f"modules/{module}.yaml"]) if d)


def test_accelerator_modules_and_cpu_modules_in_one_pathway():
    spec = spec_lib.from_dict(SPEC)
    files = render.render(spec, image_registry="reg.test/pw")
    gpu = _deployment(files, "attn")
    pod = gpu["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "64Gi"
    assert {"name": "PATHWAYS_MESH", "value": "tp=4"} in c["env"]
    assert c["image"] == "reg.test/pw/module-server-cuda:1.0"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    tpu = _deployment(files, "attn2")["spec"]["template"]["spec"]["containers"][0]
    assert tpu["resources"]["limits"]["google.com/tpu"] == 1
    assert tpu["resources"]["limits"]["cpu"] == tpu["resources"]["requests"]["cpu"] == "8"
    assert not any(e["name"] == "PATHWAYS_MESH" for e in tpu["env"])  # one device: no mesh
    # The CPU modules render exactly as without a placement section.
    plain = render.render(
        spec_lib.from_dict({k: v for k, v in SPEC.items() if k != "placement"}),
        image_registry="reg.test/pw",
    )
    for m in ("embed", "head"):
        assert files[f"modules/{m}.yaml"] == plain[f"modules/{m}.yaml"]
        c = _deployment(files, m)["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert c["image"] == "reg.test/pw/module-server:latest"
    for name, text in files.items():
        if name.startswith("modules/"):
            for doc in yaml.safe_load_all(text):
                kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_placement_round_trips_and_follows_surgery():
    spec = spec_lib.from_dict(SPEC)
    assert spec.placement["attn"].mesh == "tp=4"
    again = spec_lib.from_dict(spec.to_dict())
    assert again.placement == spec.placement
    # The rendered spec (what every pod loads) keeps the section.
    assert yaml.safe_load(render.render(spec)["spec.yaml"])["placement"]["attn2"] == {
        "accelerator": "google.com/tpu",
        "count": 1,
        "cpu": "8",
    }
    smaller = surgery.remove_module(spec, "p", "attn2", drop_unused=True)
    assert set(smaller.placement) == {"attn"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"nope": {"count": 1}}, "placement of module 'nope': no such module"),
        ({"attn": {"accelerator": "nvidia/gpu"}}, "accelerator must be one of nvidia.com/gpu"),
        ({"attn": {"accelerator": "nvidia.com/gpu", "count": 0}}, "count must be an integer >= 1"),
        ({"attn": {"count": 2}}, "count 2 needs an accelerator"),
        ({"attn": {"memory": "lots"}}, "memory must be a Kubernetes quantity"),
        ({"attn": {"gpus": 1}}, "unknown field(s) gpus"),
        ({"attn": {"tolerations": [{"colour": "x"}]}}, "tolerations must be a list of mappings"),
        ({"attn": {"node_selector": {"a": 1}}}, "node_selector must map strings to strings"),
        ([], "placement must be a mapping"),
    ],
)
def test_bad_placement_is_named(entry, message):
    data = {**SPEC, "placement": entry}
    with pytest.raises(spec_lib.SpecError) as e:
        spec_lib.from_dict(data)
    assert message in str(e.value)
