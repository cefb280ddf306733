"""The broker URL: the password from PATHWAYS_BROKER_PASSWORD joins a URL that holds none."""

from pathways.coordinator.app import broker_url


def test_the_password_joins_a_url_without_one():
    env = {"PATHWAYS_BROKER_URL": "redis://pathways-broker:6379/0"}
    assert broker_url(env=env) == "redis://pathways-broker:6379/0"
    env["PATHWAYS_BROKER_PASSWORD"] = "p@ss/word"
    assert broker_url(env=env) == "redis://:p%40ss%2Fword@pathways-broker:6379/0"
    # A URL with credentials of its own keeps them.
    assert broker_url("redis://:x@h:1/0", env=env) == "redis://:x@h:1/0"
