"""Lockstep: a decode step waits at a module for the sessions still on their way to it, bounded."""

import threading
import time

import pytest

from pathways.executor.lockstep import Lockstep

CHAIN = ("embed", "attn", "head")


def _arrive_later(ls, session, i, delay):
    t = threading.Thread(target=lambda: (time.sleep(delay), ls.arrive(session, CHAIN, i)))
    t.start()
    return t


def test_a_session_waits_for_one_behind_it_and_they_leave_together():
    ls = Lockstep(wait_s=2.0)
    ls.arrive("a", CHAIN, 0)
    ls.arrive("b", CHAIN, 0)
    late = _arrive_later(ls, "b", 1, 0.2)  # b reaches attn 0.2 s after a
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 1)
    waited = time.monotonic() - t0
    late.join()
    assert 0.15 < waited < 1.5


def test_sessions_between_steps_are_waited_for_at_the_first_module():
    ls = Lockstep(wait_s=2.0)
    ls.arrive("a", CHAIN, 2)
    ls.arrive("b", CHAIN, 2)
    ls.done("a", CHAIN)
    ls.done("b", CHAIN)
    late = _arrive_later(ls, "b", 0, 0.2)
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 0)
    assert time.monotonic() - t0 > 0.15
    late.join()


def test_the_wait_is_bounded_and_stalled_or_closed_sessions_release_it():
    ls = Lockstep(wait_s=0.1, idle_s=5.0)
    ls.arrive("stuck", CHAIN, 0)
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 1)  # "stuck" never comes: a goes after wait_s
    assert 0.08 < time.monotonic() - t0 < 1.0

    ls = Lockstep(wait_s=5.0, idle_s=5.0)
    ls.arrive("closing", CHAIN, 0)
    closer = threading.Thread(target=lambda: (time.sleep(0.1), ls.leave("closing")))
    closer.start()
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 2)
    assert time.monotonic() - t0 < 2.0  # released by leave(), not by the 5 s bound
    closer.join()


def test_idle_sessions_ahead_and_other_chains_are_not_waited_for():
    ls = Lockstep(wait_s=5.0, idle_s=0.05)
    ls.arrive("ahead", CHAIN, 2)
    ls.arrive("other", ("embed", "attn-b", "head-b"), 0)  # never visits head
    ls.arrive("idle", CHAIN, 0)
    time.sleep(0.1)  # "idle" has not moved for longer than idle_s
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 2)
    assert time.monotonic() - t0 < 0.5


def test_zero_wait_never_blocks_and_negative_is_rejected():
    ls = Lockstep(wait_s=0.0)
    ls.arrive("b", CHAIN, 0)
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 2)
    assert time.monotonic() - t0 < 0.05
    with pytest.raises(ValueError, match="wait_s"):
        Lockstep(wait_s=-1.0)


def test_a_session_changing_chains_releases_waiters_at_modules_it_left():
    ls = Lockstep(wait_s=5.0, idle_s=5.0)
    ls.arrive("b", CHAIN, 0)  # behind "head" in CHAIN
    mover = threading.Thread(
        target=lambda: (time.sleep(0.1), ls.arrive("b", ("embed", "attn-b", "head-b"), 1))
    )
    mover.start()
    t0 = time.monotonic()
    ls.arrive("a", CHAIN, 2)  # waits at "head" for b, which now never visits it
    assert time.monotonic() - t0 < 2.0
    mover.join()


def test_many_sessions_in_step_each_wait_only_for_those_behind():
    ls = Lockstep(wait_s=2.0, idle_s=5.0)
    n, order = 6, []
    for k in range(n):
        ls.arrive(f"s{k}", CHAIN, 0)

    def walk(k):
        time.sleep(0.02 * k)  # they reach attn one after another
        ls.arrive(f"s{k}", CHAIN, 1)
        order.append((k, time.monotonic()))

    threads = [threading.Thread(target=walk, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    times = [t for _, t in order]
    assert len(order) == n and max(times) - min(times) < 0.05  # all left attn together
