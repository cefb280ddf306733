"""Tests for batched generation: stop sequences, eos, max_new_tokens, limits, batch == single."""

import numpy as np
import pytest

from pathways import generate as gen
from pathways import spec as spec_lib
from pathways.executor.base import Session, StepResult
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingBatch, SamplingParams
from pathways.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
MAX_LEN = 40


def _spec(vocab=257):
    return spec_lib.from_dict(
        {
            "modules": {
                "embed": {
                    "kind": "embedding",
                    "vocab_size": vocab,
                    "d_model": 24,
                    "max_seq_len": MAX_LEN,
                    "init_std": 1.0,
                },
                "attn": {
                    "kind": "attention",
                    "d_model": 24,
                    "n_layers": 2,
                    "n_heads": 3,
                    "max_seq_len": MAX_LEN,
                    "init_std": 0.3,
                },
                "head": {"kind": "decoding", "d_model": 24, "vocab_size": vocab, "init_std": 0.3},
            },
            "pathways": {"p": ["embed", "attn", "head"]},
        }
    )


class ScriptedExecutor:
    """Returns each row's scripted tokens in order, whatever it is fed: generation logic alone."""

    def __init__(self, scripts: list[list[int]]):
        self.spec = _spec()
        self.scripts = scripts
        self.fed: list[np.ndarray] = []
        self.open: set[str] = set()

    def open_session(self, pathway, sampling):
        s = Session(
            pathway,
            SamplingBatch.of(sampling),
            np.zeros(len(sampling), np.int32),
            np.zeros(len(sampling), np.int32),
            MAX_LEN,
        )
        self.open.add(s.id)
        return s

    def _next(self, s):
        out = np.array([sc[min(int(s.steps[0]), len(sc) - 1)] for sc in self.scripts], np.int32)
        s.steps += 1
        return StepResult(tokens=out)

    def prefill(self, s, prompts, *, return_logits=False):
        s.lengths += np.array([len(p) for p in prompts], np.int32)
        return self._next(s)

    def decode(self, s, tokens, *, return_logits=False):
        self.fed.append(np.asarray(tokens).copy())
        s.lengths += 1
        return self._next(s)

    def close_session(self, s):
        self.open.discard(s.id)


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def test_stop_sequence_is_trimmed_from_text_and_stream():
    ex = ScriptedExecutor([_bytes("ab\n\ncd\n\n")])
    params = SamplingParams(max_new_tokens=20, stop=("\n\n",))
    events = list(gen.stream(ex, "p", ["x"], TOK, params))
    assert "".join(e.text for e in events) == "ab"  # nothing of the stop was ever printed
    assert events[-1].finished == "stop" and len(events) == 4
    [c] = gen.generate(ex, "p", ["x"], TOK, params)
    assert (c.text, c.finish_reason) == ("ab", "stop")
    assert ex.open == set()


def test_a_held_back_partial_stop_is_released_when_it_does_not_match():
    ex = ScriptedExecutor([_bytes("a\nb\n\nc")])
    [c] = gen.generate(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=20, stop=("\n\n",)))
    assert (c.text, c.finish_reason) == ("a\nb", "stop")
    events = list(gen.stream(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=3, stop=("\n\n",))))
    assert [e.text for e in events] == ["a", "", "\nb"]  # "\n" waits a step, then comes out
    assert events[-1].finished == "length"


def test_first_of_several_stops_wins_and_multibyte_text_survives():
    ex = ScriptedExecutor([_bytes("é=1; stop€ END")])
    [c] = gen.generate(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=30, stop=("END", "€")))
    assert (c.text, c.finish_reason) == ("é=1; stop", "stop")


def test_eos_ends_a_row_and_max_new_tokens_another():
    eos = TOK.eos_id
    ex = ScriptedExecutor([[*_bytes("hi"), eos, *_bytes("never")], _bytes("abcdefgh")])
    params = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=5)]
    a, b = gen.generate(ex, "p", ["x", "y"], TOK, params)
    assert (a.text, a.finish_reason, a.token_ids) == ("hi", "eos", [104, 105, eos])
    assert (b.text, b.finish_reason, b.token_ids) == ("abcde", "length", _bytes("abcde"))
    assert len(ex.fed) == 4  # decode steps: the longest row's 5 tokens need 4 after prefill


def test_a_character_cut_by_the_length_limit_is_flushed():
    ex = ScriptedExecutor([_bytes("a€")])  # "€" is 3 bytes; only 2 fit
    [c] = gen.generate(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=3))
    assert (c.text, c.finish_reason) == ("a\ufffd", "length")


def test_max_new_tokens_zero_does_not_run_the_model():
    ex = ScriptedExecutor([_bytes("abc")])
    [c] = gen.generate(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=0))
    assert (c.text, c.token_ids, c.finish_reason) == ("", [], "length")
    assert ex.fed == []


def test_sampled_tokens_are_fed_back():
    ex = ScriptedExecutor([_bytes("abc")])
    gen.generate(ex, "p", ["x"], TOK, SamplingParams(max_new_tokens=3))
    assert [f.tolist() for f in ex.fed] == [[97], [98]]


def test_settings_count_must_match_prompts():
    with pytest.raises(ValueError, match="got 1 sampling settings for 2 prompts"):
        gen.generate(ScriptedExecutor([[1], [1]]), "p", ["a", "b"], TOK, [SamplingParams()])


def test_max_sequence_length_exceeded():
    ex = ScriptedExecutor([[1]])
    with pytest.raises(
        ValueError,
        match=f"max sequence length exceeded: prompt 0 has 30 tokens "
        f"\\+ max_new_tokens 11 > {MAX_LEN} for pathway 'p'",
    ):
        gen.generate(ex, "p", ["a" * 30], TOK, SamplingParams(max_new_tokens=11))
    # Each row fits on its own, but rows decode in lockstep: refused before anything runs.
    ex = ScriptedExecutor([[1], [1]])
    with pytest.raises(ValueError, match="prompt 0 has 30 tokens \\+ 19 lockstep decode steps"):
        gen.generate(
            ex,
            "p",
            ["a" * 30, "b"],
            TOK,
            [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=20)],
        )
    assert ex.fed == [] and ex.open == set()


@pytest.fixture(scope="module")
def ex():
    return LocalExecutor(_spec(), seed=2)


def test_batch_generation_equals_individual_generation_for_greedy(ex):
    prompts = ["def f(x)", "", "héllo"]  # 8, 1 (end-of-text) and 6 tokens: one prefill bucket
    params = [
        SamplingParams(max_new_tokens=6),
        SamplingParams(max_new_tokens=4),
        SamplingParams(max_new_tokens=5),
    ]
    batch = gen.generate(ex, "p", prompts, TOK, params)
    for p, sp, c in zip(prompts, params, batch):
        [single] = gen.generate(ex, "p", [p], TOK, sp)
        assert single.token_ids == c.token_ids
        assert single.text == c.text
        assert len(c.token_ids) == sp.max_new_tokens and c.finish_reason == "length"
    # The reference greedy loop (no tokenizer, no batching) agrees as well.
    ids = gen.greedy_ids(ex, "p", TOK.encode(prompts[0]), 6)
    assert ids.tolist() == batch[0].token_ids


def test_same_seed_same_text_different_seed_differs(ex):
    def run(seed):
        [c] = gen.generate(
            ex, "p", ["abc"], TOK, SamplingParams(temperature=1.0, seed=seed, max_new_tokens=8)
        )
        return c.token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
