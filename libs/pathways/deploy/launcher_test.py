"""Launched processes: their logs, and a process that dies while starting."""

from __future__ import annotations

import pytest

from pathways.deploy import launcher


def test_a_process_that_dies_at_start_is_named_with_its_code_and_log(tmp_path):
    p = launcher.Process("oops", ["json.tool", "/no/such/file"], log=tmp_path, label="tool 'x'")
    p.proc.wait(60)
    with pytest.raises(launcher.StartupError) as e:
        p.check()
    msg = str(e.value)
    assert msg.startswith("tool 'x' exited with code 2 while starting")
    assert f"(log: {tmp_path / 'oops.log'})" in msg and "| " in msg and "/no/such/file" in msg
    p.stop()
    assert (tmp_path / "oops.log").exists()  # a named log directory is kept


def test_a_private_log_is_removed_on_stop():
    p = launcher.Process("quiet", ["json.tool", "/no/such/file"])
    p.proc.wait(60)
    assert p.log_path is not None and "/no/such/file" in p.tail()
    with pytest.raises(launcher.StartupError, match="quiet exited with code 2 while starting;"):
        p.check()
    p.stop()
    assert not p.log_path.exists()


def test_waiting_for_health_fails_fast_when_a_sibling_dies(tmp_path):
    port = launcher.free_port()  # nothing listens there: never SERVING
    sleeper = launcher.Process(
        "sleeper", ["http.server", "--bind", "127.0.0.1", str(port)], port=port
    )
    dead = launcher.Process("dead", ["json.tool", "/no/such/file"], log=tmp_path)
    dead.proc.wait(60)
    with pytest.raises(launcher.StartupError, match="dead exited with code 2"):
        launcher.wait_all_healthy([sleeper], timeout=30, also=[dead])
    launcher.stop_all([sleeper, dead])


def test_module_servers_get_every_cpu_unless_the_fleet_splits_them(monkeypatch):
    monkeypatch.delenv("PATHWAYS_CPU_THREADS", raising=False)
    fleet = launcher.Fleet("ckpt", ["embed", "head"], env={"A": "1"})
    assert fleet.server_env(4) == {"A": "1"}  # XLA's default pool: all the CPUs
    split = launcher.Fleet("ckpt", ["embed", "head"], split_cpus=True)
    assert split.server_env(4) == {"PATHWAYS_CPU_THREADS": str(launcher.cpu_share(4))}
    assert launcher.cpu_share(4) == max(1, launcher.cpus() // 4)
    given = launcher.Fleet("ckpt", ["embed"], env={"PATHWAYS_CPU_THREADS": "3"}, split_cpus=True)
    assert given.server_env(4) == {"PATHWAYS_CPU_THREADS": "3"}  # what the caller set wins
