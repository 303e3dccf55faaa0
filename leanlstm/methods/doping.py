"""Structured matrices and doping (Thakker et al., MLSys 2021): methods ``kp``, ``lmf``, ``hmd``, ``circulant``,
``doped-kp``, ``doped-lmf`` and ``doped-hmd``.

Plain structured methods convert every LSTM matrix to one structure sized to the target compression and
train it. Doped methods replace each matrix ``W`` by ``S + D`` (``forms.Doped``): ``S`` structured, ``D`` a
sparse matrix that starts dense (``S + D = W`` exactly) and is magnitude-pruned on Zhu & Gupta's gradual
schedule to about 1% density while co-matrix dropout (CMR) keeps ``S`` from leaning on it; fine-tuning
then trains ``S`` and the final ``D`` with its mask fixed.

Compression arithmetic, per ``out x in`` matrix, everything in honest bytes (float32 values, CSR indices):

    budget     B   = 4 * out * in / compression
    structure  B_S = B                                                     (plain methods)
               B_S = (1 - doping_share) * (B - 4 (out + 1))                (doped: after D's row pointers)
    S is the largest structure of its kind within B_S / 4 stored values V:
        lowrank     rank r = floor(V / (out + in))
        hybrid      full_rows f = floor(full_row_share * V / in),  r = floor((V - f in) / (out - f + in))
        circulant   the block size b with the most values ceil(out/b) ceil(in/b) b <= V
        kronecker   factor shapes (m1, n1), (m2, n2) (m1 m2 >= out, n1 n2 >= in, <= 5% padding each)
                    with the most values m1 n1 + m2 n2 <= V
    D keeps exactly the rest: nnz = floor((B - bytes(S) - 4 (out + 1)) / (4 + 2))   (as ``csr_nbytes`` counts)

A doped matrix thus lands on the target within one sparse entry (6 bytes); a plain one at or just above
it (the next size up would not fit). Example, 2600x650 at 20x, doping_share 0.25: B = 338 000 bytes,
B_S = 0.75 * (338 000 - 10 404) = 245 697; S = Kronecker ((653, 94), (4, 7)), 61 410 values = 245 640 bytes;
D keeps floor((338 000 - 245 640 - 10 404) / 6) = 13 659 entries (0.81% density, 99.19% sparse), and the
matrix stores 337 998 bytes: 20.0001x. Biases are not counted (``lstm_weight_compression`` in the
summary); ``compress_run``'s ``lstm_compression`` counts them and so comes out slightly lower.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn.forms import Doped, WeightForm, form_class
from ..nn.forms.base import FLOAT_BYTES
from ..nn.forms.sparse import csr_nbytes
from ..train import Callback
from .base import Method, MethodConfig
from ..nn.lstm import lstm_of
from .pruning import GradualPruning, final_entries, sparsity_summary, weight_compression


# --- sizing a structure to a budget of stored values -------------------------------------------------------
def _lowrank(out: int, inp: int, values: float, config: "StructuredConfig") -> dict[str, Any]:
    rank = min(math.floor(values / (out + inp)), out, inp)
    return {"rank": _at_least_one(rank, "rank", out, inp, values)}


def _hybrid(out: int, inp: int, values: float, config: "StructuredConfig") -> dict[str, Any]:
    full_rows = min(max(math.floor(config.full_row_share * values / inp), 1), out - 1)
    rank = min(math.floor((values - full_rows * inp) / (out - full_rows + inp)), out - full_rows, inp)
    return {"full_rows": full_rows, "rank": _at_least_one(rank, "rank", out, inp, values)}


def _circulant(out: int, inp: int, values: float, config: "StructuredConfig") -> dict[str, Any]:
    stored = {b: math.ceil(out / b) * math.ceil(inp / b) * b for b in range(1, max(out, inp) + 1)}
    fitting = [b for b, n in stored.items() if n <= values]
    block = max(fitting, key=lambda b: (stored[b], b)) if fitting else 0
    return {"block_size": _at_least_one(block, "block_size", out, inp, values)}


def _splits(size: int, max_padding: float = 0.05) -> set[tuple[int, int]]:
    """Pairs ``(a, ceil(size / a))`` that cover ``size`` with at most ``max_padding`` padding."""
    return {(a, -(-size // a)) for a in range(1, size + 1) if a * -(-size // a) <= size * (1 + max_padding)}


def _kronecker(out: int, inp: int, values: float, config: "StructuredConfig") -> dict[str, Any]:
    best = None
    for m1, m2 in _splits(out):
        for n1, n2 in _splits(inp):
            stored, padding = m1 * n1 + m2 * n2, m1 * m2 * n1 * n2
            if stored <= values and (best is None or (stored, -padding) > best[0]):
                best = ((stored, -padding), [[m1, n1], [m2, n2]])
    if best is None:
        raise ValueError(f"no Kronecker product of a {out}x{inp} matrix fits in {values:.0f} values; lower the "
                         f"compression")
    return {"factor_shapes": best[1]}


def _at_least_one(size: int, what: str, out: int, inp: int, values: float) -> int:
    if size < 1:
        raise ValueError(f"a {out}x{inp} matrix has room for only {values:.0f} structured values, too few for "
                         f"{what} 1; lower the compression (or the doping share)")
    return size


SIZERS: dict[str, Callable[[int, int, float, "StructuredConfig"], dict[str, Any]]] = {
    "kronecker": _kronecker, "lowrank": _lowrank, "hybrid": _hybrid, "circulant": _circulant}


# --- configurations --------------------------------------------------------------------------------------
@dataclass
class StructuredConfig(MethodConfig):
    structure: str = "kronecker"   # kronecker | lowrank | hybrid | circulant (fixed by the method's name)
    compression: float = 20.0      # target honest compression of the LSTM weight matrices (biases excluded)
    full_row_share: float = 0.5    # hybrid only: share of the structure's bytes spent on its dense rows


@dataclass
class DopingConfig(StructuredConfig):
    doping_share: float = 0.25     # share of the budget (after D's row pointers) left to D's entries
    initial_density: float = 1.0   # D's density after conversion (1: S + D is exactly the original matrix)
    anneal_start: float = 0.0      # fraction of the compression phase's steps at which D's pruning starts
    anneal_end: float = 0.75       # fraction at which D reaches its final density
    prune_every: int = 10          # optimiser steps between pruning events
    cmr: float = 0.5               # co-matrix dropout probability in the compression phase (0: off)
    cmr_mode: str = "row"          # row: each row of D dropped on its own; matrix: all of D at once


def _with_structure(config: type[StructuredConfig], structure: str) -> type[StructuredConfig]:
    """``config`` with another default ``structure`` (the config class of a registered method)."""
    name = f"{structure.capitalize()}{config.__name__}"
    derived = dataclasses.make_dataclass(name, [("structure", str, dataclasses.field(default=structure))],
                                         bases=(config,))
    derived.__module__ = __name__
    return derived


# --- callbacks ---------------------------------------------------------------------------------------------
class CoMatrixDropout(Callback):
    """CMR on every doped matrix for a training phase: sets the forms' drop probability when training begins.

    From a user's own loop: ``CoMatrixDropout(0.5).apply(model)`` before training, ``.apply(model, 0.0)`` after.
    The forms drop only in training mode, so evaluation always sees ``S + D``.
    """

    def __init__(self, probability: float, mode: str = "row") -> None:
        self.probability, self.mode = probability, mode

    def on_train_begin(self, trainer) -> None:
        self.apply(trainer.model)

    def apply(self, model: nn.Module, probability: float | None = None) -> None:
        for _, form in lstm_of(model).forms():
            if isinstance(form, Doped):
                form.cmr = self.probability if probability is None else probability
                form.cmr_mode = self.mode


# --- methods -----------------------------------------------------------------------------------------------
class StructuredMethod(Method):
    """Every LSTM matrix becomes ``config.structure``, the largest that fits the compression; then training.

    Registered subclasses fix ``structure`` (``kp``, ``lmf``, ``hmd``, ``circulant``); the class itself takes
    any structure from its config, e.g. ``StructuredMethod(StructuredConfig("circulant", 8.0)).prepare(model)``.
    """

    Config = StructuredConfig
    has_finetune = False
    structure: ClassVar[str | None] = None  # set by registered subclasses; their config defaults to it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("structure"):
            cls.Config = _with_structure(cls.Config, cls.structure)

    def __init__(self, config: StructuredConfig | None = None) -> None:
        super().__init__(config)
        wanted = self.config.structure
        if wanted not in SIZERS:
            raise ValueError(f"structure must be one of {', '.join(SIZERS)}, got {wanted!r}")
        if self.structure is not None and wanted != self.structure:
            raise ValueError(f"method {self.name} uses structure {self.structure}, not {wanted}; pick the "
                             f"method of that structure instead")
        if self.config.compression < 1.0:
            raise ValueError(f"compression must be at least 1, got {self.config.compression}")

    def structure_bytes(self, out: int, inp: int) -> float:
        """Bytes the structured part of an ``out x inp`` matrix may take: all of the budget."""
        return out * inp * FLOAT_BYTES / self.config.compression

    def structure_options(self, out: int, inp: int) -> dict[str, Any]:
        """Options of the largest structure within ``structure_bytes``."""
        values = self.structure_bytes(out, inp) / FLOAT_BYTES
        return SIZERS[self.config.structure](out, inp, values, self.config)

    def convert(self, weight: torch.Tensor) -> WeightForm:
        """The structured form fitted to one dense matrix."""
        options = self.structure_options(*weight.shape)
        return form_class(self.config.structure).from_dense(weight, **options)

    def prepare(self, model: nn.Module) -> nn.Module:
        lstm_of(model).replace_forms(self.convert)
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        lstm = lstm_of(model)
        structured = {name: (form.structured if isinstance(form, Doped) else form) for name, form in lstm.forms()}
        return {"structure": self.config.structure, "target_compression": self.config.compression,
                "lstm_weight_compression": weight_compression(lstm),
                "structure_options": {name: form.options() for name, form in structured.items()}}


class DopedMethod(StructuredMethod):
    """``W -> S + D`` with ``D`` annealed to its final density under CMR; fine-tuning keeps ``D``'s mask.

    Registered subclasses fix ``structure`` (``doped-kp``, ``doped-lmf``, ``doped-hmd``).
    """

    Config = DopingConfig
    has_finetune = True

    def __init__(self, config: DopingConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not 0.0 < c.doping_share < 1.0:
            raise ValueError(f"doping_share must lie in (0, 1), got {c.doping_share}")
        self.annealing = GradualPruning(c.compression, c.initial_density, c.anneal_start, c.anneal_end,
                                        c.prune_every)
        self.dropout = CoMatrixDropout(c.cmr, c.cmr_mode)

    def structure_bytes(self, out: int, inp: int) -> float:
        """What is left of the budget after D's row pointers, less D's share for its entries."""
        spare = super().structure_bytes(out, inp) - csr_nbytes(out, inp, 0)
        if spare <= 0:
            raise ValueError(f"a {out}x{inp} matrix cannot reach {self.config.compression}x with a sparse part: "
                             f"its row pointers alone take {csr_nbytes(out, inp, 0)} bytes of the "
                             f"{super().structure_bytes(out, inp):.0f} budget; lower the compression")
        return spare * (1.0 - self.config.doping_share)

    def convert(self, weight: torch.Tensor) -> WeightForm:
        options = self.structure_options(*weight.shape)
        return Doped.from_dense(weight, self.config.structure, options, density=self.config.initial_density,
                                cmr=self.config.cmr, cmr_mode=self.config.cmr_mode)

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        for name, form in lstm_of(model).forms():
            final_entries(name, form, self.config.compression)  # fail now, not at the end of the phase
        return model

    def callbacks(self) -> list[Callback]:
        return [self.annealing, self.dropout]

    def finalize(self, model: nn.Module) -> nn.Module:
        self.annealing.prune_to_final(model)  # should the phase have stopped early
        self.dropout.apply(model, 0.0)        # fine-tuning trains S and the final D together
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return super().summary(model) | sparsity_summary(lstm_of(model), self.config.compression)


# --- the registered names ----------------------------------------------------------------------------------
class KP(StructuredMethod):
    name, structure = "kp", "kronecker"


class LMF(StructuredMethod):
    name, structure = "lmf", "lowrank"


class HMD(StructuredMethod):
    name, structure = "hmd", "hybrid"


class Circulant(StructuredMethod):
    name, structure = "circulant", "circulant"


class DopedKP(DopedMethod):
    name, structure = "doped-kp", "kronecker"


class DopedLMF(DopedMethod):
    name, structure = "doped-lmf", "lowrank"


class DopedHMD(DopedMethod):
    name, structure = "doped-hmd", "hybrid"
