import pytest

from pathways.k8s import names


@pytest.mark.parametrize(
    "module,expected",
    [
        ("embed", "embed"),
        ("attn-0", "attn-0"),
        ("Attn_0", "attn-0"),
        ("enc.layer..3", "enc-layer-3"),
        ("0proj", "m-0proj"),
        ("__", "m"),
        ("-x-", "x"),
    ],
)
def test_dns_name(module, expected):
    assert names.dns_name(module) == expected


def test_long_names_keep_a_hash_of_the_original():
    a, b = names.dns_name("a" * 80 + "1"), names.dns_name("a" * 80 + "2")
    assert len(a) == 63 and len(b) == 63 and a != b


def test_clashing_and_reserved_names_are_rejected():
    with pytest.raises(
        ValueError, match="'attn_0' and 'attn-0' both become Kubernetes name 'attn-0'"
    ):
        names.module_names(["attn_0", "attn-0"])
    with pytest.raises(ValueError, match="'Pathways_Gateway'.*reserved"):
        names.module_names(["Pathways_Gateway"])
