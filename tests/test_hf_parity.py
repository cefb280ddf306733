"""Imported Hugging Face checkpoints give transformers' logits and greedy tokens (fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pathways.executor.local import LocalExecutor
from pathways.generate import greedy_ids
from pathways.hf import convert
from pathways.sampling import SamplingParams

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
TOL = 1e-4  # max abs logit difference, float32 (the bound; never loosen it)

# (fixture, split): every family, one module and several modules per model.
CASES = [
    ("gpt2", None),
    ("gpt2", "1,1,1"),
    ("llama", None),
    ("llama", "2,1"),
    ("llama-tied", "1,1"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{s or 'all'}" for n, s in CASES])
def case(request):
    name, split = request.param
    imported = convert.load_hf(FIXTURES / name, split)
    ex = LocalExecutor(imported.spec, imported.states())
    return ex, imported.pathway, dict(np.load(FIXTURES / name / "reference.npz"))


def test_split_gives_modules(case):
    ex, pathway, _ = case
    kinds = [ex.spec.modules[m].kind for m in ex.spec.pathway(pathway).modules]
    assert kinds[0] == "embedding" and kinds[-1] == "decoding"
    assert set(kinds[1:-1]) == {"attention"}


def test_prefill_logits_match(case):
    ex, pathway, ref = case
    logits = ex.forward(pathway, ref["prompts"])
    assert np.abs(logits - ref["prefill_logits"]).max() < TOL


def test_cached_step_by_step_matches(case):
    """Prefill a prefix, feed the rest of the prompt one token at a time, then decode greedily."""
    ex, pathway, ref = case
    prompts, b = ref["prompts"], len(ref["prompts"])
    session = ex.open_session(pathway, [SamplingParams(max_new_tokens=8)] * b)
    try:
        k = 4
        got = ex.prefill(session, [list(p[:k]) for p in prompts], return_logits=True)
        assert np.abs(got.logits - ref["prefill_logits"][:, k - 1]).max() < TOL
        for t in range(k, prompts.shape[1]):
            got = ex.decode(session, prompts[:, t], return_logits=True)
            assert np.abs(got.logits - ref["prefill_logits"][:, t]).max() < TOL, f"position {t}"
        for step in range(ref["greedy"].shape[1]):
            assert np.abs(got.logits - ref["step_logits"][:, step]).max() < TOL, f"step {step}"
            np.testing.assert_array_equal(got.tokens, ref["greedy"][:, step])
            if step + 1 < ref["greedy"].shape[1]:
                got = ex.decode(session, got.tokens, return_logits=True)
    finally:
        ex.close_session(session)


def test_greedy_generation_identical(case):
    ex, pathway, ref = case
    for row in range(len(ref["prompts"])):
        out = greedy_ids(ex, pathway, list(ref["prompts"][row]), ref["greedy"].shape[1])
        np.testing.assert_array_equal(out, ref["greedy"][row])
