"""The Free Spoken Digit Dataset (FSDD) and connected-digit utterances built from it.

FSDD holds 3,000 mono 8 kHz recordings, 6 speakers x 10 digits x 50 takes, named ``{digit}_{speaker}_{take}.wav``
(Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0). The archive is read from the data directory
(``--data-dir``, ``$LEANLSTM_DATA``, else the per-user cache; see ``tasks.data.data_dir``), at ``fsdd/`` or at its
top, and unpacked on first use into a cache folder (``$LEANLSTM_CACHE``, else ``$XDG_CACHE_HOME/leanlstm``, else
``~/.cache/leanlstm``), because the data directory may be read-only. Without an archive, the dataset's GitHub
snapshot of May 2024 (commit ``26eb9aa``) is downloaded. Either archive is checked by a SHA-256 over the unpacked
recordings (names and bytes), so a repacked copy and GitHub's tarball pass the same check; a corrupt or
incomplete archive is refused before anything in the cache changes.

Choices (fixed here so that every run and every table uses the same data):

* **Splits** (the dataset's convention, with its training takes split once more): takes 0-4 test, takes 5-9
  validation, takes 10-49 training, each for the five speakers other than the held-out one.
* **Held-out speaker**: ``yweweler`` (the last name alphabetically) never appears in training or validation; the
  ``heldout`` split draws from all 50 of that speaker's takes, for a speaker-independent WER.
* **Connected digits** (``synthesize``): 1-7 digits (uniform), each a take of one speaker (uniform among the
  split's speakers) of a uniformly drawn digit, with ``edge_silence`` 0.10-0.30 s before the first and after the
  last digit and ``gap_silence`` 0.05-0.40 s between digits (uniform). Silence is not digital zero but white noise
  at ``noise_floor`` (1e-4, about -80 dBFS), so log-mel features never hit their floor exactly.
* **Fixed evaluation sets** (``EVAL_SETS``): 500 validation, 1,000 test and 1,000 held-out-speaker utterances (and
  500 clean training utterances, to compare training and test error), each from its own seed; they are the same on
  every machine and in every run.
* **Augmentation** (``Augmentation``, training only): a speed change of 0.9-1.1x per digit (resampling: tempo and
  pitch together), a gain of -6..+6 dB per utterance and, with probability 0.5, white noise at 10-40 dB SNR.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import wave
import zlib
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data import DataError, data_dir, download

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"          # the GitHub snapshot of May 2024
URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{COMMIT}.tar.gz"
ARCHIVES = ("fsdd-recordings.tar.gz", f"free-spoken-digit-dataset-{COMMIT}.tar.gz")  # shared copy, download
RECORDINGS_SHA256 = "997e451901d158bdf09dde66b240f3f19310fdbf4d9c056ebd806254df4a672c"  # see recordings_digest
NUM_RECORDINGS = 3000
SYNTHESIS_VERSION = 1   # part of the feature cache's keys: bump it when synthesize() makes other utterances
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
HELD_OUT = "yweweler"
TAKES = {"test": range(0, 5), "valid": range(5, 10), "train": range(10, 50), "heldout": range(0, 50)}
SPLITS = tuple(TAKES)
_NAME = re.compile(r"(?:^|/)recordings/([0-9])_([a-z]+)_([0-9]+)\.wav$")
_DONE = "SHA256"   # written last into an unpacked folder: its presence marks a complete, verified unpack


# --- the archive and its cache --------------------------------------------------------------------------------
def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Writable folder for unpacked data and computed features: the argument, ``$LEANLSTM_CACHE``, else
    ``$XDG_CACHE_HOME/leanlstm`` (default ``~/.cache/leanlstm``)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("LEANLSTM_CACHE"):
        return Path(os.environ["LEANLSTM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leanlstm"


def find_archive(directory: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """The FSDD archive in ``directory`` (see ``tasks.data.data_dir``) or its ``fsdd/`` folder; downloaded from
    GitHub into ``fsdd/`` when missing and ``fetch``."""
    directory = data_dir(directory)
    for folder in (directory / "fsdd", directory):
        for name in ARCHIVES:
            if (folder / name).is_file():
                return folder / name
    if not fetch:
        raise DataError(f"no FSDD archive ({' or '.join(ARCHIVES)}) in {directory} or {directory / 'fsdd'}; set "
                        f"--data-dir or LEANLSTM_DATA to the folder that holds it, or allow the download of {URL}")
    return download(URL, directory / "fsdd" / ARCHIVES[1])   # checked by the recordings' digest on unpacking


def recordings_dir(data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                   fetch: bool = True, verify: bool = True) -> Path:
    """Folder of the 3,000 verified recordings, unpacking (and, if needed, downloading) the archive first
    (``verify=False``: whatever recordings the archive holds, unchecked).

    >>> folder = recordings_dir()                                    # doctest: +SKIP
    >>> sorted(folder.glob("*.wav"))[0].name                          # doctest: +SKIP
    '0_george_0.wav'
    """
    target = cache_dir(cache) / "fsdd" / "recordings"
    if _complete(target, RECORDINGS_SHA256 if verify else None):
        return target
    return unpack(find_archive(data, fetch), target, RECORDINGS_SHA256 if verify else None)


def _complete(folder: Path, expected: str | None = RECORDINGS_SHA256) -> bool:
    marker = folder / _DONE
    return marker.is_file() and (expected is None or marker.read_text().strip() == expected)


def recordings_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over ``(file name, bytes)`` pairs in name order: the same for any archive of the same recordings."""
    digest = hashlib.sha256()
    for name, data in sorted(files):
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def unpack(archive: str | os.PathLike, target: str | os.PathLike, expected: str | None = RECORDINGS_SHA256) -> Path:
    """Unpack the recordings of ``archive`` into ``target`` (flat ``*.wav``), after checking their digest.

    Everything is written to a temporary folder beside ``target`` and renamed into place only once the digest
    matches, so a corrupt archive leaves an existing ``target`` untouched. ``expected=None`` skips the check.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    files = _read_archive(archive)
    digest = recordings_digest(files.items())
    if expected is not None and (len(files) != NUM_RECORDINGS or digest != expected):
        raise DataError(f"{archive} holds {len(files)} recordings with digest {digest[:12]}..., expected "
                        f"{NUM_RECORDINGS} with {expected[:12]}...: the archive is incomplete or modified. Replace "
                        f"it with a good copy (or delete it to download {URL}); nothing was unpacked.")
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / _DONE).write_text(digest + "\n")
        if target.exists():          # an incomplete earlier unpack, or another process that just finished
            if _complete(target, expected):
                return target
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not _complete(target, expected):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %d FSDD recordings from %s to %s", len(files), archive, target)
    return target


def _read_archive(archive: Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of the recordings in a tar archive (any folder layout)."""
    files = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = _NAME.search(member.name)
                if match and member.isfile():
                    files[f"{match[1]}_{match[2]}_{match[3]}.wav"] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(f"cannot read {archive} ({type(error).__name__}: {error}): the archive is truncated or "
                        f"corrupt. Replace it with a good copy (or delete it to download {URL}).") from error
    return files


# --- reading audio -------------------------------------------------------------------------------------------
def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, resample: bool = True) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of a PCM WAV file, at ``sample_rate``.

    Several channels are averaged; another sample rate is resampled (polyphase, ``scipy.signal.resample_poly``),
    each with a log line, or refused when ``resample=False``. Empty, truncated and non-WAV files raise
    ``DataError`` with the reason.

    >>> audio = read_wav(recordings_dir() / "7_jackson_32.wav")       # doctest: +SKIP
    >>> audio.dtype, audio.ndim                                      # doctest: +SKIP
    (dtype('float32'), 1)
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as handle:
            channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
            declared = handle.getnframes()
            raw = handle.readframes(declared)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a WAV file") from None
    except (wave.Error, EOFError) as error:
        raise DataError(f"{path} is not a PCM WAV file ({error}); convert it, e.g. "
                        f"`ffmpeg -i IN -ac 1 -ar {sample_rate} -c:a pcm_s16le OUT.wav`") from None
    frames = len(raw) // (width * channels)
    if frames < declared:
        raise DataError(f"{path} is truncated: its header announces {declared} samples, the file holds {frames}")
    if frames == 0:
        raise DataError(f"{path} holds no audio (0 samples)")
    audio = _pcm_to_float(raw[: frames * width * channels], width).reshape(frames, channels)
    if channels > 1:
        log.info("%s: %d channels, averaged to mono", path, channels)
    audio = audio.mean(axis=1) if channels > 1 else audio[:, 0]
    if rate != sample_rate:
        if not resample:
            raise DataError(f"{path} is sampled at {rate} Hz; the model expects {sample_rate} Hz")
        log.info("%s: resampled from %d Hz to %d Hz", path, rate, sample_rate)
        audio = resample_poly(audio, rate, sample_rate)
    return audio.astype(np.float32)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:                                        # WAV's 8-bit PCM is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:                                        # 24-bit: widen to 32 bits
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        raw = np.concatenate([np.zeros((len(b), 1), np.uint8), b], axis=1).tobytes()
        width = 4
    if width not in (2, 4):
        raise DataError(f"unsupported sample width of {width} bytes")
    dtype = np.dtype(f"<i{width}")
    return np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (8 * width - 1))


def resample_poly(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` at ``rate`` Hz resampled to ``target`` Hz (polyphase filter, exact rational ratio)."""
    from scipy.signal import resample_poly as _resample  # scipy comes with librosa; imported only when needed

    divisor = gcd(rate, target)
    return _resample(audio.astype(np.float64), target // divisor, rate // divisor).astype(np.float32)


# --- recordings and splits -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recording:
    """One FSDD take: ``audio`` is mono float32 at 8 kHz."""

    digit: int
    speaker: str
    take: int
    audio: np.ndarray = field(repr=False, compare=False)


def parse_name(name: str) -> tuple[int, str, int]:
    """``(digit, speaker, take)`` of a file name such as ``7_jackson_32.wav``."""
    match = _NAME.search("recordings/" + Path(name).name)
    if match is None:
        raise DataError(f"{name} is not an FSDD recording name ({{digit}}_{{speaker}}_{{take}}.wav)")
    return int(match[1]), match[2], int(match[3])


def load_recordings(folder: str | os.PathLike, speakers: Sequence[str] | None = None,
                    takes: Iterable[int] | None = None) -> list[Recording]:
    """The recordings in ``folder`` (optionally of some speakers and takes), sorted by speaker, digit, take."""
    takes = None if takes is None else set(takes)
    out = []
    for path in Path(folder).glob("*.wav"):
        digit, speaker, take = parse_name(path.name)
        if (speakers is None or speaker in speakers) and (takes is None or take in takes):
            out.append(Recording(digit, speaker, take, read_wav(path)))
    if not out:
        raise DataError(f"no FSDD recordings in {folder}")
    return sorted(out, key=lambda r: (r.speaker, r.digit, r.take))


def split_pool(recordings: Sequence[Recording], split: str) -> list[Recording]:
    """The recordings that utterances of ``split`` (train, valid, test, heldout) are built from."""
    if split not in TAKES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    takes = TAKES[split]
    pool = [r for r in recordings if r.take in takes and (r.speaker == HELD_OUT) == (split == "heldout")]
    if not pool:
        raise DataError(f"no recordings for the {split} split")
    return pool


# --- connected-digit utterances ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthesisConfig:
    min_digits: int = 1                                      # digits per utterance, uniform in [min, max]
    max_digits: int = 7
    edge_silence: tuple[float, float] = (0.10, 0.30)         # seconds before the first / after the last digit
    gap_silence: tuple[float, float] = (0.05, 0.40)          # seconds between digits
    noise_floor: float = 1e-4                                # std of the white noise that fills silences


@dataclass(frozen=True)
class Augmentation:
    speed: tuple[float, float] = (0.9, 1.1)                  # per digit; resampling changes tempo and pitch
    gain_db: tuple[float, float] = (-6.0, 6.0)               # per utterance
    noise_probability: float = 0.5                           # chance of added white noise, per utterance
    snr_db: tuple[float, float] = (10.0, 40.0)               # its signal-to-noise ratio


@dataclass(frozen=True)
class Utterance:
    """Connected digits spoken by one speaker; ``audio`` is mono float32 at 8 kHz, digit ``i`` spans samples
    ``segments[i] = (start, end)`` of it."""

    digits: tuple[int, ...]
    speaker: str
    audio: np.ndarray = field(repr=False, compare=False)
    segments: tuple[tuple[int, int], ...] = field(default=(), compare=False)


EVAL_SETS = {"train": (500, 1000), "valid": (500, 1001), "test": (1000, 1002), "heldout": (1000, 1003)}  # (count, seed)


def synthesize(pool: Sequence[Recording], count: int, seed: int | Sequence[int],
               config: SynthesisConfig = SynthesisConfig(), augment: Augmentation | None = None) -> list[Utterance]:
    """``count`` connected-digit utterances from the recordings in ``pool`` (see the module docstring).

    Deterministic: the same pool, seed and settings give the same utterances. Augmentation draws from a random
    stream of its own, so an augmented set holds the same digits, speakers and takes as the clean one.

    >>> pool = [Recording(d, "ann", 0, np.ones(800, np.float32)) for d in range(10)]
    >>> [u.digits for u in synthesize(pool, 2, seed=0, config=SynthesisConfig(max_digits=3))]
    [(9, 0, 3), (0, 4, 8)]
    """
    rng, noise_rng, augment_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    by_speaker: dict[str, dict[int, list[Recording]]] = {}
    for recording in sorted(pool, key=lambda r: (r.speaker, r.digit, r.take)):
        by_speaker.setdefault(recording.speaker, {}).setdefault(recording.digit, []).append(recording)
    speakers = sorted(s for s, digits in by_speaker.items() if len(digits) == 10)
    if not speakers:
        raise DataError("no speaker in the pool has recordings of all ten digits")
    return [_utterance((rng, noise_rng, augment_rng), speakers, by_speaker, config, augment) for _ in range(count)]


def _utterance(rngs: tuple[np.random.Generator, ...], speakers: list[str], by_speaker, config: SynthesisConfig,
               augment: Augmentation | None) -> Utterance:
    rng, noise_rng, augment_rng = rngs   # words, the noise floor, augmentation: each its own stream
    speaker = speakers[rng.integers(len(speakers))]
    digits = rng.integers(0, 10, size=rng.integers(config.min_digits, config.max_digits + 1))
    silences = [rng.uniform(*config.edge_silence)]                        # seconds before each digit, then after
    silences += [rng.uniform(*config.gap_silence) for _ in range(len(digits) - 1)]
    silences += [rng.uniform(*config.edge_silence)]
    pieces, segments, at = [], [], 0
    for i, digit in enumerate(digits):
        takes = by_speaker[speaker][int(digit)]
        audio = takes[rng.integers(len(takes))].audio
        if augment is not None:
            audio = change_speed(audio, augment_rng.uniform(*augment.speed))
        gap = round(silences[i] * SAMPLE_RATE)
        pieces += [np.zeros(gap, np.float32), audio]
        segments.append((at + gap, at + gap + len(audio)))
        at += gap + len(audio)
    pieces.append(np.zeros(round(silences[-1] * SAMPLE_RATE), np.float32))
    audio = np.concatenate(pieces)
    audio += noise_rng.standard_normal(len(audio), dtype=np.float32) * np.float32(config.noise_floor)
    if augment is not None:
        audio = _gain_and_noise(augment_rng, audio, augment)
    return Utterance(tuple(int(d) for d in digits), speaker, audio.astype(np.float32), tuple(segments))


def _gain_and_noise(rng: np.random.Generator, audio: np.ndarray, augment: Augmentation) -> np.ndarray:
    audio = audio * np.float32(10 ** (rng.uniform(*augment.gain_db) / 20))
    snr, noisy = rng.uniform(*augment.snr_db), rng.random() < augment.noise_probability
    if noisy:
        power = float(np.mean(audio.astype(np.float64) ** 2))
        noise_std = np.float32((power / 10 ** (snr / 10)) ** 0.5)
        audio = audio + rng.standard_normal(len(audio), dtype=np.float32) * noise_std
    return np.clip(audio, -1.0, 1.0)


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` played ``factor`` times faster (linear interpolation: tempo and pitch change together)."""
    length = max(int(round(len(audio) / factor)), 1)
    return np.interp(np.arange(length) * factor, np.arange(len(audio)), audio).astype(np.float32)
