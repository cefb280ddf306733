"""StopMatcher against the plain definition (search the whole text after every chunk)."""

from __future__ import annotations

import random
import time

import pytest

from pathways.stops import StopMatcher


def _reference(text: str, stops) -> tuple[int | None, int]:
    hits = [text.find(s) for s in stops if s in text]
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return (min(hits) if hits else None), held


def test_matches_the_definition_on_random_streams():
    rng = random.Random(0)
    for _ in range(2000):
        alphabet = "ab\nc"[: rng.randint(2, 4)]
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 4))
        )
        m, text = StopMatcher(stops), ""
        while True:
            chunk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
            text += chunk
            hit, held = _reference(text, stops)
            assert m.feed(chunk) == hit, (stops, text)
            if hit is not None:
                assert m.held == 0
                break
            assert m.held == held, (stops, text)
            if len(text) > 40:
                break


def test_earliest_start_wins_among_matches_ending_in_one_chunk():
    m = StopMatcher(("bc", "abcd"))
    assert m.feed("xabcd") == 1  # "abcd" starts before "bc"
    m = StopMatcher(("bc", "abcd"))
    assert m.feed("xab") is None and m.held == 2
    assert m.feed("c") == 2  # "bc" completed first; "abcd" had not appeared yet
    assert m.feed("d") == 2  # decided once and for all


def test_cost_per_character_does_not_grow_with_the_stop_strings():
    long_stop = "x" * 50_000 + "y"
    m = StopMatcher((long_stop, "needle"))
    t0 = time.perf_counter()
    for _ in range(2000):
        assert m.feed("x" * 4) is None
    elapsed = time.perf_counter() - t0
    assert m.held == 8000  # a prefix of the long stop: held back
    assert elapsed < 0.5, elapsed  # the old per-token search took ~61 ms per token here


def test_empty_stop_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(("ok", ""))
