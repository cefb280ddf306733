import pytest

from pathways import names


@pytest.mark.parametrize("ok", ["embed", "attn-0", "gpt2.small", "A_1", "0x"])
def test_plain_names_pass(ok):
    assert names.check(ok) == ok


@pytest.mark.parametrize(
    "bad", ["", "../../victim", "a/b", ".hidden", "-x", "a..b", "sp ace", "é", None, 3]
)
def test_names_that_could_leave_a_directory_or_break_a_label_are_refused(bad):
    with pytest.raises(ValueError, match="module name must match") as e:
        names.check(bad, "module name")
    assert repr(bad)[:20] in str(e.value)


def test_length_is_bounded():
    with pytest.raises(ValueError, match="at most 128"):
        names.check("a" * 129)
