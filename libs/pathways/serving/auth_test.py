"""API key files, bearer metadata, roles and the AddModule address policy."""

from __future__ import annotations

import stat

import pytest

from pathways.serving import auth


def test_keys_are_stored_hashed_and_found_by_key(tmp_path):
    admin, reader = auth.new_key(), auth.new_key()
    path = tmp_path / "keys.json"
    auth.KeyStore([auth.hashed("me", "admin", admin), auth.hashed("r", "generate", reader)]).save(
        path
    )
    assert admin not in path.read_text() and reader not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = auth.KeyStore.load(path)
    assert store.role(admin).role == "admin" and store.role(reader).name == "r"
    assert store.role("pwk_other") is None and store.role("") is None


def test_roles_include_the_ones_below():
    assert auth.allows("admin", "generate") and auth.allows("admin", "admin")
    assert auth.allows("generate", "generate") and not auth.allows("generate", "admin")


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json", "not JSON"),
        ("[]", 'needs {"keys": \\[...\\]}'),
        ('{"keys": [{"name": "a"}]}', "keys\\[0\\] needs name, role, salt and sha256"),
        ('{"keys": [{"name": "a", "role": "root", "salt": "00", "sha256": "00"}]}', "got 'root'"),
        ('{"keys": [{"name": "a", "role": "admin", "salt": "zz", "sha256": "00"}]}', "keys\\[0\\]"),
    ],
)
def test_bad_key_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(auth.AuthError, match=match):
        auth.KeyStore.load(path)
    with pytest.raises(auth.AuthError, match="nope.json"):
        auth.KeyStore.load(tmp_path / "nope.json")
    with pytest.raises(auth.AuthError, match="role must be one of generate, admin"):
        auth.hashed("x", "owner", "k")


def test_bearer_metadata():
    assert auth.bearer((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer((("authorization", "bearer  abc "),)) == "abc"
    assert auth.bearer((("authorization", "Basic abc"),)) == ""  # present but not a bearer key
    assert auth.bearer((("x-other", "1"),)) is None and auth.bearer(None) is None
    assert auth.client_metadata("k") == (("authorization", "Bearer k"),)
    assert auth.client_metadata(None) == ()


def test_address_policy():
    policy = auth.AddressPolicy(["127.0.0.1:*", "*.pathways.svc:8080"])
    assert policy.check("127.0.0.1:5000") is None
    assert policy.check("attn.pathways.svc:8080") is None
    assert "'10.0.0.1:1' is not allowed" in policy.check("10.0.0.1:1")
    assert "allowed: none" in auth.AddressPolicy([]).check("127.0.0.1:1")
