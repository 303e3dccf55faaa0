"""Log-mel filterbank features, whole-utterance and frame by frame, and an on-disk cache for them.

Settings (``FeatureConfig``): 40 mel bands (librosa's Slaney filterbank, 0-4 kHz), a 25 ms periodic Hann window
(200 samples at 8 kHz) zero-padded to a 256-point FFT, a 10 ms hop (80 samples), power spectrum, ``log(mel +
1e-6)``. The signal is preceded by ``win_length - hop_length`` zeros, so frame ``t`` ends at sample
``(t + 1) * hop_length``: one frame per hop, available as soon as its hop of audio has arrived, and an utterance
of ``N`` samples has ``N // hop_length`` frames. Features computed whole (``log_mel``), hop by hop
(``FeatureStream``) or in torch (``LogMel``, for export) agree to float32 rounding. Each frame's power
spectrum is librosa's ``melspectrogram(center=False)`` of the same samples.

Normalisation (``Normalizer``): per-band mean and standard deviation over training utterances; the model keeps
them in its config, so a checkpoint carries everything needed to turn audio into its inputs.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..files import atomic_write

log = logging.getLogger(__name__)
FEATURES_VERSION = 1   # part of every cache key: bump it when the features a config gives change


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 8000        # Hz; audio at another rate is resampled when read
    n_mels: int = 40               # mel bands
    win_length: int = 200          # analysis window in samples (25 ms)
    hop_length: int = 80           # frame step in samples (10 ms)
    n_fft: int = 256               # FFT size; the window is zero-padded to it
    fmin: float = 0.0              # lowest mel-band edge in Hz
    fmax: float | None = None      # highest, None: Nyquist
    floor: float = 1e-6            # added before the log

    def __post_init__(self) -> None:
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ValueError(f"need 0 < hop_length <= win_length <= n_fft, got {self.hop_length}, "
                             f"{self.win_length}, {self.n_fft}")

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1


@lru_cache(maxsize=8)
def mel_matrix(config: FeatureConfig) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` float64 filterbank: librosa's Slaney-normalised mel filters."""
    import librosa.filters  # slow to import (about 1 s); needed once per config

    return librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels, fmin=config.fmin,
                               fmax=config.fmax, dtype=np.float64)


@lru_cache(maxsize=8)
def window(config: FeatureConfig) -> np.ndarray:
    """Periodic Hann window of ``win_length`` samples (float64), as ``scipy.signal.get_window('hann', n)``."""
    n = np.arange(config.win_length)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / config.win_length)


def frames_of(audio: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """``(N // hop, win_length)`` analysis frames of ``N`` samples (left-padded with ``win - hop`` zeros)."""
    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio of shape (N,), got {audio.shape}")
    count = len(audio) // config.hop_length
    if count == 0:
        return np.zeros((0, config.win_length))
    padded = np.concatenate([np.zeros(config.win_length - config.hop_length), audio])
    view = np.lib.stride_tricks.sliding_window_view(padded, config.win_length)
    return view[: count * config.hop_length: config.hop_length]


@lru_cache(maxsize=8)
def _mel_bands(config: FeatureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The filterbank as its nonzero entries, band by band: FFT bins, weights, each band's first entry, and
    which bands have any. Mel bands are narrow, so this sum is ~10x less work than the dense product, and it
    needs no BLAS (whose threads stall badly on a busy machine; a multithreaded product of these small matrices
    measured 20x slower there than on one thread)."""
    matrix = mel_matrix(config)
    bins = [np.flatnonzero(row) for row in matrix]
    starts = np.cumsum([0] + [len(b) for b in bins[:-1]])
    nonempty = np.array([len(b) > 0 for b in bins])
    index = np.concatenate(bins)
    return index, matrix[np.repeat(np.arange(len(bins)), [len(b) for b in bins]), index], starts[nonempty], nonempty


def frame_features(frames: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Log-mel features ``(T, n_mels)`` float32 of analysis frames ``(T, win_length)``."""
    spectrum = np.fft.rfft(frames * window(config), n=config.n_fft, axis=-1)        # (T, n_fft/2 + 1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    index, weights, starts, nonempty = _mel_bands(config)
    mel = np.zeros((len(power), config.n_mels))
    if len(power):
        mel[:, nonempty] = np.add.reduceat(power[:, index] * weights, starts, axis=1)   # = power @ mel_matrix.T
    return np.log(mel + config.floor).astype(np.float32)                             # (T, n_mels)


def log_mel(audio: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Log-mel features ``(len(audio) // hop_length, n_mels)`` of mono audio at ``config.sample_rate``.

    >>> log_mel(np.zeros(8000, np.float32)).shape      # one second: 100 frames of 40 bands
    (100, 40)
    """
    return frame_features(frames_of(audio, config), config)


class FeatureStream:
    """Features of audio that arrives in pieces: ``push(samples)`` returns the frames completed by them.

    Equal to ``log_mel`` of the concatenated audio (to float32 rounding), with one frame per ``hop_length``
    samples as soon as they are in.

    >>> stream = FeatureStream()
    >>> stream.push(np.zeros(100, np.float32)).shape, stream.push(np.zeros(60, np.float32)).shape
    ((1, 40), (1, 40))
    """

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._buffer = np.zeros(self.config.win_length - self.config.hop_length)   # the padding, then audio

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, np.float64).reshape(-1)
        self._buffer = np.concatenate([self._buffer, samples])
        win, hop = self.config.win_length, self.config.hop_length
        count = max((len(self._buffer) - win) // hop + 1, 0)
        if count == 0:
            return np.zeros((0, self.config.n_mels), np.float32)
        view = np.lib.stride_tricks.sliding_window_view(self._buffer, win)[: count * hop: hop]
        out = frame_features(view, self.config)
        self._buffer = self._buffer[count * hop:]
        return out


class LogMel(nn.Module):
    """The same features in torch: ``forward(frames (..., win_length)) -> (..., n_mels)``, for export."""

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.tensor(window(config), dtype=torch.float32), persistent=False)
        self.register_buffer("mel", torch.tensor(mel_matrix(config).T, dtype=torch.float32), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(frames * self.window, n=self.config.n_fft)     # (..., n_fft/2 + 1)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        return torch.log(power @ self.mel + self.config.floor)                      # (..., n_mels)


# --- normalisation -----------------------------------------------------------------------------------------------
@dataclass
class Normalizer:
    """Per-band ``mean`` and ``std`` of training features; ``(x - mean) / std`` normalises."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, features: Sequence[np.ndarray], min_std: float = 1e-3) -> "Normalizer":
        """Statistics over every frame of ``features`` (a list of ``(T_i, n_mels)`` arrays), in float64.

        >>> norm = Normalizer.fit([np.array([[0.0, 1.0], [2.0, 1.0]])])
        >>> norm.mean, norm.std
        ([1.0, 1.0], [1.0, 0.001])
        """
        frames = np.concatenate([np.asarray(f, np.float64) for f in features])
        return cls(frames.mean(0).tolist(), np.maximum(frames.std(0), min_std).tolist())

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


# --- the on-disk cache -------------------------------------------------------------------------------------------
def cache_key(**settings: Any) -> str:
    """A short hash of JSON-able ``settings`` (dataclasses are turned into dicts) and ``FEATURES_VERSION``."""
    def plain(value):
        return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)

    text = json.dumps({"version": FEATURES_VERSION, **settings}, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class FeatureCache:
    """Arrays computed once and kept in ``directory`` as ``{key}.npz`` (written atomically).

    >>> import tempfile
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> key = cache_key(config=FeatureConfig(), what="example")
    >>> cache.get(key, lambda: {"x": np.arange(3)})["x"].tolist()
    [0, 1, 2]
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = None if directory is None else Path(directory)

    def get(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key``, or ``compute()``'s, stored first. No directory: always computed."""
        if self.directory is None:
            return compute()
        path = self.directory / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    return {name: stored[name] for name in stored.files}
            except (OSError, ValueError, EOFError) as error:
                log.warning("feature cache %s is unreadable (%s); computing it again", path, error)
        arrays = compute()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
        return arrays


def pack(features: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Variable-length ``(T_i, F)`` arrays as one ``(sum T_i, F)`` array and their lengths (for the cache)."""
    return {"features": np.concatenate(features).astype(np.float32),
            "lengths": np.array([len(f) for f in features], np.int64)}


def unpack(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Inverse of ``pack``."""
    ends = np.cumsum(arrays["lengths"])
    return np.split(arrays["features"], ends[:-1])
