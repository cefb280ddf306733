"""Session table: slot accounting, capacity errors, TTL, and no reuse of busy slots."""

import pytest

from pathways.serving.errors import Exhausted, NotFound
from pathways.serving.sessions import SessionTable


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_capacity_is_shared_and_freed_on_close():
    table = SessionTable(capacity=3, ttl_s=10)
    a = table.open(2, 16, None)
    with pytest.raises(Exhausted, match=r"no room for 2 more sequence\(s\): 1 of 3 free; retry"):
        table.open(2, 16, None)
    b = table.open(1, 16, None)
    assert sorted([*a.slots, *b.slots]) == [0, 1, 2] and table.in_use == 3
    assert table.close(a.id) and not table.close(a.id)
    c = table.open(2, 16, None)
    assert sorted(c.slots) == sorted(a.slots)
    with pytest.raises(NotFound, match=repr(a.id)):
        table.acquire(a.id)


def test_idle_sessions_expire_but_busy_ones_do_not():
    clock = Clock()
    table = SessionTable(capacity=2, ttl_s=5, clock=clock)
    idle, busy = table.open(1, 8, None), table.open(1, 8, None)
    table.acquire(busy.id)
    clock.t = 6
    assert table.expire() == 1 and len(table) == 1
    with pytest.raises(NotFound):
        table.acquire(idle.id)
    table.close(busy.id)  # closed while a step runs: its slot stays taken until release
    assert table.in_use == 1
    table.release(busy)
    assert table.in_use == 0


def test_full_table_reclaims_expired_sessions_before_refusing():
    clock = Clock()
    table = SessionTable(capacity=1, ttl_s=5, clock=clock)
    table.open(1, 8, None)
    clock.t = 10
    assert table.open(1, 8, None).slots.tolist() == [0]
