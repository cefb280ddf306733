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


def _post(ls, session, i, key, out, delay=0.0):
    """A thread that arrives at CHAIN[i] with an entry; out[session] = what arrive returned."""
    from pathways.executor.lockstep import Entry

    def run():
        time.sleep(delay)
        e = Entry(key, session)
        out[session] = (ls.arrive(session, CHAIN, i, e), e)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_the_last_to_arrive_sends_the_whole_group_and_the_others_get_their_results():
    ls = Lockstep(wait_s=5.0, idle_s=5.0)
    for s in "abc":
        ls.arrive(s, CHAIN, 0)
    out = {}
    early = [_post(ls, s, 1, "replica-1", out) for s in "ab"]
    time.sleep(0.1)
    t0 = time.monotonic()
    last = _post(ls, "c", 1, "replica-1", out)
    last.join(5)
    assert time.monotonic() - t0 < 1.0  # c completed the group: no wait
    group, _ = out["c"]
    assert [e.item for e in group] == ["c", "a", "b"]  # the sender's own entry first
    t0 = time.monotonic()
    ls.hand_over(CHAIN[1], [(e, f"result of {e.item}") for e in group])
    for t in early:
        t.join(5)
    assert time.monotonic() - t0 < 1.0  # woken by the hand-over, not by the 5 s bound
    for s in "ab":
        taken, entry = out[s]
        assert taken == [] and entry.wait(0) and entry.result == f"result of {s}"


def test_entries_for_different_replicas_form_separate_groups():
    ls = Lockstep(wait_s=5.0, idle_s=5.0)
    for s in "abc":
        ls.arrive(s, CHAIN, 0)
    out = {}
    first = _post(ls, "a", 1, "replica-2", out)  # a's replica differs from b's and c's
    b = _post(ls, "b", 1, "replica-1", out, delay=0.05)
    c = _post(ls, "c", 1, "replica-1", out, delay=0.1)
    for t in (first, b, c):
        t.join(5)
    senders = {s: [e.item for e in g] for s, (g, _) in out.items() if g}
    assert senders == {"a": ["a"], "c": ["c", "b"]}


def test_a_sender_that_stops_waiting_takes_what_is_posted():
    ls = Lockstep(wait_s=0.2, idle_s=5.0)
    for s in ("a", "b", "stuck"):
        ls.arrive(s, CHAIN, 0)
    out = {}
    threads = [_post(ls, s, 1, "r", out, delay=d) for s, d in (("a", 0.0), ("b", 0.05))]
    for t in threads:
        t.join(5)
    groups = [sorted(e.item for e in g) for g, _ in out.values() if g]
    assert groups == [["a", "b"]]  # "stuck" never came; one of them sent both


def test_without_waiting_an_entry_is_its_own_group():
    from pathways.executor.lockstep import Entry

    ls = Lockstep(wait_s=0.0)
    e = Entry("r", "a")
    assert ls.arrive("a", CHAIN, 0, e) == [e]
    assert ls.arrive("a", CHAIN, 0) is None
