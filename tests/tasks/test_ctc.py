"""CTC decoding on hand-made posteriors (greedy, prefix beam search, streaming) and WER / SER against jiwer."""
from __future__ import annotations

import itertools
import math

import jiwer
import numpy as np
import pytest
import torch

from leanlstm.tasks import ctc


def one_hot_path(path, classes=4, sure=0.9):
    """Log-posteriors ``(T, C)`` that put ``sure`` on each symbol of ``path``."""
    probs = np.full((len(path), classes), (1 - sure) / (classes - 1))
    probs[np.arange(len(path)), path] = sure
    return np.log(probs)


def test_greedy_merges_repeats_and_drops_blanks():
    scores = one_hot_path([0, 3, 3, 0, 3, 2, 2, 0, 1])
    assert ctc.greedy_decode(scores) == [3, 3, 2, 1]
    assert ctc.greedy_decode(scores, length=5) == [3, 3]
    assert ctc.greedy_decode(torch.from_numpy(scores)) == [3, 3, 2, 1]
    batch = np.stack([one_hot_path([1, 1, 2, 0]), one_hot_path([0, 2, 0, 2])], axis=1)   # (T, B, C)
    assert ctc.greedy_decode_batch(batch, [4, 2]) == [[1, 2], [2]]


def test_beam_search_sums_alignments_where_greedy_picks_a_path():
    # best path: blank blank (0.36); but "a" has three alignments: 0.4*0.4 + 0.4*0.6 + 0.6*0.4 = 0.64
    log_probs = np.log([[0.6, 0.4], [0.6, 0.4]])
    assert ctc.greedy_decode(log_probs) == []
    assert ctc.beam_decode(log_probs) == [1]
    hypotheses = ctc.prefix_beam_search(log_probs)
    assert [labels for labels, _ in hypotheses] == [(1,), ()]
    assert [math.exp(score) for _, score in hypotheses] == pytest.approx([0.64, 0.36])


def brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """Probability of every labelling: the sum over all C^T paths that collapse to it."""
    totals: dict[tuple[int, ...], float] = {}
    probs = np.exp(log_probs)
    for path in itertools.product(range(probs.shape[1]), repeat=len(probs)):
        labels = tuple(ctc.collapse(path))
        totals[labels] = totals.get(labels, 0.0) + float(np.prod(probs[np.arange(len(path)), path]))
    return totals


def test_beam_search_without_pruning_is_exact():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 3)) * 2
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    exact = brute_force(log_probs)
    found = ctc.prefix_beam_search(log_probs, beam_width=10_000, prune=-math.inf)
    assert {labels: math.exp(score) for labels, score in found} == pytest.approx(exact)
    assert sum(exact.values()) == pytest.approx(1.0)
    best = max(exact, key=exact.get)
    assert tuple(ctc.beam_decode(log_probs, beam_width=4)) == best


def test_stream_decoder_equals_greedy():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((200, 11))
    scores[:, 0] += 1.5                                    # mostly blanks, as a trained model
    stream = ctc.GreedyStream()
    emitted = [label for frame in scores for label in stream.step(frame)]
    assert emitted == stream.labels == ctc.greedy_decode(scores)
    stream.reset()
    assert stream.labels == [] and stream.step(one_hot_path([2])[0]) == [2]


def test_transcripts():
    assert ctc.digits_to_labels([0, 9, 3]) == [1, 10, 4]
    assert ctc.labels_to_text([1, 10, 4]) == "0 9 3"
    assert ctc.labels_to_text([]) == ""


def test_error_rates_against_jiwer():
    references = ["1 2 3", "4 5 6 7", "8", "0 0"]
    hypotheses = ["1 3", "4 5 6 7 9", "8", ""]        # a deletion, an insertion, right, two deletions
    rates = ctc.error_rates(references, hypotheses)
    assert rates["wer"] == pytest.approx(4 / 10)
    assert rates["wer"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert rates["ser"] == pytest.approx(3 / 4)
    assert (rates["word_errors"], rates["words"]) == (4, 10)
    assert ctc.error_rates(["1 2"], ["1 2"]) == {"wer": 0.0, "ser": 0.0, "word_errors": 0, "words": 2}
    assert ctc.error_rates(["1 2"], ["3 4 5"])["wer"] == pytest.approx(1.5)   # insertions can pass 100%
    with pytest.raises(ValueError, match="at least one word"):
        ctc.error_rates([""], ["1"])
    with pytest.raises(ValueError, match="1 references but 2 hypotheses"):
        ctc.error_rates(["1"], ["1", "2"])
