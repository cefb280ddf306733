"""The embedded broker asks for a password; clients with the URL get in, others are refused."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest
import redis

from pathways.coordinator.broker import EmbeddedBroker, redact


def test_a_client_without_the_password_is_refused(tmp_path):
    with EmbeddedBroker(workdir=tmp_path) as broker:
        assert redis.Redis.from_url(broker.url).ping()
        bare = redis.Redis(host="127.0.0.1", port=broker.port)
        with pytest.raises(redis.AuthenticationError):
            bare.ping()
        # The secret is in a file only the owner reads, not on the server's command line.
        conf = tmp_path / "broker.conf"
        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
        args = pathlib.Path(f"/proc/{broker.proc.pid}/cmdline").read_text().replace("\0", " ")
        assert broker.password not in args  # (valkey rewrites its title; the password never shows)
        assert broker.password not in broker.shown_url and broker.shown_url.endswith(
            f":***@127.0.0.1:{broker.port}/0"
        )
    assert EmbeddedBroker().password != EmbeddedBroker().password  # one per broker


def test_redact_leaves_urls_without_credentials_alone():
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
