"""Gradual magnitude pruning (Zhu & Gupta, 2017) to a target compression factor; method ``prune``.

Every LSTM matrix becomes ``MaskedSparse``; during the compression phase the smallest-magnitude weights are
masked out on the gradual schedule (``schedules.gradual_sparsity``) until each matrix stores at most
``1 / compression`` of its dense bytes, counted honestly as CSR: 4-byte values, 2-byte column indices
(4 when a row is longer than 65536) and 4-byte row pointers. So 20x is not 5% density but

    nnz = floor((out * in * 4 / 20 - (out + 1) * 4) / (4 + 2))   (2600x650: 54 599 entries, 3.23%)

Fine-tuning then trains the surviving weights with the mask fixed. ``GradualPruning`` (the schedule as a
callback) and the budget arithmetic are shared with the doping methods, whose sparse part is pruned alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn import LSTM
from ..nn.lstm import lstm_of
from ..nn.forms import Doped, MaskedSparse, WeightForm
from ..nn.forms.base import FLOAT_BYTES
from ..nn.forms.sparse import csr_nbytes
from ..train import Callback
from .base import Method, MethodConfig
from .schedules import gradual_sparsity, phase_steps


def byte_budget(form: WeightForm, compression: float) -> float:
    """Bytes a matrix may store to be ``compression`` times smaller than its dense float32 self."""
    if compression < 1.0:
        raise ValueError(f"compression must be at least 1, got {compression}")
    return form.out_features * form.in_features * FLOAT_BYTES / compression


def csr_entries_within(rows: int, cols: int, nbytes: float) -> int:
    """The most entries a ``rows x cols`` CSR matrix can hold in ``nbytes`` (exactly as ``csr_nbytes`` counts),
    capped at ``rows * cols``; -1 if even an empty one (its row pointers) does not fit.

    >>> csr_entries_within(2600, 650, 2600 * 650 * 4 / 20)
    54599
    """
    empty = csr_nbytes(rows, cols, 0)
    if nbytes < empty:
        return -1
    per_entry = csr_nbytes(rows, cols, 1) - empty
    return min(math.floor((nbytes - empty) / per_entry), rows * cols)


def sparse_part(form: WeightForm) -> MaskedSparse | None:
    """The masked-sparse matrix a pruning schedule acts on: the form itself, or a doped form's ``D``."""
    if isinstance(form, MaskedSparse):
        return form
    if isinstance(form, Doped):
        return form.sparse
    return None


def final_entries(name: str, form: WeightForm, compression: float) -> int:
    """Entries the sparse part of ``form`` may keep so that the whole form meets ``compression``."""
    sparse = sparse_part(form)
    fixed = form.nbytes() - sparse.nbytes()                 # a doped form's structured part
    entries = csr_entries_within(form.out_features, form.in_features, byte_budget(form, compression) - fixed)
    if entries < 0:
        raise ValueError(f"{name} ({form.out_features}x{form.in_features}) cannot reach {compression}x: its "
                         f"budget is {byte_budget(form, compression):.0f} bytes but the structured part "
                         f"({fixed} B) and the sparse part's row pointers "
                         f"({csr_nbytes(form.out_features, form.in_features, 0)} B) already exceed it; "
                         f"lower the compression or give the structure a smaller share")
    return entries


def weight_compression(lstm: LSTM) -> float:
    """Dense float32 bytes of the LSTM's weight matrices over the bytes their forms store (biases excluded)."""
    forms = [form for _, form in lstm.forms()]
    return sum(f.out_features * f.in_features * FLOAT_BYTES for f in forms) / sum(f.nbytes() for f in forms)


def phase_length(trainer) -> int:
    """Optimiser steps the trainer's phase will take in all."""
    per_epoch = trainer.task.num_train_batches()
    if trainer.config.max_batches is not None:
        per_epoch = min(per_epoch, trainer.config.max_batches)
    return trainer.config.epochs * per_epoch


class GradualPruning(Callback):
    """Prunes every sparse part (``sparse_part``) by magnitude on Zhu & Gupta's schedule after optimiser steps.

    Each matrix goes from ``initial_density`` at ``start`` (a fraction of the phase's steps) to the density of
    its compression budget at ``end``, in events ``every`` steps apart. Stateless: the targets follow from
    the model's forms and the trainer's step, so resuming needs nothing beyond the checkpointed masks.
    From a user's own loop: ``pruner.prune(model, step, total_steps)`` after ``optimizer.step()``.
    """

    def __init__(self, compression: float, initial_density: float = 1.0, start: float = 0.0,
                 end: float = 0.75, every: int = 1) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"the schedule needs 0 <= start <= end <= 1, got start={start}, end={end}")
        self.compression, self.initial_density = compression, initial_density
        self.start, self.end, self.every = start, end, every

    def on_train_begin(self, trainer) -> None:
        self.prune(trainer.model, trainer.step, phase_length(trainer))

    def after_step(self, trainer) -> None:
        self.prune(trainer.model, trainer.step, phase_length(trainer))

    def targets(self, model: nn.Module, step: int, total: int) -> dict[str, int]:
        """Entries each sparse part should keep after ``step`` of ``total``."""
        begin, end = phase_steps(self.start, total), phase_steps(self.end, total)
        out = {}
        for name, form in lstm_of(model).forms():
            sparse = sparse_part(form)
            if sparse is None:
                continue
            numel = sparse.mask.numel()
            final = 1.0 - final_entries(name, form, self.compression) / numel
            initial = min(1.0 - self.initial_density, final)
            sparsity = gradual_sparsity(step, final, initial, begin, end, self.every)
            out[name] = round((1.0 - sparsity) * numel)
        return out

    @torch.no_grad()
    def prune(self, model: nn.Module, step: int, total: int) -> None:
        """Mask each sparse part down to its scheduled entry count (never back up)."""
        forms = dict(lstm_of(model).forms())
        for name, keep in self.targets(model, step, total).items():
            sparse = sparse_part(forms[name])
            if keep < sparse.nnz():
                sparse.prune_to(keep / sparse.mask.numel())

    def prune_to_final(self, model: nn.Module) -> None:
        """Every sparse part at its final density (the schedule's value at the last step)."""
        self.prune(model, 1, 1)


@dataclass
class PruneConfig(MethodConfig):
    compression: float = 20.0     # target honest compression of the LSTM weight matrices (CSR bytes)
    initial_density: float = 1.0  # density when pruning starts (Zhu & Gupta's s_i = 1 - this)
    anneal_start: float = 0.0     # fraction of the compression phase's steps at which pruning starts
    anneal_end: float = 0.75      # fraction at which the final density is reached
    prune_every: int = 10         # optimiser steps between pruning events (Zhu & Gupta's dt)


class Prune(Method):
    """Gradual magnitude pruning of every LSTM matrix to ``compression``; fine-tuning keeps the masks."""

    name = "prune"
    Config = PruneConfig

    def __init__(self, config: PruneConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.pruner = GradualPruning(c.compression, c.initial_density, c.anneal_start, c.anneal_end,
                                     c.prune_every)

    def prepare(self, model: nn.Module) -> nn.Module:
        lstm_of(model).replace_forms("sparse", density=self.config.initial_density)
        for name, form in lstm_of(model).forms():
            final_entries(name, form, self.config.compression)   # fail now, not at the end of the phase
        return model

    def callbacks(self) -> list[Callback]:
        return [self.pruner]

    def finalize(self, model: nn.Module) -> nn.Module:
        self.pruner.prune_to_final(model)  # should the phase have stopped early
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return sparsity_summary(lstm_of(model), self.config.compression)


def sparsity_summary(lstm: LSTM, target: float) -> dict[str, Any]:
    """The honest weight compression, its target, and each sparse part's density."""
    densities = {name: sparse_part(form).density() for name, form in lstm.forms()
                 if sparse_part(form) is not None}
    return {"target_compression": target, "lstm_weight_compression": weight_compression(lstm),
            "sparse_density": densities}
