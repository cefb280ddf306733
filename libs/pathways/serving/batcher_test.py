"""Continuous batcher: queued decode steps run together; exclusive work runs alone, in order."""

import threading
import time

import pytest

from pathways.serving.batcher import Batcher
from pathways.serving.errors import DeadlineExceeded


def test_steps_queued_together_run_as_one_batch():
    batches, gate = [], threading.Event()
    b = Batcher(
        lambda steps, logits: (batches.append(list(steps)), steps)[1], max_rows=3, max_wait_s=0.0
    )
    try:
        blocker = threading.Thread(target=b.call, args=(gate.wait,))
        blocker.start()
        time.sleep(0.05)  # the worker is now busy: the next steps queue up
        results = {}
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, b.decode(i, 1, False)))
            for i in range(5)
        ]
        for t in threads:
            t.start()
        time.sleep(0.1)
        gate.set()
        for t in threads + [blocker]:
            t.join(5)
        assert results == {i: i for i in range(5)}
        assert sorted(len(x) for x in batches) == [2, 3]  # max_rows caps a batch
    finally:
        b.stop()


def test_a_failing_batch_fails_its_callers_and_the_worker_survives():
    def run(steps, logits):
        if steps == ["bad"]:
            raise RuntimeError("boom")
        return steps

    b = Batcher(run, max_rows=8, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            b.decode("bad", 1, False)
        assert b.decode("ok", 1, False) == "ok"
    finally:
        b.stop()


def test_expired_deadline_is_not_run():
    ran = []
    b = Batcher(lambda steps, logits: ran.extend(steps) or steps, max_rows=8, max_wait_s=0.0)
    try:
        with pytest.raises(DeadlineExceeded):
            b.decode("late", 1, False, deadline=time.monotonic() - 1)
        assert ran == []
    finally:
        b.stop()


def test_a_lone_session_runs_on_the_callers_thread_and_never_waits():
    seen, sizes = [], []
    run = lambda steps, logits: seen.append(threading.current_thread()) or steps
    b = Batcher(run, max_rows=8, max_wait_s=5.0, on_batch=sizes.append)
    try:
        t0 = time.monotonic()
        assert b.decode("x", 1, False, key="a") == "x"
        assert b.decode("y", 2, False, key="a") == "y"
        assert seen[-1] is threading.current_thread() and time.monotonic() - t0 < 1
        assert sizes == [1, 2]  # batch-size metrics see inline steps too
    finally:
        b.stop()


def test_active_sessions_wait_for_each_other_and_share_a_batch():
    batches = []
    run = lambda steps, logits: batches.append(sorted(steps)) or steps
    b = Batcher(run, 8, max_wait_s=1.0, active_window_s=60.0)
    try:
        for key in "abc":  # three sessions decoding recently (each waits out max_wait alone)
            b.decode(key, 1, False, key=key)
        batches.clear()
        threads = [threading.Thread(target=b.decode, args=(k, 1, False, None, k)) for k in "abc"]
        for t in threads:
            t.start()
            time.sleep(0.05)  # arrivals spread out: the worker waits for the others
        for t in threads:
            t.join(5)
        assert batches == [["a", "b", "c"]]
        b.forget("b")
        b.forget("c")
        assert b.expected_rows() == 1
    finally:
        b.stop()


def test_a_group_runs_as_one_batch_when_idle_and_queued_together_when_busy():
    batches, gate = [], threading.Event()
    b = Batcher(
        lambda steps, logits: (batches.append(list(steps)), steps)[1], max_rows=4, max_wait_s=0.0
    )
    try:
        assert b.decode_group([(i, 1, f"s{i}") for i in range(3)], False) == [0, 1, 2]
        assert batches == [[0, 1, 2]]
        blocker = threading.Thread(target=b.call, args=(gate.wait,))
        blocker.start()
        time.sleep(0.05)  # busy: the group's six steps queue and run in batches of <= 4 rows
        out = []
        t = threading.Thread(
            target=lambda: out.append(b.decode_group([(i, 1, i) for i in range(6)], False))
        )
        t.start()
        time.sleep(0.1)
        gate.set()
        t.join(5)
        blocker.join(5)
        assert out == [list(range(6))]
        assert [len(x) for x in batches[1:]] == [4, 2]
    finally:
        b.stop()


def test_a_queued_group_step_past_its_deadline_fails_alone():
    gate = threading.Event()
    b = Batcher(lambda steps, logits: steps, max_rows=4, max_wait_s=0.0)
    try:
        blocker = threading.Thread(target=b.call, args=(gate.wait,))
        blocker.start()
        time.sleep(0.05)
        threading.Timer(0.2, gate.set).start()
        out = b.decode_group([(0, 1, "a"), (1, 1, "b")], False, deadline=time.monotonic() + 0.05)
        blocker.join(5)
        assert all(isinstance(o, DeadlineExceeded) for o in out)
    finally:
        b.stop()
