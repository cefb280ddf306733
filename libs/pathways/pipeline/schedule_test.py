import pytest

from pathways.pipeline.schedule import bubble_fraction, stage_ops


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k,m", [(1, 1), (4, 1), (4, 3), (4, 8), (5, 2)])
def test_every_microbatch_runs_forward_then_backward_once_per_stage(schedule, k, m):
    for stage in range(k):
        ops = stage_ops(schedule, stage, k, m)
        assert sorted(ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        for i in range(m):
            assert ops.index(("F", i)) < ops.index(("B", i))


def test_1f1b_bounds_in_flight_microbatches_by_distance_to_the_end():
    k, m = 4, 8
    for stage in range(k):
        live, peak = 0, 0
        for op, _ in stage_ops("1f1b", stage, k, m):
            live += 1 if op == "F" else -1
            peak = max(peak, live)
        assert peak == k - stage  # GPipe would hold all m = 8
    assert stage_ops("1f1b", 3, 4, 3) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("F", 2),
        ("B", 2),
    ]


def test_gpipe_runs_all_forwards_first():
    assert stage_ops("gpipe", 0, 3, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_bad_schedule_and_counts_are_named():
    with pytest.raises(ValueError, match="schedule must be one of gpipe, 1f1b; got 'zigzag'"):
        stage_ops("zigzag", 0, 2, 2)
    with pytest.raises(ValueError, match="micro-batches must be >= 1, got 0"):
        stage_ops("gpipe", 0, 2, 0)


def test_bubble_formula():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 5) == 0.0
