"""The spoken-words data set: held-out speakers and words stay out of training, generation is
deterministic, cached and safe to run twice at once, batches are what the CTC head reads."""

import threading

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.datasets import speech

pytestmark = pytest.mark.skipif(
    not speech.espeak_available(),
    reason="espeak-ng is not installed (Debian package espeak-ng; .ci/run installs it)",
)
SMALL = dict(train_per_word=2, test_per_word=1, unseen_per_word=2, vocabulary=27, threads=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path))
    speech.speech.cache_clear()
    yield tmp_path / "speech"
    speech.speech.cache_clear()


def test_word_list_and_speakers():
    words = speech.words()
    assert len(words) >= 200 + 40 and len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    assert sum(speech.is_unseen(i) for i in range(len(words))) == 45
    train, test = speech.speakers(False), speech.speakers(True)
    assert len(train) + len(test) == len(speech.VOICES) * len(speech.VARIANTS) == 96
    assert not set(train) & set(test)
    assert len(speech.HELD_OUT_VARIANTS) >= 3 and len(speech.HELD_OUT_VOICES) >= 1
    assert not any(v in speech.HELD_OUT_VOICES for v, _ in train)
    assert not any(var in speech.HELD_OUT_VARIANTS for _, var in train)


def test_splits_keep_held_out_speakers_and_words_apart(cache):
    d = speech.speech(**SMALL)
    assert len(d.words) == 27 and [len(u) for u in d.splits.values()] == [24 * 2, 24, 3 * 2]
    tr, te, un = d.splits["train"], d.splits["test"], d.splits["unseen"]
    held_voice = [speech.VOICES.index(v) for v in speech.HELD_OUT_VOICES]
    held_var = [speech.VARIANTS.index(v) for v in speech.HELD_OUT_VARIANTS]
    for u in (tr, un):  # training speakers only
        assert not np.isin(u.voice, held_voice).any() and not np.isin(u.variant, held_var).any()
    assert (np.isin(te.voice, held_voice) | np.isin(te.variant, held_var)).all()
    assert all(speech.is_unseen(w) for w in un.word)
    assert not any(speech.is_unseen(w) for w in np.concatenate([tr.word, te.word]))
    assert (tr.rate >= 140).all() and (tr.pitch >= 25).all() and (tr.pitch <= 75).all()
    lengths = np.diff(tr.offsets)
    assert (lengths > 1600).all() and (lengths <= d.max_samples).all()  # > 0.1 s, <= 1 s


def test_generation_is_deterministic_cached_and_safe_twice_at_once(cache):
    results = [None, None]

    def build(i):
        results[i] = speech.speech.__wrapped__(**SMALL)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("speech-") and files[0].endswith(".npz")
    mtime = (cache / files[0]).stat().st_mtime_ns
    again = speech.speech(**SMALL)  # from the cache
    assert (cache / files[0]).stat().st_mtime_ns == mtime
    for a in (results[0], results[1]):
        for name in ("train", "test", "unseen"):
            np.testing.assert_array_equal(a.splits[name].samples, again.splits[name].samples)
            np.testing.assert_array_equal(a.splits[name].word, again.splits[name].word)


def test_batches(cache):
    d = speech.speech(**SMALL)
    x, y = d.batch(3, 8, 0, seed=5)
    assert x.shape == (8, 16000) and x.dtype == np.float32 and y.shape == (8, 12)
    x2, y2 = d.batch(3, 8, 0, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    texts = ["".join(d.alphabet[s - 1] for s in row if s) for row in y]
    assert set(texts) <= {d.words[i] for i in d.splits["train"].word}
    # Each word sits somewhere in its zero-padded row, as loud as stored.
    for row in x:
        assert 0 < np.count_nonzero(row) <= 16000 and np.abs(row).max() > 0.05
    ex, ey = d.batch(0, 6, 0, seed=5, split="eval")
    assert ["".join(d.alphabet[s - 1] for s in row if s) for row in ey] == d.texts("test")[:6]
    np.testing.assert_array_equal(
        ex[0, : np.diff(d.splits["test"].offsets)[0]], d.splits["test"].wave(0)
    )


def test_check_pathway_names_the_mismatch(cache):
    d = speech.speech(**SMALL)

    def spec(rate=16000, max_samples=16000, alphabet="abcdefghijklmnopqrstuvwxyz"):
        return spec_lib.from_dict(
            {
                "modules": {
                    "frames": {
                        "kind": "audio_embedding",
                        "sample_rate": rate,
                        "max_samples": max_samples,
                        "d_model": 8,
                    },
                    "attn": {
                        "kind": "attention",
                        "d_model": 8,
                        "n_layers": 1,
                        "n_heads": 2,
                        "max_seq_len": 64,
                    },
                    "chars": {"kind": "ctc", "d_model": 8, "alphabet": alphabet},
                },
                "pathways": {"speech": ["frames", "attn", "chars"]},
            }
        )

    d.check_pathway(spec(), "speech")
    with pytest.raises(
        ValueError, match="reads audio at 8000 but the speech data set is audio " "at 16000 Hz"
    ):
        d.check_pathway(spec(rate=8000), "speech")
    with pytest.raises(ValueError, match="'frames' has max_samples 8000 but"):
        d.check_pathway(spec(max_samples=8000), "speech")
    with pytest.raises(ValueError, match=r"alphabet 'abc'.*\(defg"):
        d.check_pathway(spec(alphabet="abc"), "speech")
