"""Spoken words, offline: `words.txt` spoken by espeak-ng's English voices, each a speaker with
a variant, at several rates and pitches; cached; batches a pure function of (seed, step).

A speaker is a (voice, variant) pair: the English voices that need no mbrola times the `+m1`..
`+m7`, `+f1`..`+f5` variants (96 speakers). Held out of training: every speaker of the voice
`HELD_OUT_VOICES` and every speaker of the variants `HELD_OUT_VARIANTS` (33 speakers), and the
unseen words (every ninth word from the fifth, 45 of 405). Splits:
- train: each vocabulary word spoken by `train_per_word` training speakers;
- test (held-out speakers, vocabulary words; the Trainer's "eval" split): `test_per_word` each;
- unseen: each unseen word spoken by `unseen_per_word` training speakers.
Each utterance has its own rate (words per minute) and pitch (0-99), drawn with its speaker from
`seed`. espeak-ng's 22,050 Hz output is trimmed of leading and trailing silence and resampled to
16 kHz (FFT); a word longer than `max_samples` is spoken again faster.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np

from pathways import audio
from pathways.spec import PathwaySpec

VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
)
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
HELD_OUT_VOICES = ("en-gb-x-rp",)
HELD_OUT_VARIANTS = ("m3", "m7", "f2")
SAMPLE_RATE = 16000
RATES = (140, 210)  # words per minute, inclusive
PITCHES = (25, 75)
VERSION = 1  # bump when the generation below changes what it produces


def words() -> list[str]:
    text = resources.files("pathways.datasets").joinpath("words.txt").read_text()
    return [w for w in (line.strip() for line in text.splitlines()) if w and w[0] != "#"]


def is_unseen(index: int) -> bool:
    return index % 9 == 4


def speakers(held_out: bool) -> list[tuple[str, str]]:
    return [
        (v, var)
        for v in VOICES
        for var in VARIANTS
        if (v in HELD_OUT_VOICES or var in HELD_OUT_VARIANTS) == held_out
    ]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(word: str, voice: str, variant: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's waveform of `word`, trimmed of silence, at SAMPLE_RATE, float32."""
    out = subprocess.run(
        ["espeak-ng", "-v", f"{voice}+{variant}", "-s", str(rate), "-p", str(pitch), "--stdout"]
        + ["--", word],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    wave, rate_in = audio.decode_wav(out)
    loud = np.nonzero(np.abs(wave) > 0.02 * max(np.abs(wave).max(), 1e-6))[0]
    margin = rate_in // 50  # 20 ms either side
    if len(loud):
        wave = wave[max(loud[0] - margin, 0) : loud[-1] + margin]
    return audio.resample(wave, rate_in, SAMPLE_RATE)


@dataclasses.dataclass(frozen=True)
class Utterances:
    """Waveforms (int16, concatenated) with what was said and by whom."""

    samples: np.ndarray  # (total,) int16
    offsets: np.ndarray  # (N + 1,) int64
    word: np.ndarray  # (N,) index into the word list
    voice: np.ndarray  # (N,) index into VOICES
    variant: np.ndarray  # (N,) index into VARIANTS
    rate: np.ndarray  # (N,)
    pitch: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.word)

    def wave(self, i: int) -> np.ndarray:
        return self.samples[self.offsets[i] : self.offsets[i + 1]].astype(np.float32) / 32768.0


@dataclasses.dataclass(frozen=True)
class SpeechData:
    """The splits and what a batch needs; `batch` has `TokenData.batch`'s signature, so the same
    `Trainer` trains on it: inputs are waveforms (B, max_samples) float32 (zero-padded), targets
    labels (B, max_label) int32 (alphabet symbols 1.., 0-padded; see `modules.ctc`)."""

    words: list[str]
    splits: dict[str, Utterances]
    max_samples: int
    max_label: int
    alphabet: str
    sample_rate: int = SAMPLE_RATE
    name: str = "speech"
    # Training batches play each word at a random speed in [1 - p, 1 + p] (resampled: duration,
    # pitch and formants scale together, as a shorter or longer vocal tract would).
    speed_perturb: float = 0.1

    def texts(self, split: str) -> list[str]:
        return [self.words[i] for i in self.splits[split].word]

    def labels(self, idx: np.ndarray, split: str) -> np.ndarray:
        index = {c: i + 1 for i, c in enumerate(self.alphabet)}
        out = np.zeros((len(idx), self.max_label), np.int32)
        for n, i in enumerate(idx):
            w = self.words[self.splits[split].word[i]]
            out[n, : len(w)] = [index[c] for c in w]
        return out

    def waves(self, idx: np.ndarray, split: str, shift_seed=None) -> np.ndarray:
        """(B, max_samples) float32; with `shift_seed`, each word is played at a random speed
        (`speed_perturb`) and starts at a random offset."""
        u = self.splits[split]
        out = np.zeros((len(idx), self.max_samples), np.float32)
        rng = None if shift_seed is None else np.random.default_rng(shift_seed)
        for n, i in enumerate(idx):
            w = u.wave(i)
            if rng is not None and self.speed_perturb:
                p = self.speed_perturb
                speed = max(rng.uniform(1 - p, 1 + p), len(w) / self.max_samples)
                w = audio.resample(w, round(self.sample_rate * speed), self.sample_rate)
                w = w[: self.max_samples]
            at = 0 if rng is None else int(rng.integers(0, self.max_samples - len(w) + 1))
            out[n, at : at + len(w)] = w
        return out

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Train: epochs of the training utterances, each shuffled by (seed, epoch), each word
        placed at a random offset; eval: consecutive slices of the held-out speakers' split."""
        if split == "train":
            n = len(self.splits["train"])
            at = step * batch_size + np.arange(batch_size)
            idx = np.empty(batch_size, np.int64)
            for epoch in np.unique(at // n):
                rows = at // n == epoch
                idx[rows] = np.random.default_rng([seed, int(epoch)]).permutation(n)[at[rows] % n]
            return self.waves(idx, "train", [seed, step, 1]), self.labels(idx, "train")
        name = "test" if split == "eval" else split
        n = len(self.splits[name])
        idx = (step * batch_size + np.arange(batch_size)) % n
        return self.waves(idx, name), self.labels(idx, name)

    def check_pathway(self, spec: PathwaySpec, pathway: str) -> None:
        """Raises ValueError naming the module, field and values when `pathway` cannot read
        this audio or write these words."""
        chain = spec.pathway(pathway).modules
        first, last = spec.modules[chain[0]], spec.modules[chain[-1]]
        if first.input_contract != ("audio", self.sample_rate):
            raise ValueError(
                f"pathway {pathway!r}: {chain[0]!r} ({first.kind}) reads "
                f"{first.input_contract[0]} at {first.input_contract[1]} but the {self.name} "
                f"data set is audio at {self.sample_rate} Hz"
            )
        if first.max_samples < self.max_samples:
            raise ValueError(
                f"pathway {pathway!r}: {chain[0]!r} has max_samples {first.max_samples} but "
                f"the {self.name} data set's waveforms are {self.max_samples} samples"
            )
        alphabet = getattr(last, "alphabet", "")
        missing = sorted(set("".join(self.words)) - set(alphabet))
        if last.output_contract[0] != "characters" or missing:
            raise ValueError(
                f"pathway {pathway!r}: {chain[-1]!r} ({last.kind}) outputs "
                f"{last.output_contract[0]} over alphabet {alphabet!r}; the {self.name} words "
                f"need characters ({''.join(missing)} missing)"
            )


def cache_dir() -> Path:
    """$PATHWAYS_CACHE_DIR/speech, else $XDG_CACHE_HOME or ~/.cache /pathways/speech."""
    if os.environ.get("PATHWAYS_CACHE_DIR"):
        return Path(os.environ["PATHWAYS_CACHE_DIR"]) / "speech"
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None
    )
    return Path(base or tempfile.gettempdir()) / "pathways" / "speech"


def _plan(split: str, word_ids: list[int], pool: list, per_word: int, seed: int) -> list:
    """(word, voice, variant, rate, pitch) per utterance, drawn from (seed, split)."""
    rng = np.random.default_rng([seed, ("train", "test", "unseen").index(split)])
    out = []
    for w in word_ids:
        for s in rng.choice(len(pool), size=min(per_word, len(pool)), replace=False):
            voice, variant = pool[s]
            out.append(
                (
                    w,
                    VOICES.index(voice),
                    VARIANTS.index(variant),
                    int(rng.integers(RATES[0], RATES[1] + 1)),
                    int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
                )
            )
    return out


def _generate(plan: list, vocab: list[str], max_samples: int, threads: int) -> Utterances:
    def one(item):
        w, vo, va, rate, pitch = item
        for faster in range(0, 200, 30):
            wave = speak(vocab[w], VOICES[vo], VARIANTS[va], rate + faster, pitch)
            if len(wave) <= max_samples:
                return (np.clip(wave, -1, 1) * 32767).astype(np.int16), rate + faster
        raise RuntimeError(f"{vocab[w]!r} stays longer than {max_samples} samples")

    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(one, plan))
    lengths = np.array([len(w) for w, _ in done], np.int64)
    cols = np.array(plan, np.int64).reshape(len(plan), 5)
    return Utterances(
        samples=np.concatenate([w for w, _ in done]) if done else np.zeros(0, np.int16),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        word=cols[:, 0],
        voice=cols[:, 1],
        variant=cols[:, 2],
        rate=np.array([r for _, r in done], np.int64),
        pitch=cols[:, 4],
    )


@functools.cache
def speech(
    train_per_word: int = 16,
    test_per_word: int = 2,
    unseen_per_word: int = 4,
    seed: int = 0,
    max_samples: int = SAMPLE_RATE,
    max_label: int = 12,
    alphabet: str = "abcdefghijklmnopqrstuvwxyz' ",
    vocabulary: int | None = None,
    threads: int | None = None,
) -> SpeechData:
    """The spoken-words data set, generated once per parameters and cached (generation of the
    default sizes: see BENCHMARKS.md). Safe to call from several processes at once: each
    writes its own temporary file and renames it into place. `vocabulary` keeps the first that
    many words of the list (small data sets for tests)."""
    if not espeak_available():
        raise RuntimeError("the speech data set needs espeak-ng (Debian package espeak-ng)")
    vocab = words()[:vocabulary]
    params = dict(
        version=VERSION,
        words=hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16],
        espeak=subprocess.run(
            ["espeak-ng", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip(),
        train_per_word=train_per_word,
        test_per_word=test_per_word,
        unseen_per_word=unseen_per_word,
        seed=seed,
        max_samples=max_samples,
        voices=VOICES,
        variants=VARIANTS,
        held_out=(HELD_OUT_VOICES, HELD_OUT_VARIANTS),
    )
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"speech-{key}.npz"
    if not path.exists():
        known = [i for i in range(len(vocab)) if not is_unseen(i)]
        unseen = [i for i in range(len(vocab)) if is_unseen(i)]
        plans = {
            "train": _plan("train", known, speakers(False), train_per_word, seed),
            "test": _plan("test", known, speakers(True), test_per_word, seed),
            "unseen": _plan("unseen", unseen, speakers(False), unseen_per_word, seed),
        }
        t0 = time.perf_counter()
        arrays = {}
        for name, plan in plans.items():
            u = _generate(plan, vocab, max_samples, threads or max(os.cpu_count() or 1, 2) * 2)
            arrays.update({f"{name}.{f.name}": getattr(u, f.name) for f in dataclasses.fields(u)})
        arrays["seconds"] = np.array(time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{time.time_ns()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    with np.load(path) as z:
        splits = {
            name: Utterances(
                **{f.name: z[f"{name}.{f.name}"] for f in dataclasses.fields(Utterances)}
            )
            for name in ("train", "test", "unseen")
        }
    too_long = [w for w in vocab if len(w) > max_label]
    if too_long:
        raise ValueError(f"max_label {max_label} is shorter than the word {too_long[0]!r}")
    return SpeechData(vocab, splits, max_samples, max_label, alphabet)


def generation_seconds(data_path: str | Path) -> float:
    """How long generating a cached file took (recorded in it)."""
    with np.load(data_path) as z:
        return float(z["seconds"])
