"""Word-level language modelling on any corpus: the ``text`` task.

The corpus is a folder holding one file per split: ``train.txt``, ``valid.txt`` and ``test.txt``, or names with
the split as a dot-separated part (``ptb.train.txt``, ``wiki.valid.tokens``), plain or ``.gz``. Give it with
``--data-dir``; without one the task reads ``text/`` under the data directory (``tasks.data.data_dir``).
Text is split on whitespace, every line ending in ``<eos>`` (as PTB).

The vocabulary comes from the training file: ``<unk>`` first, then the words from most to least frequent (ties in
alphabetical order). A model of ``vocab_size`` words (``LMConfig.vocab_size``, the cap) predicts over the first
``vocab_size`` entries; every rarer word, and every word of valid/test missing from the training file, is read as
``<unk>``. ``TextTask.fit_model_config`` lowers the cap to the corpus's own vocabulary size, so that a small
corpus gets a small model.

Model, presets, training and methods are PTB's (``tasks.ptb``, ``tasks.lm``): a ``WordLM`` trained with truncated
BPTT, perplexity as the metric.

>>> build_vocab(["b", "a", "b", "<eos>", "c", "b", "<eos>"])
['<unk>', 'b', '<eos>', 'a', 'c']
>>> cap_ids(torch.tensor([1, 4, 2, 3]), 3).tolist()
[1, 0, 2, 0]
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..train import TrainConfig
from .base import DataConfig, TaskError, register_task
from .data import DataError, data_dir, read_text
from .lm import LMConfig, evaluate_stream
from .ptb import EOS, PRESETS, SPLITS, UNK, Corpus, LanguageModelTask, LMTrainConfig, batchify, tokenize

log = logging.getLogger(__name__)
SUFFIXES = (".txt", ".tokens", "")              # file name endings tried after the split's name
UNK_ID = 0                                      # ``<unk>`` heads every text vocabulary


def find_split(directory: Path, split: str) -> Path:
    """The file of ``split`` in ``directory``: ``{split}.txt`` (or ``.tokens``, or no suffix), else the only file
    whose name has ``split`` as a dot-separated part; each also ``.gz``."""
    for suffix in SUFFIXES:
        for name in (f"{split}{suffix}", f"{split}{suffix}.gz"):
            if (directory / name).is_file():
                return directory / name
    matches = sorted(path for path in directory.glob(f"*.{split}.*") if path.is_file())
    matches = [path for path in matches if split in path.name.split(".")[:-1]]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DataError(f"{directory} has several {split} files ({', '.join(p.name for p in matches)}); keep one, "
                        f"or name it {split}.txt")
    raise DataError(f"no {split} file in {directory}: the text task reads train.txt, valid.txt and test.txt (or "
                    f"names such as corpus.{split}.txt); point --data-dir at the folder that holds them")


def corpus_dir(directory: str | Path | None) -> Path:
    """``directory`` itself when given; else ``text/`` under the data directory."""
    return Path(directory).expanduser() if directory is not None else data_dir() / "text"


def build_vocab(words: list[str]) -> list[str]:
    """``<unk>``, then ``words``' distinct words from most to least frequent, ties in alphabetical order."""
    counts = Counter(word for word in words if word != UNK)
    return [UNK] + sorted(counts, key=lambda word: (-counts[word], word))


def cap_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ids as a model of ``vocab_size`` words reads them: ids past its vocabulary become ``<unk>``."""
    return torch.where(ids < vocab_size, ids, torch.full_like(ids, UNK_ID))


def load_text(directory: str | Path | None = None, *, max_tokens: int | None = None) -> Corpus:
    """The corpus in ``directory`` (see ``corpus_dir``) with its full training vocabulary (see ``build_vocab``);
    ``max_tokens`` truncates every split, for smoke runs (the vocabulary still comes from the whole file)."""
    folder = corpus_dir(directory)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: point --data-dir at the folder holding train.txt, valid.txt "
                        f"and test.txt")
    words = {split: tokenize(read_text(find_split(folder, split))) for split in SPLITS}
    vocab = build_vocab(words["train"])
    index = {word: i for i, word in enumerate(vocab)}
    ids = {split: torch.tensor([index.get(w, UNK_ID) for w in words[split][:max_tokens]], dtype=torch.long)
           for split in SPLITS}
    return Corpus(vocab, ids["train"], ids["valid"], ids["test"])


@register_task
class TextTask(LanguageModelTask):
    """Truncated-BPTT language modelling on a corpus of your own; PTB's presets, methods and metric.

    >>> TextTask.preset("small").model.vocab_size    # the cap: fit_model_config lowers it to the corpus's
    10000
    """

    name = "text"
    presets = {name: PRESETS[name] for name in ("tiny", "small", "medium", "medium-cpu", "hlstm-medium-cpu")}
    default_preset = "small"

    def __init__(self, corpus: Corpus, batch_size: int = 20, bptt: int = 35, eval_batch_size: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(corpus, batch_size, bptt, eval_batch_size, rank, world_size)
        self._warned: set[int] = set()

    @classmethod
    def configure_model(cls, config: LMConfig, *, hidden_sizes: list[int] | None = None,
                        dropout: float | None = None, vocab_size: int | None = None,
                        dropout_mode: str | None = None) -> LMConfig:
        """As ``Task.configure_model``, and ``vocab_size``: the vocabulary cap (``<unk>`` included)."""
        config = super().configure_model(config, hidden_sizes=hidden_sizes, dropout=dropout,
                                          dropout_mode=dropout_mode)
        if vocab_size is not None:
            if vocab_size < 2:
                raise TaskError(f"the vocabulary needs at least 2 words (<unk> and one more), got {vocab_size}")
            config = replace(config, vocab_size=vocab_size)
        return config

    @classmethod
    def fit_model_config(cls, config: LMConfig, data: DataConfig) -> LMConfig:
        """``config`` with its vocabulary cap lowered to the size of the corpus's vocabulary, when that is smaller
        (a model never predicts words its corpus does not have)."""
        words = tokenize(read_text(find_split(corpus_dir(data.directory), "train")))
        size = len(build_vocab(words))
        return replace(config, vocab_size=size) if size < config.vocab_size else config

    @classmethod
    def load(cls, data: DataConfig, train: TrainConfig, rank: int = 0, world_size: int = 1) -> "TextTask":
        if not isinstance(train, LMTrainConfig):
            raise TaskError(f"the text task trains on BPTT windows: give it an LMTrainConfig (with bptt), not a "
                            f"{type(train).__name__}")
        corpus = load_text(data.directory, max_tokens=data.limit)
        log.info("text corpus: %d training tokens, vocabulary of %d words (%s and %s included)",
                 corpus.train.numel(), corpus.vocab_size, UNK, EOS)
        return cls(corpus, train.batch_size, train.bptt, rank=rank, world_size=world_size)

    def _vocab_size(self, model) -> int:
        """The model's vocabulary size (the cap), said once per size when it is larger than the corpus's."""
        size = self.output_size(model) or self.corpus.vocab_size
        if size > self.corpus.vocab_size and size not in self._warned:
            self._warned.add(size)
            log.warning("the model predicts over %d words, the corpus has %d: %d output rows are never a target "
                        "(fit the config with TextTask.fit_model_config, or set the vocabulary size to %d)",
                        size, self.corpus.vocab_size, size - self.corpus.vocab_size, self.corpus.vocab_size)
        return size

    def forward(self, model, batch, state, with_loss: bool = True):
        size = self._vocab_size(model)
        inputs, targets = (cap_ids(ids, size) for ids in batch)
        return super().forward(model, (inputs, targets), state, with_loss)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise TaskError(f"the text task has splits {', '.join(SPLITS)}, not {split!r}")
        tokens = cap_ids(getattr(self.corpus, split), self._vocab_size(model))
        loss = evaluate_stream(model, batchify(tokens, self.eval_batch_size), self.bptt)
        return {"loss": loss, "ppl": self.train_metric(loss)}
