"""CTC decoding (greedy, prefix beam search, incremental greedy for streaming) and word/sentence error rates.

Symbols: index 0 is the CTC blank, ``d + 1`` the digit ``d``; a transcript is the digits as words, ``"3 1 4"``.
Decoders take per-frame scores ``(T, C)``: log-probabilities for the beam search, any monotone scores (logits
too) for the greedy decoders.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

BLANK = 0
NUM_SYMBOLS = 11   # blank + 10 digits


def digits_to_labels(digits: Sequence[int]) -> list[int]:
    return [int(d) + 1 for d in digits]


def labels_to_text(labels: Sequence[int]) -> str:
    """``[4, 2] -> "3 1"``: the transcript of CTC labels."""
    return " ".join(str(int(label) - 1) for label in labels)


def _array(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy()
    return np.asarray(scores)


def collapse(path: Sequence[int]) -> list[int]:
    """Merge repeated symbols, then drop blanks: ``[0, 3, 3, 0, 3, 2] -> [3, 3, 2]``."""
    out, previous = [], BLANK
    for symbol in path:
        symbol = int(symbol)
        if symbol != previous and symbol != BLANK:
            out.append(symbol)
        previous = symbol
    return out


def greedy_decode(scores, length: int | None = None) -> list[int]:
    """Labels of the best path of ``scores (T, C)`` (first ``length`` frames).

    >>> greedy_decode([[.1, .9, 0], [.1, .9, 0], [.8, .1, .1], [.1, .9, 0], [.1, 0, .9]])
    [1, 1, 2]
    """
    scores = _array(scores)
    return collapse(scores[:length].argmax(-1))


def greedy_decode_batch(scores, lengths: Sequence[int]) -> list[list[int]]:
    """``greedy_decode`` of every column of ``scores (T, B, C)``, each over its own length."""
    best = _array(scores).argmax(-1)                             # (T, B)
    return [collapse(best[: int(n), b]) for b, n in enumerate(lengths)]


def prefix_beam_search(log_probs, beam_width: int = 8, prune: float = -12.0) -> list[tuple[tuple[int, ...], float]]:
    """CTC prefix beam search over ``log_probs (T, C)``: ``[(labels, log-probability)]``, best first.

    Each hypothesis keeps the probability of its prefix ending in a blank and in a non-blank, so alignments that
    collapse to the same labels add up (Hannun et al. 2014, without a language model). Symbols more than
    ``-prune`` nats below a frame's best are skipped. With a beam that keeps every prefix and no pruning the
    scores are the exact labelling probabilities.

    >>> p = np.log([[0.6, 0.4], [0.6, 0.4]])     # greedy says "" (0.36); "a" has 0.16 + 0.24 + 0.24 = 0.64
    >>> [(labels, round(math.exp(score), 2)) for labels, score in prefix_beam_search(p)]
    [((1,), 0.64), ((), 0.36)]
    """
    log_probs = _array(log_probs).astype(np.float64)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}   # prefix: (p_blank, p_nonblank)
    for frame in log_probs:
        symbols = np.flatnonzero(frame >= frame.max() + prune)
        grown: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            total = np.logaddexp(p_b, p_nb)
            for s in symbols:
                p = frame[s]
                if s == BLANK:
                    _add(grown, prefix, 0, total + p)
                    continue
                extended = prefix + (int(s),)
                if prefix and prefix[-1] == s:     # a repeat needs a blank in between; otherwise it merges
                    _add(grown, extended, 1, p_b + p)
                    _add(grown, prefix, 1, p_nb + p)
                else:
                    _add(grown, extended, 1, total + p)
        ranked = sorted(grown.items(), key=lambda item: -np.logaddexp(*item[1]))
        beams = {prefix: (p[0], p[1]) for prefix, p in ranked[:beam_width] if max(p) > -math.inf}
    return [(prefix, float(np.logaddexp(p_b, p_nb))) for prefix, (p_b, p_nb) in beams.items()]


def _add(beams: dict, prefix: tuple[int, ...], which: int, value: float) -> None:
    entry = beams.setdefault(prefix, [-math.inf, -math.inf])
    entry[which] = np.logaddexp(entry[which], value)


def beam_decode(log_probs, beam_width: int = 8, length: int | None = None) -> list[int]:
    """Labels of the best hypothesis of ``prefix_beam_search`` over the first ``length`` frames."""
    return list(prefix_beam_search(_array(log_probs)[:length], beam_width)[0][0])


class GreedyStream:
    """Greedy decoding one frame at a time: ``step(scores (C,))`` returns the labels this frame completes.

    The concatenated outputs equal ``greedy_decode`` of all the frames.

    >>> stream = GreedyStream()
    >>> [stream.step(np.eye(3)[s]) for s in (1, 1, 0, 1, 2)], stream.labels
    ([[1], [], [], [1], [2]], [1, 1, 2])
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.labels: list[int] = []
        self._previous = BLANK

    def step(self, scores) -> list[int]:
        symbol = int(_array(scores).argmax())
        emitted = [symbol] if symbol != self._previous and symbol != BLANK else []
        self._previous = symbol
        self.labels += emitted
        return emitted


# --- error rates ---------------------------------------------------------------------------------------------------
def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Word error rate (jiwer: substitutions, deletions and insertions over reference words) and sentence
    error rate (share of transcripts not exactly right) of transcripts such as ``"3 1 4"``, with the counts behind
    the WER (``word_errors`` of ``words``): on a test set of a few thousand words, two models 0.05% apart differ by
    about two errors, which the counts make plain.

    >>> error_rates(["1 2 3", "4 5"], ["1 3", "4 5"])
    {'wer': 0.2, 'ser': 0.5, 'word_errors': 1, 'words': 5}
    """
    import jiwer  # imported here: only evaluation needs it

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no transcripts to score")
    if any(not ref.split() for ref in references):
        raise ValueError("every reference needs at least one word (WER divides by their count)")
    words = jiwer.process_words(list(references), list(hypotheses))
    errors = words.substitutions + words.deletions + words.insertions
    total = sum(len(ref.split()) for ref in references)
    ser = sum(ref.split() != hyp.split() for ref, hyp in zip(references, hypotheses)) / len(references)
    return {"wer": errors / total, "ser": float(ser), "word_errors": int(errors), "words": total}
