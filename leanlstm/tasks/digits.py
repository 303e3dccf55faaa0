"""Connected spoken-digit recognition with CTC: the ``digits`` task, its model and its presets.

The model (``DigitsCTC``) reads raw log-mel frames ``(T, B, 40)`` (``tasks.features``: 25 ms window, 10 ms hop),
normalises them with per-band training statistics kept in its config, runs a unidirectional ``leanlstm.LSTM`` over
3 stacked frames a step (so it streams: features every 10 ms, an LSTM step every 30 ms; ``DigitsStream``) and a
linear layer over 11 symbols (CTC blank + 10 digits). The task (``DigitsTask``) builds connected-digit utterances
from FSDD (``tasks.fsdd`` states the splits, the held-out speaker, the silences and the augmentation), trains with
the CTC loss and scores with the word and sentence error rates of greedy decoding (``tasks.ctc``; prefix beam
search with ``beam_width``): lower is better.

* Training utterances are drawn afresh every epoch from ``(seed, epoch)`` (``train_batches(epoch)``), so an epoch
  is the same on every machine and in a resumed run.
* Evaluation sets are fixed (``fsdd.EVAL_SETS``): ``valid`` 500 and ``test`` 1,000 utterances of the five training
  speakers' validation and test takes, ``heldout`` 1,000 of the speaker never trained on, ``train`` 500 clean
  training utterances. Their features are cached on disk (``fsdd.cache_dir()/features``).
* Normalisation statistics come from 500 clean training utterances; the task writes them into a fresh model
  the first time it feeds it (``fit_normalisation``), and checkpoints keep them in the model's config.

>>> DigitsTask.preset("digits-small").model.hidden_sizes, DigitsTask.metric, DigitsTask.higher_is_better
([128, 128], 'wer', False)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LSTM
from ..nn.structured_dropout import check_dropout_config, check_structured, parse_dropout_mode, structured_forward
from ..train import Range, TrainConfig, model_device, to_device
from . import ctc, fsdd
from .base import DataConfig, Preset, Task, TaskError, register_task
from .features import FeatureCache, FeatureConfig, FeatureStream, Normalizer, cache_key, log_mel, pack, unpack

log = logging.getLogger(__name__)


# --- the model ---------------------------------------------------------------------------------------------------
@dataclass
class DigitsConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 128])  # per-layer LSTM sizes (unidirectional)
    stack: int = 3                                         # 10 ms feature frames per LSTM step (see DigitsCTC)
    skip_steps: int = 3                                    # first LSTM steps whose outputs mean nothing (below)
    cell: str = "lstm"                                     # recurrent cell of every layer (leanlstm.nn.CELLS)
    cell_options: dict[str, Any] = field(default_factory=dict)   # its options, e.g. {"gate_hidden": 64} (hlstm)
    dropout: float = 0.0                                   # between LSTM layers and before the head
    dropout_mode: str = "standard"                         # or structured dropout (nn.structured_dropout)
    dropout_steps_per_mask: int = 1                        # structured (hybrid: the head): steps sharing a mask
    num_classes: int = ctc.NUM_SYMBOLS                     # CTC blank + 10 digits
    features: FeatureConfig = field(default_factory=FeatureConfig)   # how audio becomes the model's input
    mean: list[float] | None = None                        # per-band input normalisation (None: not fitted yet)
    std: list[float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):                # from JSON (a checkpoint's config)
            self.features = FeatureConfig(**self.features)
        if self.stack < 1:
            raise ValueError(f"stack must be a positive number of frames, got {self.stack}")
        check_dropout_config(self.dropout_mode, self.dropout_steps_per_mask)
        if self.skip_steps < 0:
            raise ValueError(f"skip_steps must be 0 or more, got {self.skip_steps}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.features.n_mels:
                raise ValueError(f"{name} has {len(values)} values for {self.features.n_mels} mel bands")


class DigitsCTC(nn.Module):
    """``forward(inputs (S, B, stack * n_mels), state=None) -> (logits (S, B, 11), state)``.

    An input row holds ``stack`` consecutive raw log-mel frames of 10 ms side by side (``inputs(features)`` makes
    them from ``tasks.features.log_mel`` frames), so the LSTM steps once per ``stack`` frames: 3, one step per
    30 ms, the "lower frame rate" of Pundak & Sainath (2016). At one step per 10 ms frame CTC training stalled for
    over 1,000 steps on this task where stacking 3 frames converged in 500, each step 3x cheaper. The model
    normalises its inputs itself with ``config.mean`` / ``config.std`` (per band), so a checkpoint alone turns
    audio into digits (``transcribe``); the forward pass is per-channel constants, the LSTM and a linear head,
    which the leanlstm runtime and ONNX export run whole.

    >>> model = DigitsCTC(DigitsConfig(hidden_sizes=[16]))
    >>> inputs = model.inputs(torch.zeros(50, 2, 40))      # 50 frames of 10 ms: 16 steps of 3 (the rest waits)
    >>> logits, state = model(inputs)
    >>> inputs.shape, logits.shape
    (torch.Size([16, 2, 120]), torch.Size([16, 2, 11]))
    """

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        self.config = config
        n_mels = config.features.n_mels
        self.register_buffer("mean", torch.zeros(n_mels * config.stack))     # per band, repeated for each frame
        self.register_buffer("std", torch.ones(n_mels * config.stack))
        if config.mean is not None:
            self._set_buffers(config.mean, config.std)
        self.lstm = LSTM(n_mels * config.stack, config.hidden_sizes, dropout=config.dropout, cell=config.cell,
                         cell_options=config.cell_options)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.lstm.output_size, config.num_classes)
        check_structured(self.lstm, config.dropout_mode)

    def forward(self, inputs: torch.Tensor, state=None):
        x = (inputs - self.mean) / self.std
        if self.training and self.config.dropout > 0 and self.config.dropout_mode != "standard":
            return self._forward_structured(x, state)
        output, state = self.lstm(x, state)                                   # (S, B, H)
        return self.head(self.dropout(output)), state                         # (S, B, C)

    def _forward_structured(self, x: torch.Tensor, state):
        """Training forward with structured dropout at the model's sites: between layers (compacted in each
        ``W_ih`` product) and before the head (compacted in the head's); none before the first layer."""
        return structured_forward(self.lstm, self.head, x, state, self.config.dropout, self.config.dropout_mode,
                                  self.config.dropout_steps_per_mask, drop_input=False)

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Model inputs ``(T // stack, B, stack * F)`` of log-mel frames ``(T, B, F)``."""
        return stack_frames(features, self.config.stack)

    def steps(self, frames: torch.Tensor) -> torch.Tensor:
        """LSTM steps (logit rows) for inputs of ``frames`` feature frames."""
        return torch.div(frames, self.config.stack, rounding_mode="floor")

    def decodable(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit rows ``(S, ...)`` a decoder reads: all but the first ``config.skip_steps``, which training
        leaves out of the loss (``DigitsTask.forward``) and which are therefore untrained."""
        return logits[self.config.skip_steps:]

    @property
    def normalised(self) -> bool:
        return self.config.mean is not None

    def set_normalisation(self, norm: Normalizer) -> None:
        """Use ``norm``'s per-band statistics from now on; recorded in ``config`` so checkpoints keep them."""
        self.config = replace(self.config, mean=list(norm.mean), std=list(norm.std))
        self._set_buffers(norm.mean, norm.std)

    def _set_buffers(self, mean: Sequence[float], std: Sequence[float]) -> None:
        with torch.no_grad():
            self.mean.copy_(torch.tensor(mean).repeat(self.config.stack))
            self.std.copy_(torch.tensor(std).repeat(self.config.stack))

    def set_dropout(self, dropout: float) -> None:
        """Change the dropout rate everywhere it applies; recorded in ``config`` so checkpoints keep it."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config = replace(self.config, dropout=dropout)
        self.dropout.p = self.lstm.dropout = dropout

    def set_dropout_mode(self, mode: str) -> None:
        """A dropout mode (``DigitsConfig.dropout_mode``; ``MODE/N``: N steps per mask) from now on; kept in
        checkpoints."""
        mode, steps = parse_dropout_mode(mode)
        config = replace(self.config, dropout_mode=mode,
                         dropout_steps_per_mask=steps or self.config.dropout_steps_per_mask)
        check_structured(self.lstm, mode)
        self.config = config


def stack_frames(x, stack: int):
    """``(T, ..., F) -> (T // stack, ..., stack * F)`` (a tensor or an array): each row holds ``stack`` consecutive
    frames, oldest first; the last ``T % stack`` frames are left out.

    >>> stack_frames(torch.arange(6.).view(6, 1, 1), 3).flatten(1).tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    steps = x.shape[0] // stack
    x = x[: steps * stack].reshape(steps, stack, *x.shape[1:])              # (S, stack, ..., F)
    x = x.transpose(1, -2) if isinstance(x, torch.Tensor) else np.swapaxes(x, 1, -2)   # (S, ..., stack, F)
    return x.reshape(*x.shape[:-2], stack * x.shape[-1])


PAD_SECONDS = 0.25   # silence put around audio to transcribe: training utterances start and end with 0.1-0.3 s


def silence(seconds: float, rate: int = fsdd.SAMPLE_RATE) -> np.ndarray:
    """``seconds`` of the faint noise that fills the silences of training utterances (always the same samples)."""
    noise = np.random.default_rng(0).standard_normal(int(round(seconds * rate)), dtype=np.float32)
    return noise * np.float32(fsdd.SynthesisConfig().noise_floor)


def with_silence(audio: np.ndarray, before: float, after: float, rate: int = fsdd.SAMPLE_RATE) -> np.ndarray:
    """``audio`` between ``before`` and ``after`` seconds of silence.

    A model trained on utterances that start and end in silence reads a recording cut tight around its words (as
    FSDD's are) badly: it needs a little silence to settle before the first word, and it says a digit only once the
    digit is over, in the silence that follows (the last digit of a tight recording would never come out).
    """
    return np.concatenate([silence(before, rate), np.asarray(audio, np.float32), silence(after, rate)])


@torch.no_grad()
def transcribe(model: DigitsCTC, audio: np.ndarray, beam_width: int = 0, pad: float = PAD_SECONDS) -> list[int]:
    """The digits spoken in mono ``audio`` (at ``model.config.features.sample_rate``): greedy decoding, or prefix
    beam search with ``beam_width > 0``. The audio is framed by ``pad`` seconds of silence (``with_silence``).

    >>> digits = transcribe(DigitsCTC(DigitsConfig(hidden_sizes=[8])), np.zeros(8000, np.float32))  # 1 s of silence
    >>> all(0 <= digit <= 9 for digit in digits)      # an untrained model says anything
    True
    """
    audio = with_silence(audio, pad, pad, model.config.features.sample_rate)
    inputs = model.inputs(torch.from_numpy(log_mel(audio, model.config.features))[:, None])   # (S, 1, stack F)
    if len(inputs) == 0:
        return []
    was_training = model.training
    model.eval()
    log_probs = model.decodable(model(inputs)[0][:, 0]).log_softmax(-1)          # (S - skip, C)
    model.train(was_training)
    labels = ctc.beam_decode(log_probs, beam_width) if beam_width else ctc.greedy_decode(log_probs)
    return [label - 1 for label in labels]


class DigitsStream:
    """Audio in, digits out as soon as they are recognised: features for every 10 ms hop
    (``features.FeatureStream``), an LSTM step for every ``stack`` frames, the head, incremental greedy decoding
    (``ctc.GreedyStream``). ``push(samples)`` returns the digits the new audio completed; ``digits`` holds all;
    ``finish()`` ends the utterance with ``pad`` seconds of silence (the last digit comes out in it). A stream also
    starts with ``pad`` seconds of silence, as if it had been listening before the speech began.

    The model steps in the leanlstm runtime (``backend="leanlstm"``: ``runtime.compile(model).stream()``, any
    weight forms, in ``precision``) or in PyTorch (``"torch"``). In float32 either way the logits equal the model's
    on the whole utterance.

    >>> stream = DigitsStream(DigitsCTC(DigitsConfig(hidden_sizes=[8])), backend="torch", pad=0.0)
    >>> digits = stream.push(np.zeros(2400, np.float32))   # 0.3 s: 30 frames of 10 ms, an LSTM step every 3
    >>> stream.steps
    10
    """

    def __init__(self, model: DigitsCTC, backend: str = "leanlstm", pad: float = PAD_SECONDS,
                 precision: str = "float32") -> None:
        self.model, self.backend, self.stack, self.pad = model.eval(), backend, model.config.stack, pad
        if backend == "leanlstm":
            from .. import runtime   # numba compiles the kernels on first use

            self._engine = runtime.compile(model, precision=precision)     # float32, int8 or bfloat16 weights
            self._engine.stream().step(np.zeros(model.lstm.input_size, np.float32))   # compile now, not mid-stream
        elif backend != "torch":
            raise ValueError(f"unknown streaming backend {backend!r}; choose leanlstm or torch")
        self.reset()

    def reset(self) -> None:
        self.features = FeatureStream(self.model.config.features)
        self.decoder = ctc.GreedyStream()
        self._frames: list[np.ndarray] = []
        self._model = self._engine.stream() if self.backend == "leanlstm" else None
        self._state = None
        self.steps = 0
        self._pending: list[int] = []
        self._pending = self.push(silence(self.pad, self.model.config.features.sample_rate))   # out with the next push

    def finish(self) -> list[int]:
        """End of speech: ``pad`` seconds of silence; the digits they complete."""
        return self.push(silence(self.pad, self.model.config.features.sample_rate))

    @property
    def digits(self) -> list[int]:
        return [label - 1 for label in self.decoder.labels]

    def push(self, samples: np.ndarray) -> list[int]:
        """Feed more audio (mono, at the model's sample rate); the digits it completed, in order."""
        out, self._pending = self._pending, []
        for frame in self.features.push(samples):
            logits = self.frame_logits(frame)
            if logits is not None and self.steps > self.model.config.skip_steps:     # as DigitsCTC.decodable
                out += [label - 1 for label in self.decoder.step(logits)]
        return out

    def frame_logits(self, frame: np.ndarray) -> np.ndarray | None:
        """Feed one raw log-mel frame; the logits ``(C,)`` of the step it completes (every ``stack``-th), else None."""
        self._frames.append(frame)
        if len(self._frames) < self.stack:
            return None
        x = np.concatenate(self._frames).astype(np.float32)                 # (stack * F,): one model input
        self._frames.clear()
        self.steps += 1
        if self._model is not None:
            return self._model.step(x)
        with torch.no_grad():
            logits, self._state = self.model(torch.from_numpy(x)[None, None], self._state)
        return logits[0, 0].numpy()


# --- batches ---------------------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """Padded features ``(T, B, F)``, their lengths ``(B,)``, CTC targets (concatenated labels) and their lengths."""

    features: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor


def collate(features: Sequence[np.ndarray], digits: Sequence[Sequence[int]]) -> Batch:
    lengths = [len(f) for f in features]
    padded = np.zeros((max(lengths), len(features), features[0].shape[1]), np.float32)   # (T, B, F)
    for b, f in enumerate(features):
        padded[: len(f), b] = f
    labels = [ctc.digits_to_labels(d) for d in digits]
    return Batch(torch.from_numpy(padded), torch.tensor(lengths), torch.tensor([x for l in labels for x in l]),
                 torch.tensor([len(l) for l in labels]))


def ctc_loss(logits: torch.Tensor, steps: torch.Tensor, batch: Batch, skip: int = 0, reduction: str = "mean"
             ) -> torch.Tensor:
    """CTC loss of ``logits (S, B, C)`` over each column's first ``steps``, leaving out the first ``skip`` steps;
    ``mean``: per label, averaged over the batch (as PyTorch defines it)."""
    log_probs = logits[skip:].float().log_softmax(-1)
    return F.ctc_loss(log_probs, batch.targets, (steps - skip).clamp(min=0), batch.target_lengths, blank=ctc.BLANK,
                      reduction=reduction, zero_infinity=True)


# --- the task --------------------------------------------------------------------------------------------------------
@dataclass
class DigitsTrainConfig(TrainConfig):
    ranges: ClassVar[dict[str, Range]] = TrainConfig.ranges | {
        name: Range(1, 10**7, integer=True) for name in ("train_utterances", "chunk_batches", "norm_utterances",
                                                          "eval_batch_size")} | {"beam_width": Range(0, 1000, integer=True)}

    train_utterances: int = 4000      # utterances per epoch, drawn afresh each epoch from (seed, epoch)
    chunk_batches: int = 16           # batches synthesised together and sorted by length (less padding)
    augment: bool = True              # speed, gain and noise on training audio (ranges: fsdd.Augmentation)
    norm_utterances: int = 500        # clean training utterances the normalisation statistics come from
    eval_batch_size: int = 100
    beam_width: int = 0               # decoding in evaluation: 0 greedy, else prefix beam search of this width


# --- presets ---------------------------------------------------------------------------------------------------------
def _schedule(epochs: int, utterances: int, lr: float, decay_after: int, decay: float, batch_size: int = 32,
              **extra: Any) -> DigitsTrainConfig:
    return DigitsTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=decay, decay_after=decay_after,
                             clip=5.0, optimizer="adam", train_utterances=utterances, **extra)


# Adam, gradient norm clipped at 5, the lr constant for ``decay_after`` epochs, then multiplied by ``lr_decay`` each
# epoch. CTC first learns to say blank everywhere and sits on a plateau (about 2.8 per label) for a few hundred
# steps before the digits come in; small batches at a high lr get there soonest in wall time (2x128: batch 16 at
# 4e-3 left the plateau after ~300 steps, batch 32 at 2e-3 had not after 310).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(DigitsConfig(hidden_sizes=[32]), _schedule(2, 64, 3e-3, 1, 0.5, batch_size=16, norm_utterances=50),
                   "smoke run: 1x32, 2 epochs of 4 batches"),
    "digits-small": Preset(DigitsConfig(hidden_sizes=[128, 128]), _schedule(12, 2000, 4e-3, 8, 0.5, batch_size=16),
                           "2x128, 12 epochs of 2,000 utterances (about 5 minutes)"),
    "digits-medium": Preset(DigitsConfig(hidden_sizes=[256, 256], dropout=0.1), _schedule(24, 6000, 3e-3, 16, 0.7),
                            "2x256, dropout 0.1, 24 epochs of 6,000 utterances (30-60 minutes on 2 cores)"),
    # H-LSTM (Dai, Yin & Jha): every gate a network with a 128-wide hidden layer; for grow-and-prune (method gp),
    # which trains it from a sparse seed. 720k dense recurrent parameters against digits-medium's 913k.
    "digits-hlstm": Preset(DigitsConfig(hidden_sizes=[256, 256], dropout=0.1, cell="hlstm",
                                        cell_options={"gate_hidden": 128}), _schedule(16, 4000, 3e-3, 10, 0.7),
                           "H-LSTM 2x256, gate networks 128 wide, dropout 0.1, 16 epochs of 4,000 utterances"),
}


@register_task
class DigitsTask(Task):
    """Connected-digit recognition on FSDD; the metric is the word error rate (lower is better).

    ``evaluate(model, split)`` on ``train``, ``valid``, ``test`` (speaker-dependent) or ``heldout`` (the speaker
    never trained on) returns ``{"loss", "wer", "ser"}``; a finished run reports ``test_wer`` and ``heldout_wer``.
    """

    name = "digits"
    metric = "wer"
    metric_label = "word error rate"
    higher_is_better = False
    train_metric_name = "ctc"
    splits = ("train", "valid", "test", "heldout")
    test_splits = ("test", "heldout")
    presets = PRESETS
    default_preset = "digits-small"
    train_config_type = DigitsTrainConfig
    model_config_type = DigitsConfig

    def __init__(self, recordings: Sequence[fsdd.Recording], train: DigitsTrainConfig = DigitsTrainConfig(),
                 cache: FeatureCache | None = None, limit: int | None = None, rank: int = 0, world_size: int = 1
                 ) -> None:
        if train.batch_size % world_size:
            raise TaskError(f"batch size {train.batch_size} must be divisible by the {world_size} processes")
        self.train, self.limit = train, limit
        self.features = FeatureConfig()
        self.cache = cache or FeatureCache(None)
        self.rank, self.world_size = rank, world_size
        self.pools = {split: fsdd.split_pool(recordings, split) for split in fsdd.SPLITS}
        self._recordings = fsdd.recordings_digest((f"{r.digit}_{r.speaker}_{r.take}", r.audio.tobytes())
                                                  for r in recordings)
        self._eval: dict[str, tuple[list[np.ndarray], list[tuple[int, ...]]]] = {}
        log.info("digits: %s recordings to train on, %s to validate, %s to test, %s of held-out speaker %s",
                 *(len(self.pools[split]) for split in ("train", "valid", "test", "heldout")), fsdd.HELD_OUT)
        features, _ = self._utterances("norm", "train", train.norm_utterances, [train.seed, 0])   # epochs: 1, 2, ...
        self.norm = Normalizer.fit(features)

    # --- models (no data needed) -------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, config: DigitsConfig) -> DigitsCTC:
        return DigitsCTC(config)

    @classmethod
    def output_size(cls, model: nn.Module) -> int | None:
        return model.config.num_classes if isinstance(model, DigitsCTC) else None

    # --- data ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, data: DataConfig, train: TrainConfig, rank: int = 0, world_size: int = 1) -> "DigitsTask":
        """FSDD from ``data.directory``, unpacked (and features cached) under ``fsdd.cache_dir()``;
        ``data.limit`` caps every set's utterances (smoke runs)."""
        if not isinstance(train, DigitsTrainConfig):   # the shared schedule; the digits settings at their defaults
            train = DigitsTrainConfig(**{f.name: getattr(train, f.name) for f in fields(TrainConfig)})
        folder = fsdd.recordings_dir(data.directory, verify=data.verify)
        cache = FeatureCache(fsdd.cache_dir() / "features")
        return cls(fsdd.load_recordings(folder), train, cache, data.limit, rank, world_size)

    def _count(self, count: int) -> int:
        return count if self.limit is None else min(count, self.limit)

    def _utterances(self, what: str, pool: str, count: int, seed) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
        """Features and digits of ``count`` clean utterances of ``pool``, through the on-disk feature cache."""
        count = self._count(count)

        def compute() -> dict[str, np.ndarray]:
            utterances = fsdd.synthesize(self.pools[pool], count, seed)
            return pack([log_mel(u.audio, self.features) for u in utterances]) | {
                "digits": np.array([d for u in utterances for d in u.digits], np.int64),
                "digit_counts": np.array([len(u.digits) for u in utterances], np.int64)}

        key = cache_key(what=what, pool=pool, count=count, seed=seed, synthesis=fsdd.SynthesisConfig(),
                        synthesis_version=fsdd.SYNTHESIS_VERSION, features=self.features,
                        recordings=self._recordings)
        arrays = self.cache.get(key, compute)
        digits = np.split(arrays["digits"], np.cumsum(arrays["digit_counts"])[:-1])
        return unpack(arrays), [tuple(int(d) for d in ds) for ds in digits]

    def eval_set(self, split: str) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
        """Features and digits of the fixed evaluation set of ``split`` (see ``fsdd.EVAL_SETS``)."""
        if split not in fsdd.EVAL_SETS:
            raise TaskError(f"the digits task has no split {split!r}; choose one of {', '.join(self.splits)}")
        if split not in self._eval:
            count, seed = fsdd.EVAL_SETS[split]
            self._eval[split] = self._utterances("eval", split, count, seed)
        return self._eval[split]

    def num_train_batches(self) -> int:
        return max(self._count(self.train.train_utterances) // self.train.batch_size, 1)

    def train_batches(self, epoch: int = 1) -> Iterator[Batch]:
        """This process's share of epoch ``epoch``'s batches (1-based): utterances synthesised in chunks seeded by
        ``(seed, epoch, chunk)``, sorted by length within a chunk, the chunk's batches in a seeded random order."""
        per_chunk, size, total = self.train.chunk_batches, self.train.batch_size, self.num_train_batches()
        share = size // self.world_size
        augment = fsdd.Augmentation() if self.train.augment else None
        for start in range(0, total, per_chunk):
            count = min(per_chunk, total - start)
            seed = [self.train.seed, epoch, start]
            utterances = fsdd.synthesize(self.pools["train"], count * size, seed, augment=augment)
            utterances.sort(key=lambda u: len(u.audio))
            for b in np.random.default_rng(seed).permutation(count):
                chosen = utterances[b * size:(b + 1) * size][self.rank * share:(self.rank + 1) * share]
                yield collate([log_mel(u.audio, self.features) for u in chosen], [u.digits for u in chosen])

    def fit_normalisation(self, model: nn.Module) -> None:
        """Give a model that has no normalisation statistics yet this task's (a no-op for any other model)."""
        model = getattr(model, "module", model)          # under DistributedDataParallel
        if isinstance(model, DigitsCTC) and not model.normalised:
            model.set_normalisation(self.norm)

    def forward(self, model: nn.Module, batch: Batch, state=None, with_loss: bool = True):
        """``(logits (S, B, 11), mean CTC loss per label, None)``: utterances are independent.

        The loss leaves out the model's first ``skip_steps`` LSTM steps (90 ms at 30 ms a step; every utterance
        starts with at least 100 ms of silence). A unidirectional model can tell its first step from all others by
        the zero initial state alone, and early in training CTC parks every label there, where the audio says
        nothing about the digit: the loss sticks at log(10) per label. Without those steps it moves on. Their
        outputs are then untrained (a model may emit a digit there), so every decoder leaves them out as well
        (``DigitsCTC.decodable``).
        """
        self.fit_normalisation(model)
        inner = getattr(model, "module", model)            # under DistributedDataParallel
        logits, _ = model(inner.inputs(batch.features))
        if not with_loss:
            return logits, None, None
        steps = inner.steps(batch.lengths)
        return logits, ctc_loss(logits, steps, batch, inner.config.skip_steps), None

    # --- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """``{"loss": CTC loss per utterance, "wer", "ser"}`` on the fixed set of ``split``."""
        features, digits = self.eval_set(split)
        self.fit_normalisation(model)
        order = np.argsort([len(f) for f in features], kind="stable")   # similar lengths together: less padding
        was_training = model.training
        model.eval()
        hypotheses: dict[int, list[int]] = {}
        total = 0.0
        for start in range(0, len(order), self.train.eval_batch_size):
            index = order[start:start + self.train.eval_batch_size]
            batch = collate([features[i] for i in index], [digits[i] for i in index])
            batch = to_device(batch, model_device(model))
            logits, _ = model(model.inputs(batch.features))
            steps = model.steps(batch.lengths)
            skip = model.config.skip_steps
            total += float(ctc_loss(logits, steps, batch, skip, reduction="sum"))
            hypotheses |= dict(zip(index.tolist(), self.decode(model.decodable(logits), (steps - skip).clamp(min=0))))
        model.train(was_training)
        references = [" ".join(map(str, d)) for d in digits]
        transcripts = [ctc.labels_to_text(hypotheses[i]) for i in range(len(digits))]
        return {"loss": total / len(digits)} | ctc.error_rates(references, transcripts)

    def decode(self, logits: torch.Tensor, steps: torch.Tensor) -> list[list[int]]:
        """CTC labels of every column of ``logits (S, B, C)`` over its ``steps``: greedy, or prefix beam search
        with ``beam_width``."""
        if not self.train.beam_width:
            return ctc.greedy_decode_batch(logits, steps.tolist())
        log_probs = logits.float().log_softmax(-1)
        return [ctc.beam_decode(log_probs[:, b], self.train.beam_width, int(n)) for b, n in enumerate(steps)]
