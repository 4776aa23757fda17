"""An offline speech corpus for the DAAM experiments (docs/DAAM.md): speech synthesised with Debian's ``espeak-ng``,
degraded with ``sox``, turned into log-mel spectrograms with librosa.

DAIC-WOZ (the clinical interviews of the DAAM depression paper, arXiv 2409.00391) is not available offline, so this
is a **synthetic stand-in**. It reproduces the *shape* of the clinical task — a binary prosodic label per
recording, several recordings per speaker, fixed-length log-mel segments, segment-level training and a per-recording
majority vote, speakers of the test split never heard in training — not its content.

* **Speakers** are espeak-ng voice variants (``+m3``, ``+f2``, ``+Alex`` …: different formants, breathiness, pitch
  contours), each spoken with ``accents`` of the eight English base voices (accents). The train / validation / test
  splits share no variant: the test voices are never heard in training, in any accent.
* **Sentences** are real text: verses of the King James Bible from the Debian package ``bible-kjv-text`` (read with
  ``bible`` from ``bible-kjv``; :mod:`tokensieve.data.text`'s ``kjv`` source), 40–110 characters each.
* **Task A** (binary, paralinguistic, mirroring depression detection): a recording is "marked" or not. Marked
  recordings carry the prosodic markers reported for depression — slower speaking rate, lower pitch, flatter pitch
  (a narrower pitch range), longer pauses between words and sentences. Every speaker has a habitual offset of each
  marker (drawn once per speaker) and reads half of its recordings marked, half not; each recording's markers are
  the class mean plus the speaker's offset plus a per-recording jitter, so the classes overlap and no single marker
  separates them. The label is a state of the recording, not a trait of the speaker: with a few dozen synthetic
  voices a per-speaker label can be learnt from the voice itself, which says nothing on held-out voices, and a test
  split of a handful of speakers makes the score a draw over those few. Recordings are 3 sentences long; the models
  see 120-frame segments and a recording's label is the majority vote of its segments.
* **Task B** (spoken words): 12 words, 1.2 s clips, every speaker says each word twice with its own rate and pitch.
* **Channel** (both tasks, independent of the label): sox mixes in white, pink or brown noise at 5–30 dB SNR and
  applies a random high-pass and low-pass (a telephone-like band at the narrow end) and, for some recordings, reverb.

Features: 16 kHz, 40 mel bands (librosa ``melspectrogram``, 25 ms window, 10 ms hop), log power in dB. They are
stored unstandardised; :func:`standardise` uses the training split's per-band mean and deviation (the models'
inputs are standardised log-mels, as in the paper).

Generation is deterministic from the seed (espeak-ng is deterministic, sox runs with ``-R``) and cached under
``$TOKENSIEVE_HOME/speech/<key>/``. Needs ``apt-get install espeak-ng sox bible-kjv bible-kjv-text`` and
``pip install 'tokensieve[audio]'``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

SAMPLE_RATE = 16_000
N_MELS = 40
N_FFT = 512
WIN = 400  # 25 ms
HOP = 160  # 10 ms
SEGMENT = 120  # frames = 1.2 s
#: a task-B clip: long enough for exactly SEGMENT frames of N_FFT samples every HOP (center=False)
CLIP_SECONDS = ((SEGMENT - 1) * HOP + N_FFT) / SAMPLE_RATE

TOOLS = ("espeak-ng", "sox")
INSTALL_HINT = "apt-get update && apt-get install -y espeak-ng sox bible-kjv bible-kjv-text"

#: English base voices of espeak-ng (accents); mbrola voices are left out (they need the mbrola program).
BASE_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
#: espeak-ng voice variants that sound like people (robots, whispers, "demonic" and the like are left out).
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "adam", "Alex", "Alicia",
    "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "Denis",
    "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3",
    "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo", "Marco", "Mario", "max", "Michael", "michel",
    "miguel", "Mike", "Nguyen", "pablo", "paul", "pedro", "quincy", "rob", "robert", "steph", "steph2", "steph3",
    "zac", "anika", "grandpa", "grandma", "klatt", "klatt2", "klatt3", "norbert", "sandro", "shelby", "travis",
    "victor",
)  # fmt: skip
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "seven")
RANGES = ("x-low", "low", "medium", "high", "x-high")
#: probabilities of the pitch-range levels for unmarked / marked recordings (they overlap on purpose)
RANGE_P = {0: (0.0, 0.1, 0.3, 0.35, 0.25), 1: (0.35, 0.35, 0.2, 0.1, 0.0)}


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. The defaults give ~4,500 task-A segments (600 recordings) and 1,800 task-B clips from 150
    speakers; about 10 minutes of espeak-ng and sox on 2 cores."""

    seed: int = 0
    speakers: tuple[int, int, int] = (45, 15, 15)  #: voice variants in train, validation, test (distinct)
    accents: int = 2  #: base voices (accents) per variant: each (variant, accent) pair is one speaker
    recordings: int = 4  #: task-A recordings per speaker, half of them marked
    sentences: int = 3  #: sentences per task-A recording
    tokens: int = 1  #: task-B repetitions of each word per speaker
    words: tuple[str, ...] = WORDS
    text: str = "kjv"
    #: task-A marker means (unmarked, marked recordings) and the between-speaker deviation of the speaker's habit
    rate: tuple[float, float, float] = (175.0, 140.0, 15.0)  #: words per minute
    pitch: tuple[float, float, float] = (52.0, 38.0, 8.0)  #: espeak-ng pitch 0–99
    word_gap: tuple[float, float, float] = (1.0, 5.0, 2.0)  #: extra pause between words, in 10 ms
    pause: tuple[float, float, float] = (0.4, 0.9, 0.2)  #: pause between sentences, seconds
    tasks: tuple[str, ...] = ("a", "b")
    workers: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self, task: str) -> str:
        """A short hash of what one task's data depend on (the cache directory's name)."""
        d = asdict(self)
        for k in ("workers", "tasks"):
            d.pop(k)
        drop = (
            ("tokens", "words")
            if task == "a"
            else ("recordings", "sentences", "text", "rate", "pitch", "word_gap", "pause")
        )
        for k in drop:
            d.pop(k)
        if task == "a":
            d["range_p"] = RANGE_P
            d["labels"] = "recording"
        d["features"] = [SAMPLE_RATE, N_MELS, N_FFT, WIN, HOP, SEGMENT, 1]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Speaker:
    ident: str  #: "base+variant"
    split: str  #: train / val / test
    #: the speaker's habitual offsets of task A's markers (added to the class means of each recording)
    rate: float
    pitch: float
    word_gap: float
    pause: float


def check_tools() -> None:
    """Raise a ConfigError that says how to install espeak-ng and sox when either is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ConfigError(
            f"The speech corpus needs {' and '.join(missing)} (not found on PATH). On Debian/Ubuntu: {INSTALL_HINT}"
        )


def tools_available() -> bool:
    return all(shutil.which(t) for t in TOOLS)


def _librosa() -> Any:
    try:
        import librosa
    except ImportError as exc:
        raise ConfigError(
            "The speech corpus needs librosa: pip install 'tokensieve[audio]' (or pip install -r requirements.txt)."
        ) from exc
    return librosa


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError as exc:
        raise ConfigError("The speech corpus needs soundfile: pip install 'tokensieve[audio]'.") from exc
    return soundfile


def home() -> Path:
    return Path(os.environ.get("TOKENSIEVE_HOME", Path.home() / ".cache" / "tokensieve"))


# ---------------------------------------------------------------------------------------------------------- speakers


def make_speakers(cfg: CorpusConfig) -> list[Speaker]:
    """Speakers split train/val/test by voice variant: each variant of a split is spoken with ``cfg.accents``
    different base voices, and no variant appears in two splits.

    Each speaker's habitual offsets of the task-A markers are drawn from normal distributions around 0 (the
    between-speaker deviations in ``cfg``).
    """
    n = sum(cfg.speakers)
    if n > len(VARIANTS):
        raise ConfigError(f"at most {len(VARIANTS)} voice variants in all splits, asked for {n}")
    if min(cfg.speakers) < 1:
        raise ConfigError("every split needs at least one voice variant")
    if not 1 <= cfg.accents <= len(BASE_VOICES):
        raise ConfigError(f"accents must be between 1 and {len(BASE_VOICES)}, got {cfg.accents}")
    rng = random.Random(f"speakers:{cfg.seed}")
    variants = list(VARIANTS)
    rng.shuffle(variants)
    out: list[Speaker] = []
    start = 0
    for split, count in zip(("train", "val", "test"), cfg.speakers):
        for i in range(count):
            variant = variants[start + i]
            bases = rng.sample(BASE_VOICES, cfg.accents)
            for base in bases:
                out.append(
                    Speaker(
                        ident=f"{base}+{variant}",
                        split=split,
                        rate=rng.gauss(0.0, cfg.rate[2]),
                        pitch=rng.gauss(0.0, cfg.pitch[2]),
                        word_gap=rng.gauss(0.0, cfg.word_gap[2]),
                        pause=rng.gauss(0.0, cfg.pause[2]),
                    )
                )
        start += count
    return out


def recording_labels(cfg: CorpusConfig, speaker: int) -> list[int]:
    """Task A's labels of one speaker's recordings: half marked (the odd one out of an odd count is drawn)."""
    rng = random.Random(f"labels:{cfg.seed}:{speaker}")
    labels = [r % 2 for r in range(cfg.recordings)]
    if cfg.recordings % 2:
        labels[-1] = rng.randrange(2)
    rng.shuffle(labels)
    return labels


def corpus_sentences(cfg: CorpusConfig) -> list[str]:
    """Sentences of 40–110 characters from the configured text (the KJV by default), letters and punctuation only."""
    from .text import sentences, text_source

    units = [s for s in sentences(text_source(cfg.text).text()) if 40 <= len(s) <= 110 and "<" not in s]
    if len(units) < 10:
        raise ConfigError(f"the text source {cfg.text!r} has too few sentences of 40–110 characters")
    return units


# ---------------------------------------------------------------------------------------------------------- synthesis


def _run(args: Sequence[str]) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")


def _ssml(parts: Sequence[str], pitch_range: str, pause_s: Sequence[float]) -> str:
    from xml.sax.saxutils import escape

    body = ""
    for i, p in enumerate(parts):
        body += escape(p)
        if i < len(parts) - 1:
            body += f'<break time="{round(pause_s[i] * 1000)}ms"/>'
    return f'<speak><prosody range="{pitch_range}">{body}</prosody></speak>'


def synthesise(
    workdir: Path,
    voice: str,
    parts: Sequence[str],
    *,
    rate: float,
    pitch: float,
    word_gap: float,
    pitch_range: str,
    pauses: Sequence[float],
    channel: dict[str, Any],
    duration: float | None = None,
) -> np.ndarray:
    """espeak-ng → sox (noise at an SNR, band, reverb, 16 kHz) → mono float32 samples.

    ``duration``: give the speech ``channel['lead']`` seconds of lead-in and cut the result to this many seconds.
    """
    sf = _soundfile()
    speech, noise, out = workdir / "speech.wav", workdir / "noise.wav", workdir / "out.wav"
    ssml = _ssml(parts, pitch_range, pauses)
    _run(["espeak-ng", "-v", voice, "-s", str(round(rate)), "-p", str(round(pitch)), "-g", str(round(word_gap)),
          "-m", "-w", str(speech), ssml])  # fmt: skip
    x, sr = sf.read(str(speech), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    if duration is not None:  # lead-in silence before the word, then long enough for the clip
        lead = np.zeros(round(channel["lead"] * sr), dtype=np.float32)
        tail = np.zeros(max(0, math.ceil(duration * sr) + 1 - len(lead) - len(x)), dtype=np.float32)
        x = np.concatenate([lead, x, tail])
        sf.write(str(speech), x, sr, subtype="PCM_16")
    n_speech = len(x)
    rms = float(np.sqrt(np.mean(x[np.abs(x) > 1e-4] ** 2))) if np.any(np.abs(x) > 1e-4) else 0.1
    # sox's noise generators at amplitude 1 have these rough RMS levels: the volume puts the noise at the SNR
    noise_rms = {"whitenoise": 0.577, "pinknoise": 0.3, "brownnoise": 0.25}[channel["noise"]]
    vol = rms / noise_rms * 10 ** (-channel["snr"] / 20)
    _run(["sox", "-R", "-n", "-r", str(sr), "-c", "1", "-b", "16", str(noise), "synth",
          f"{n_speech / sr:.4f}", channel["noise"], "vol", f"{vol:.6f}"])  # fmt: skip
    effects = ["highpass", str(channel["highpass"]), "lowpass", str(channel["lowpass"])]
    if channel["reverb"]:
        effects += ["reverb", str(channel["reverb"])]
    # sox -m mixes the (padded) speech and the noise; -R: repeatable dither
    _run(["sox", "-R", "-m", str(speech), str(noise), str(out), *effects, "rate", str(SAMPLE_RATE),
          *(["trim", "0", f"{duration:.3f}"] if duration is not None else [])])  # fmt: skip
    y, _ = sf.read(str(out), dtype="float32")
    if y.ndim > 1:
        y = y.mean(axis=1)
    if duration is not None:
        n = round(duration * SAMPLE_RATE)
        y = np.pad(y, (0, max(0, n - len(y))))[:n]
    return y


def log_mel(y: np.ndarray) -> np.ndarray:
    """(mels, frames) log power in dB (librosa mel filterbank, 25 ms window, 10 ms hop)."""
    librosa = _librosa()
    mel = librosa.feature.melspectrogram(
        y=y, sr=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN, hop_length=HOP, n_mels=N_MELS, center=False
    )
    return np.asarray(librosa.power_to_db(mel, ref=1.0, top_db=None), dtype=np.float32)


def _channel(rng: random.Random) -> dict[str, Any]:
    return {
        "noise": rng.choice(("whitenoise", "pinknoise", "brownnoise")),
        "snr": rng.uniform(5.0, 30.0),
        "highpass": round(rng.uniform(50, 300)),
        "lowpass": round(rng.uniform(3400, 7500)),
        "reverb": round(rng.uniform(20, 60)) if rng.random() < 0.3 else 0,
        "lead": rng.uniform(0.05, 0.3),
    }


# ---------------------------------------------------------------------------------------------------------- the tasks


@dataclass
class Corpus:
    """One task's examples: ``x`` (N, mels, frames) unstandardised log-mels, one row per segment (task A) or clip
    (task B); ``y`` (N,) labels; ``group`` (N,) the recording each row belongs to; ``split`` (N,) 0/1/2 = train/val/
    test; ``speaker`` (N,) speaker index; ``classes`` the label names; ``speakers`` the speaker idents."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    split: np.ndarray
    speaker: np.ndarray
    classes: tuple[str, ...]
    speakers: tuple[str, ...]

    def part(self, split: str) -> Corpus:
        s = {"train": 0, "val": 1, "test": 2}[split]
        m = self.split == s
        return Corpus(self.x[m], self.y[m], self.group[m], self.split[m], self.speaker[m], self.classes, self.speakers)

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path, x=self.x.astype(np.float16), y=self.y, group=self.group, split=self.split, speaker=self.speaker,
            classes=np.array(self.classes), speakers=np.array(self.speakers),
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Corpus:
        with np.load(path) as d:
            return cls(
                d["x"].astype(np.float32), d["y"], d["group"], d["split"], d["speaker"],
                tuple(str(c) for c in d["classes"]), tuple(str(s) for s in d["speakers"]),
            )  # fmt: skip


def segments(mel: np.ndarray, length: int = SEGMENT) -> list[np.ndarray]:
    """Non-overlapping ``length``-frame windows of a (mels, frames) spectrogram (a short one: one padded window)."""
    n = mel.shape[1]
    if n < length:
        return [np.pad(mel, ((0, 0), (0, length - n)), mode="edge")]
    return [mel[:, i : i + length] for i in range(0, n - length + 1, length)]


_SPLIT = {"train": 0, "val": 1, "test": 2}


def _jobs_a(cfg: CorpusConfig, speakers: list[Speaker], units: list[str]) -> list[dict[str, Any]]:
    jobs = []
    for si, sp in enumerate(speakers):
        for r, label in enumerate(recording_labels(cfg, si)):
            rng = random.Random(f"a:{cfg.seed}:{si}:{r}")
            jobs.append(
                {
                    "speaker": si,
                    "voice": sp.ident,
                    "parts": rng.sample(units, cfg.sentences),
                    "rate": max(80.0, cfg.rate[label] + sp.rate + rng.gauss(0, 6)),
                    "pitch": min(99.0, max(0.0, cfg.pitch[label] + sp.pitch + rng.gauss(0, 3))),
                    "word_gap": max(0.0, cfg.word_gap[label] + sp.word_gap + rng.gauss(0, 0.5)),
                    "pitch_range": rng.choices(RANGES, weights=RANGE_P[label])[0],
                    "pauses": [
                        max(0.05, cfg.pause[label] + sp.pause + rng.gauss(0, 0.1)) for _ in range(cfg.sentences - 1)
                    ],
                    "channel": _channel(rng),
                    "label": label,
                }
            )
    return jobs


def _jobs_b(cfg: CorpusConfig, speakers: list[Speaker]) -> list[dict[str, Any]]:
    jobs = []
    for si, sp in enumerate(speakers):
        for wi, word in enumerate(cfg.words):
            for t in range(cfg.tokens):
                rng = random.Random(f"b:{cfg.seed}:{si}:{wi}:{t}")
                jobs.append(
                    {
                        "speaker": si,
                        "voice": sp.ident,
                        "parts": [word],
                        "rate": rng.uniform(120, 210),
                        "pitch": rng.uniform(25, 75),
                        "word_gap": 0.0,
                        "pitch_range": rng.choice(RANGES),
                        "pauses": [],
                        "channel": _channel(rng),
                        "label": wi,
                        "duration": CLIP_SECONDS,
                    }
                )
    return jobs


def _render(job: dict[str, Any]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="tokensieve-speech-") as d:
        y = synthesise(
            Path(d), job["voice"], job["parts"], rate=job["rate"], pitch=job["pitch"], word_gap=job["word_gap"],
            pitch_range=job["pitch_range"], pauses=job["pauses"], channel=job["channel"],
            duration=job.get("duration"),
        )  # fmt: skip
    return log_mel(y)


def _render_all(
    jobs: list[dict[str, Any]], workers: int, progress: Callable[[int, int], None] | None
) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, mel in enumerate(pool.map(_render, jobs)):
            out.append(mel)
            if progress is not None:
                progress(i + 1, len(jobs))
    return out


def build_task(task: str, cfg: CorpusConfig, *, progress: Callable[[int, int], None] | None = None) -> Corpus:
    """Generate one task ("a" or "b") from scratch (no cache)."""
    check_tools()
    _librosa()
    speakers = make_speakers(cfg)
    split_of = [_SPLIT[s.split] for s in speakers]
    idents = tuple(s.ident for s in speakers)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    groups: list[int] = []
    spk: list[int] = []
    if task == "a":
        jobs = _jobs_a(cfg, speakers, corpus_sentences(cfg))
        classes: tuple[str, ...] = ("unmarked", "marked")
    elif task == "b":
        jobs = _jobs_b(cfg, speakers)
        classes = tuple(cfg.words)
    else:
        raise ConfigError(f"unknown speech task {task!r}: use a or b")
    for g, (job, mel) in enumerate(zip(jobs, _render_all(jobs, cfg.workers, progress))):
        for seg in segments(mel) if task == "a" else [mel[:, :SEGMENT]]:
            xs.append(seg)
            ys.append(job["label"])
            groups.append(g)
            spk.append(job["speaker"])
    spk_arr = np.array(spk, dtype=np.int64)
    return Corpus(
        x=np.stack(xs).astype(np.float32),
        y=np.array(ys, dtype=np.int64),
        group=np.array(groups, dtype=np.int64),
        split=np.array([split_of[s] for s in spk], dtype=np.int64),
        speaker=spk_arr,
        classes=classes,
        speakers=idents,
    )


def corpus_dir(cfg: CorpusConfig, task: str, root: Path | None = None) -> Path:
    return (root or home() / "speech") / f"{task}-{cfg.key(task)}"


def load_or_build(
    task: str, cfg: CorpusConfig | None = None, *, root: Path | None = None, progress: bool = False
) -> Corpus:
    """The task's corpus from the cache, generated (and cached) first if needed."""
    cfg = cfg or CorpusConfig()
    d = corpus_dir(cfg, task, root)
    path = d / f"task_{task}.npz"
    if path.exists():
        return Corpus.load(path)
    check_tools()
    _librosa()
    bar = None
    callback = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"speech task {task}", unit="rec")

        def callback(i: int, n: int) -> None:
            assert bar is not None
            bar.total = n
            bar.update(1)

    t0 = time.perf_counter()
    corpus = build_task(task, cfg, progress=callback)
    if bar is not None:
        bar.close()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"task_{task}.tmp.npz"
    corpus.save(tmp)
    tmp.replace(path)
    meta = d / "config.json"
    record = json.loads(meta.read_text()) if meta.exists() else {"config": asdict(cfg), "seconds": {}}
    record["seconds"][task] = round(time.perf_counter() - t0, 1)
    meta.write_text(json.dumps(record, indent=2) + "\n")
    return corpus


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardise log-mels per mel band with the training rows' mean and deviation (over rows and frames)."""
    mean = train.mean(axis=(0, 2), keepdims=True)
    std = train.std(axis=(0, 2), keepdims=True) + 1e-5
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]
