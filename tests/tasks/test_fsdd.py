"""FSDD: the archive (checksum, cache, corrupt copies), WAV reading and its bad inputs, splits, utterance synthesis.

Real recordings come from the shared archive (``$LEANLSTM_DATA/fsdd``), unpacked once per session into a tmp cache.
The fixtures here are imported by the other digits tests.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

from leanlstm.tasks import fsdd
from leanlstm.tasks.data import DataError

REPO = Path(__file__).resolve().parents[2]


def shared_archive() -> Path:
    directory = Path(os.environ.get("LEANLSTM_DATA", REPO.parent / "shared" / "data"))
    path = directory / "fsdd" / fsdd.ARCHIVES[0]
    if not path.is_file():
        raise RuntimeError(f"the digits tests read {path}; set LEANLSTM_DATA to the shared data folder (see README)")
    return path


@pytest.fixture(scope="session")
def fsdd_cache(tmp_path_factory) -> Path:
    """A cache folder (``fsdd.cache_dir``) holding the verified, unpacked recordings."""
    cache = tmp_path_factory.mktemp("leanlstm-cache")
    fsdd.recordings_dir(shared_archive().parents[1], cache, fetch=False)
    return cache


@pytest.fixture(scope="session")
def recordings_folder(fsdd_cache) -> Path:
    return fsdd_cache / "fsdd" / "recordings"


@pytest.fixture(scope="session")
def handful(recordings_folder) -> list[fsdd.Recording]:
    """Every digit of two speakers (one of them the held-out one) in takes 0, 5, 10 and 11: 80 recordings."""
    return fsdd.load_recordings(recordings_folder, speakers=("george", fsdd.HELD_OUT), takes=(0, 5, 10, 11))


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, width: int = 2) -> Path:
    """``samples`` (N,) or (N, channels) floats in [-1, 1] as PCM."""
    samples = samples[:, None] if samples.ndim == 1 else samples
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(samples.shape[1])
        handle.setsampwidth(width)
        handle.setframerate(rate)
        if width == 1:
            handle.writeframes((samples * 127 + 128).astype(np.uint8).tobytes())
        else:
            handle.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


# --- the archive ---------------------------------------------------------------------------------------------------
def test_unpack_checks_the_digest_and_is_reused(fsdd_cache, recordings_folder, monkeypatch):
    assert len(list(recordings_folder.glob("*.wav"))) == fsdd.NUM_RECORDINGS
    assert (recordings_folder / "SHA256").read_text().strip() == fsdd.RECORDINGS_SHA256

    def no_archive(*args, **kwargs):
        raise AssertionError("a verified cache must not read the archive again")

    monkeypatch.setattr(fsdd, "find_archive", no_archive)
    assert fsdd.recordings_dir(cache=fsdd_cache) == recordings_folder


def test_corrupt_archive_is_refused_and_nothing_is_overwritten(tmp_path):
    target = tmp_path / "cache" / "recordings"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("an earlier unpack")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(shared_archive().read_bytes()[: 1 << 20])
    with pytest.raises(DataError, match="truncated or corrupt"):
        fsdd.unpack(truncated, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["recordings"]   # no staging folder left behind


def test_modified_archive_fails_the_digest(tmp_path, recordings_folder):
    archive = tmp_path / "two.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:   # GitHub's layout: <repo>-<commit>/recordings/*.wav
        for name in ("3_theo_7.wav", "4_lucas_30.wav"):
            tar.add(recordings_folder / name, f"free-spoken-digit-dataset-abc/recordings/{name}")
        readme = b"not a recording"
        info = tarfile.TarInfo("free-spoken-digit-dataset-abc/README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    with pytest.raises(DataError, match="holds 2 recordings .* incomplete or modified"):
        fsdd.unpack(archive, tmp_path / "checked")
    assert not (tmp_path / "checked").exists()
    folder = fsdd.unpack(archive, tmp_path / "unchecked", expected=None)
    assert sorted(p.name for p in folder.glob("*.wav")) == ["3_theo_7.wav", "4_lucas_30.wav"]


def test_missing_archive_says_where_and_what(tmp_path):
    with pytest.raises(DataError, match="no FSDD archive .*github.com/Jakobovski"):
        fsdd.find_archive(tmp_path, fetch=False)


def test_a_missing_archive_is_downloaded(tmp_path, monkeypatch):
    fetched = []

    def fake_download(url, destination, expected_md5=None):   # what a network would deliver
        fetched.append((url, destination))
        return destination

    monkeypatch.setattr(fsdd, "download", fake_download)
    path = fsdd.find_archive(tmp_path)
    assert fetched == [(fsdd.URL, tmp_path / "fsdd" / fsdd.ARCHIVES[1])] and path == fetched[0][1]
    assert fsdd.COMMIT in fsdd.URL and fsdd.URL.startswith("https://github.com/Jakobovski/free-spoken-digit-dataset/")


# --- reading audio ---------------------------------------------------------------------------------------------------
def test_read_wav_of_a_real_recording(recordings_folder):
    path = recordings_folder / "7_jackson_32.wav"
    audio = fsdd.read_wav(path)
    with wave.open(str(path)) as handle:
        frames = handle.getnframes()
        raw = np.frombuffer(handle.readframes(frames), "<i2")
    assert audio.dtype == np.float32 and audio.shape == (frames,)
    np.testing.assert_array_equal(audio, raw / np.float32(32768))


def test_other_sample_rate_is_resampled_or_refused(tmp_path, recordings_folder, caplog):
    audio = fsdd.read_wav(recordings_folder / "2_nicolas_3.wav")
    up = fsdd.resample_poly(audio, 8000, 16000)
    path = write_wav(tmp_path / "16k.wav", up, rate=16000)
    with caplog.at_level(logging.INFO, logger="leanlstm"):
        back = fsdd.read_wav(path)
    assert "resampled from 16000 Hz to 8000 Hz" in caplog.text
    assert back.shape == audio.shape
    assert np.corrcoef(back, audio)[0, 1] > 0.99
    with pytest.raises(DataError, match="sampled at 16000 Hz; the model expects 8000 Hz"):
        fsdd.read_wav(path, resample=False)


def test_stereo_is_averaged(tmp_path, caplog):
    left, right = np.full(800, 0.5), np.full(800, -0.25)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1))
    with caplog.at_level(logging.INFO, logger="leanlstm"):
        audio = fsdd.read_wav(path)
    assert "2 channels, averaged to mono" in caplog.text
    np.testing.assert_allclose(audio, 0.125, atol=1e-4)


def test_eight_bit_pcm(tmp_path):
    audio = fsdd.read_wav(write_wav(tmp_path / "u8.wav", np.array([0.0, 0.5, -0.5]), width=1))
    np.testing.assert_allclose(audio, [0.0, 0.5, -0.5], atol=0.01)


def test_bad_files_get_clear_errors(tmp_path, recordings_folder):
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(DataError, match="holds no audio"):
        fsdd.read_wav(empty)
    data = (recordings_folder / "0_george_0.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-1000])
    with pytest.raises(DataError, match="truncated: its header announces 2384 samples, the file holds 1884"):
        fsdd.read_wav(tmp_path / "cut.wav")
    (tmp_path / "notes.wav").write_text("this is not audio")
    with pytest.raises(DataError, match="not a PCM WAV file"):
        fsdd.read_wav(tmp_path / "notes.wav")
    with pytest.raises(DataError, match="no such file"):
        fsdd.read_wav(tmp_path / "missing.wav")


# --- splits and utterances -------------------------------------------------------------------------------------------
def test_splits_follow_the_takes_and_hold_the_speaker_out(handful):
    pools = {split: fsdd.split_pool(handful, split) for split in fsdd.SPLITS}
    assert {split: sorted({r.take for r in pool}) for split, pool in pools.items()} == {
        "test": [0], "valid": [5], "train": [10, 11], "heldout": [0, 5, 10, 11]}
    assert {r.speaker for r in pools["heldout"]} == {fsdd.HELD_OUT}
    assert all(r.speaker != fsdd.HELD_OUT for split in ("train", "valid", "test") for r in pools[split])
    assert fsdd.EVAL_SETS == {"train": (500, 1000), "valid": (500, 1001), "test": (1000, 1002),
                              "heldout": (1000, 1003)}   # the sizes the docs state


def test_synthesis_is_deterministic_and_labels_are_right(handful):
    pool = fsdd.split_pool(handful, "train")
    first, again = fsdd.synthesize(pool, 20, seed=7), fsdd.synthesize(pool, 20, seed=7)
    assert [u.digits for u in first] == [u.digits for u in again]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first, again))
    assert [u.digits for u in fsdd.synthesize(pool, 20, seed=8)] != [u.digits for u in first]
    config = fsdd.SynthesisConfig()
    assert {len(u.digits) for u in first} <= set(range(1, 8))
    for u in first:
        takes = {(r.digit, r.take): r.audio for r in pool}
        edges = [0] + [x for segment in u.segments for x in segment] + [len(u.audio)]
        silences = np.diff(edges)[::2] / fsdd.SAMPLE_RATE              # before, between and after the digits
        assert config.edge_silence[0] - 1e-3 <= min(silences[0], silences[-1])
        assert max(silences[0], silences[-1]) <= config.edge_silence[1] + 1e-3
        assert all(config.gap_silence[0] - 1e-3 <= s <= config.gap_silence[1] + 1e-3 for s in silences[1:-1])
        for digit, (start, end) in zip(u.digits, u.segments):        # each span is a take of that very digit
            piece = u.audio[start:end]
            assert any(len(audio) == len(piece) and np.abs(audio - piece).max() < 1e-3
                       for (d, _), audio in takes.items() if d == digit)
        assert np.abs(u.audio[: u.segments[0][0]]).max() < 1e-3        # silence is a faint noise floor


def test_augmentation_is_seeded_and_bounded(handful):
    pool = fsdd.split_pool(handful, "train")
    clean = fsdd.synthesize(pool, 10, seed=3)
    noisy = fsdd.synthesize(pool, 10, seed=3, augment=fsdd.Augmentation())
    again = fsdd.synthesize(pool, 10, seed=3, augment=fsdd.Augmentation())
    assert [(u.digits, u.speaker) for u in noisy] == [(u.digits, u.speaker) for u in clean]   # same words
    assert not any(np.array_equal(a.audio, b.audio) for a, b in zip(noisy, clean))                # other audio
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(noisy, again))
    for u in noisy:
        assert np.abs(u.audio).max() <= 1.0
    slowest = fsdd.change_speed(np.arange(1000, dtype=np.float32), 0.9)
    assert len(slowest) == 1111 and slowest[0] == 0 and abs(slowest[-1] - 999) < 1


def test_synthesis_needs_all_ten_digits():
    pool = [fsdd.Recording(d, "ann", 0, np.ones(10, np.float32)) for d in range(9)]
    with pytest.raises(DataError, match="all ten digits"):
        fsdd.synthesize(pool, 1, seed=0)
