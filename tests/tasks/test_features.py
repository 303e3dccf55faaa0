"""Log-mel features: shapes, librosa's numbers, streaming = whole utterance, torch = numpy, normalisation, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leanlstm.tasks import features as F
from leanlstm.tasks import fsdd
from tests.tasks.test_fsdd import fsdd_cache, recordings_folder  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def audio(recordings_folder) -> np.ndarray:
    return fsdd.read_wav(recordings_folder / "7_jackson_32.wav")


def test_shapes_one_frame_per_hop():
    assert F.log_mel(np.zeros(8000, np.float32)).shape == (100, 40)      # 1 s: 100 frames of 40 bands
    assert F.log_mel(np.zeros(8079, np.float32)).shape == (100, 40)
    assert F.log_mel(np.zeros(79, np.float32)).shape == (0, 40)
    assert F.log_mel(np.zeros(80, np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="mono audio"):
        F.log_mel(np.zeros((80, 2)))
    with pytest.raises(ValueError, match="hop_length <= win_length"):
        F.FeatureConfig(hop_length=300)


def test_equal_to_librosa_melspectrogram(audio):
    import librosa

    config = F.FeatureConfig()
    # frame t covers samples [t*hop - (win - hop), t*hop + hop); librosa (center=False) frames n_fft samples from
    # t*hop with the window centred in them: shift by (n_fft - win) / 2 = 28 samples to cover the same ones
    lead = (config.n_fft - config.win_length) // 2
    padded = np.concatenate([np.zeros(lead + config.win_length - config.hop_length), audio, np.zeros(lead)])
    reference = librosa.feature.melspectrogram(y=padded.astype(np.float64), sr=8000, n_fft=256, hop_length=80,
                                               win_length=200, window="hann", center=False, power=2.0, n_mels=40)
    ours = F.log_mel(audio, config)
    assert ours.shape == reference.T.shape == (len(audio) // 80, 40)
    np.testing.assert_allclose(ours, np.log(reference.T + config.floor), atol=1e-5)


def test_stream_equals_whole_utterance(audio):
    whole = F.log_mel(audio)
    stream, rng, pieces, start = F.FeatureStream(), np.random.default_rng(0), [], 0
    while start < len(audio):
        size = int(rng.integers(1, 400))
        pieces.append(stream.push(audio[start:start + size]))
        start += size
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)
    stream.reset()
    hops = [stream.push(audio[i:i + 80]) for i in range(0, len(audio), 80)]
    assert all(len(h) == 1 for h in hops[:-1])                        # one frame as each 10 ms hop arrives
    np.testing.assert_allclose(np.concatenate(hops), whole, atol=1e-6)


def test_torch_module_equals_numpy(audio):
    frames = torch.tensor(F.frames_of(audio), dtype=torch.float32)    # (T, 200)
    np.testing.assert_allclose(F.LogMel()(frames).numpy(), F.log_mel(audio), atol=1e-4)


def test_normalizer_from_training_frames(audio):
    features = [F.log_mel(audio), F.log_mel(audio[::-1].copy())]
    norm = F.Normalizer.fit(features)
    frames = np.concatenate(features)
    np.testing.assert_allclose(norm.mean, frames.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, frames.std(0), rtol=1e-5)
    normalised = np.concatenate([norm(f) for f in features])
    np.testing.assert_allclose(normalised.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalised.std(0), 1.0, atol=1e-4)
    flat = F.Normalizer.fit([np.ones((5, 2))])
    assert flat.std == [1e-3, 1e-3]                                      # constant bands: no division by zero


def test_cache_computes_once_and_recovers_from_a_bad_file(tmp_path):
    cache, calls = F.FeatureCache(tmp_path), []

    def compute():
        calls.append(1)
        return F.pack([np.ones((3, 2), np.float32), np.zeros((1, 2), np.float32)])

    key = F.cache_key(config=F.FeatureConfig(), what="x")
    assert key != F.cache_key(config=F.FeatureConfig(n_mels=20), what="x")
    first, second = cache.get(key, compute), cache.get(key, compute)
    assert len(calls) == 1
    assert [a.shape for a in F.unpack(second)] == [(3, 2), (1, 2)]
    np.testing.assert_array_equal(first["features"], second["features"])
    (tmp_path / f"{key}.npz").write_bytes(b"garbage")
    cache.get(key, compute)
    assert len(calls) == 2 and len(F.unpack(cache.get(key, compute))) == 2
    assert F.FeatureCache(None).get(key, compute) and len(calls) == 3     # no folder: always computed
