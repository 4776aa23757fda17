"""The offline speech corpus of the DAAM experiments (tokensieve.data.speech): speakers and splits, features,
and — where espeak-ng and sox are installed — a tiny corpus built end to end."""

from __future__ import annotations

import numpy as np
import pytest

from tokensieve.data import speech
from tokensieve.data.speech import Corpus, CorpusConfig, make_speakers, segments, standardise
from tokensieve.errors import ConfigError

needs_tools = pytest.mark.skipif(
    not speech.tools_available(), reason=f"espeak-ng and sox are not installed ({speech.INSTALL_HINT})"
)


def _librosa_available() -> bool:
    try:
        import librosa  # noqa: F401
    except ImportError:
        return False
    return True


needs_librosa = pytest.mark.skipif(not _librosa_available(), reason="librosa missing: pip install 'tokensieve[audio]'")


def test_speakers_are_held_out_and_labels_are_balanced_per_speaker() -> None:
    cfg = CorpusConfig(speakers=(8, 4, 4), accents=2)
    sp = make_speakers(cfg)
    assert [s.ident for s in sp] == [s.ident for s in make_speakers(cfg)]  # deterministic
    assert len(sp) == 32
    assert len({s.ident for s in sp}) == 32
    variants = {split: {s.ident.split("+")[1] for s in sp if s.split == split} for split in ("train", "val", "test")}
    assert len(variants["train"]) == 8
    assert not variants["train"] & variants["val"]
    assert not variants["train"] & variants["test"]
    assert not variants["val"] & variants["test"]
    for si in range(len(sp)):  # task A: every speaker reads half of its recordings marked
        assert sorted(speech.recording_labels(cfg, si)) == [0, 0, 1, 1]
    jobs = speech._jobs_a(cfg, sp, ["In the beginning God created the heaven and the earth."] * 4)
    marked = [j for j in jobs if j["label"]]
    unmarked = [j for j in jobs if not j["label"]]
    assert len(marked) == len(unmarked) == 64
    for key in ("rate", "pitch"):  # markers: slower and lower on average, overlapping between the classes
        assert np.mean([j[key] for j in marked]) < np.mean([j[key] for j in unmarked])
        assert max(j[key] for j in marked) > min(j[key] for j in unmarked)
    assert np.mean([j["word_gap"] for j in marked]) > np.mean([j["word_gap"] for j in unmarked])
    with pytest.raises(ConfigError, match="at most"):
        make_speakers(CorpusConfig(speakers=(70, 10, 10)))
    with pytest.raises(ConfigError, match="accents"):
        make_speakers(CorpusConfig(accents=9))


def test_missing_tools_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install -y espeak-ng sox"):
        speech.check_tools()
    assert not speech.tools_available()


def test_segments_and_standardise() -> None:
    mel = np.arange(40 * 250, dtype=np.float32).reshape(40, 250)
    segs = segments(mel)
    assert len(segs) == 2
    assert all(s.shape == (40, 120) for s in segs)
    np.testing.assert_array_equal(segs[1], mel[:, 120:240])
    short = segments(mel[:, :50])
    assert len(short) == 1
    assert short[0].shape == (40, 120)
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(30, 4, 10)).astype(np.float32)
    a, b = standardise(train, train[:5] + 1.0)
    np.testing.assert_allclose(a.mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(a.std(axis=(0, 2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(b, a[:5] + 1.0 / train.std(axis=(0, 2), keepdims=True), atol=1e-4)


def test_corpus_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    c = Corpus(
        rng.normal(size=(6, 40, 120)).astype(np.float32), np.array([0, 1, 0, 1, 0, 1]), np.arange(6),
        np.array([0, 0, 1, 1, 2, 2]), np.arange(6), ("unmarked", "marked"), tuple(f"s{i}" for i in range(6)),
    )  # fmt: skip
    c.save(tmp_path / "c.npz")
    d = Corpus.load(tmp_path / "c.npz")
    np.testing.assert_allclose(d.x, c.x, atol=1e-2)  # stored as float16
    assert d.classes == c.classes
    assert d.part("test").y.tolist() == [0, 1]


def test_config_key_changes_with_the_config() -> None:
    assert CorpusConfig().key("a") == CorpusConfig(workers=1).key("a")  # workers do not change the data
    assert CorpusConfig().key("a") != CorpusConfig(seed=1).key("a")
    assert CorpusConfig().key("b") == CorpusConfig(rate=(1.0, 2.0, 3.0)).key("b")  # task A's prosody: not B's data
    assert CorpusConfig().key("a") != CorpusConfig(rate=(1.0, 2.0, 3.0)).key("a")


@needs_tools
@needs_librosa
def test_synthesis_is_deterministic_and_features_have_the_paper_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    channel = {"noise": "pinknoise", "snr": 15.0, "highpass": 100, "lowpass": 4000, "reverb": 0, "lead": 0.1}
    kw = {"rate": 170.0, "pitch": 50.0, "word_gap": 0.0, "pitch_range": "medium", "pauses": [], "channel": channel}
    y1 = speech.synthesise(tmp_path, "en-us+m3", ["seven"], duration=speech.CLIP_SECONDS, **kw)
    y2 = speech.synthesise(tmp_path, "en-us+m3", ["seven"], duration=speech.CLIP_SECONDS, **kw)
    np.testing.assert_array_equal(y1, y2)
    mel = speech.log_mel(y1)
    assert mel.shape[0] == 40
    assert mel.shape[1] == 120
    assert np.isfinite(mel).all()


@needs_tools
@needs_librosa
def test_tiny_corpus_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = CorpusConfig(
        speakers=(1, 1, 1), accents=2, recordings=2, sentences=1, tokens=1, words=("yes", "no"), text="generated"
    )
    b = speech.load_or_build("b", cfg, root=tmp_path)
    assert b.x.shape == (12, 40, 120)
    assert sorted(set(b.y.tolist())) == [0, 1]
    assert (speech.corpus_dir(cfg, "b", tmp_path) / "task_b.npz").exists()
    again = speech.load_or_build("b", cfg, root=tmp_path)  # from the cache
    np.testing.assert_array_equal(again.y, b.y)
    a = speech.build_task("a", cfg)
    assert a.x.shape[1:] == (40, 120)
    assert set(np.unique(a.split).tolist()) == {0, 1, 2}
    assert sorted(np.unique(a.y).tolist()) == [0, 1]
    for g in np.unique(a.group):  # a recording's segments share its label and speaker
        assert len(set(a.y[a.group == g].tolist())) == 1
        assert len(set(a.speaker[a.group == g].tolist())) == 1
