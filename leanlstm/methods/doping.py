"""Structured matrices and doping (Thakker et al., MLSys 2021): ``leanlstm.Structured`` (methods ``kp``, ``lmf``,
``hmd``, ``circulant``) and ``leanlstm.Doped`` (``doped-kp``, ``doped-lmf``, ``doped-hmd``).

    leanlstm.compress_(model, leanlstm.Structured("lowrank", compression=20))      # every LSTM matrix U V
    leanlstm.compress_(model, leanlstm.Doped("kronecker", compression=20, total_steps=N))  # A kron B + sparse D

Plain structured methods convert every LSTM matrix (``weight_hr`` of a projected LSTM too; ``nn.Linear`` heads
stay dense) to one structure sized to the target compression and train it. Doped methods replace each matrix
``W`` by ``S + D`` (``forms.Doped``): ``S`` structured, ``D`` a sparse matrix that starts dense (``S + D = W``
exactly) and is magnitude-pruned on Zhu & Gupta's gradual schedule to about 1% density while co-matrix dropout
(CMR) keeps ``S`` from leaning on it; ``finalize()`` switches CMR off, and fine-tuning then trains ``S`` and the
final ``D`` with its mask fixed.

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

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..nn.forms import Doped as DopedForm
from ..nn.forms import WeightForm, form_class
from ..nn.forms.base import FLOAT_BYTES
from ..nn.forms.sparse import csr_nbytes
from ..train import ConfigError, Range
from .base import COMPRESSION, SHARE, STEPS, UNIT, Method, MethodConfig, Preset
from .pruning import (GradualPruning, as_forms, check_anneal, convert_forms, final_entries, schedule_length,
                      sparsity_summary, weight_compression)

if TYPE_CHECKING:
    from ..compress import Compression


# --- sizing a structure to a budget of stored values -------------------------------------------------------
def _lowrank(out: int, inp: int, values: float, config: "Structured") -> dict[str, Any]:
    rank = min(math.floor(values / (out + inp)), out, inp)
    return {"rank": _at_least_one(rank, "rank", out, inp, values)}


def _hybrid(out: int, inp: int, values: float, config: "Structured") -> dict[str, Any]:
    full_rows = min(max(math.floor(config.full_row_share * values / inp), 1), out - 1)
    rank = min(math.floor((values - full_rows * inp) / (out - full_rows + inp)), out - full_rows, inp)
    return {"full_rows": full_rows, "rank": _at_least_one(rank, "rank", out, inp, values)}


def _circulant(out: int, inp: int, values: float, config: "Structured") -> dict[str, Any]:
    stored = {b: math.ceil(out / b) * math.ceil(inp / b) * b for b in range(1, max(out, inp) + 1)}
    fitting = [b for b, n in stored.items() if n <= values]
    block = max(fitting, key=lambda b: (stored[b], b)) if fitting else 0
    return {"block_size": _at_least_one(block, "block_size", out, inp, values)}


def _splits(size: int, max_padding: float = 0.05) -> set[tuple[int, int]]:
    """Pairs ``(a, ceil(size / a))`` that cover ``size`` with at most ``max_padding`` padding."""
    return {(a, -(-size // a)) for a in range(1, size + 1) if a * -(-size // a) <= size * (1 + max_padding)}


def _kronecker(out: int, inp: int, values: float, config: "Structured") -> dict[str, Any]:
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


SIZERS: dict[str, Callable[[int, int, float, "Structured"], dict[str, Any]]] = {
    "kronecker": _kronecker, "lowrank": _lowrank, "hybrid": _hybrid, "circulant": _circulant}


# --- configurations --------------------------------------------------------------------------------------
@dataclass
class Structured(MethodConfig):
    """Every LSTM matrix as one structure, the largest that fits ``compression`` (honest bytes).

    >>> Structured("lowrank", compression=20).structure
    'lowrank'
    """

    structure: str = "kronecker"   # kronecker | lowrank | hybrid | circulant
    compression: float = 20.0      # target honest compression of the LSTM weight matrices (biases excluded)
    full_row_share: float = 0.5    # hybrid only: share of the structure's bytes spent on its dense rows
    speed_check: bool = True       # time each compressed matrix against dense on the engine and warn when slower
    keep_slow_dense: bool = False  # keep the matrices that would run slower than dense dense (not compressed)

    ranges = {"compression": COMPRESSION, "full_row_share": UNIT}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structure not in SIZERS:
            raise ConfigError("structure", self.structure, f"be one of {', '.join(SIZERS)}")


@dataclass
class Doped(Structured):
    """Every LSTM matrix as ``S + D``: ``S`` structured, ``D`` sparse, annealed under co-matrix dropout.

    >>> Doped("kronecker", compression=20, total_steps=1000).doping_share
    0.25
    """

    doping_share: float = 0.25     # share of the budget (after D's row pointers) left to D's entries
    initial_density: float = 1.0   # D's density after conversion (1: S + D is exactly the original matrix)
    anneal_start: float = 0.0      # fraction of the schedule's steps at which D's pruning starts
    anneal_end: float = 0.75       # fraction at which D reaches its final density
    prune_every: int = 10          # optimiser steps between pruning events
    cmr: float = 0.5               # co-matrix dropout probability before finalize() (0: off)
    cmr_mode: str = "row"          # row: each row of D dropped on its own; matrix: all of D at once
    total_steps: int = 0           # optimiser steps the schedule spans in a user loop (0: Trainer's phase length)

    ranges = Structured.ranges | {
        "doping_share": SHARE, "initial_density": Range(0, 1, low_open=True), "anneal_start": UNIT,
        "anneal_end": UNIT, "prune_every": Range(1, 10**9, integer=True), "cmr": Range(0, 1, high_open=True),
        "total_steps": STEPS}
    choices = {"cmr_mode": ("row", "matrix")}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_anneal(self)


StructuredConfig, DopingConfig = Structured, Doped  # the names before issue 20


def set_cmr(source, probability: float, mode: str = "row") -> None:
    """Co-matrix dropout of every doped matrix in ``source`` (a model or ``(name, form)`` pairs). The forms drop
    only in training mode, so evaluation always sees ``S + D``."""
    for _, form in as_forms(source):
        if isinstance(form, DopedForm):
            form.cmr, form.cmr_mode = probability, mode


# --- methods -----------------------------------------------------------------------------------------------
class FitsStructure(Method):
    """A method that turns every LSTM matrix into ``config.structure`` with the options ``structure_options``
    gives its shape (structured methods here, AntMan's groups)."""

    def structure_options(self, out: int, inp: int) -> dict[str, Any]:
        raise NotImplementedError

    def form_for(self, weight: torch.Tensor) -> WeightForm:
        """The structured form fitted to one dense matrix."""
        options = self.structure_options(*weight.shape)
        return form_class(self.config.structure).from_dense(weight, **options)

    def fits(self, form: WeightForm) -> bool:
        """Whether ``form`` already is what ``form_for`` would make of its matrix (kept as it is by convert)."""
        return (type(form) is form_class(self.config.structure)
                and form.options() == self.structure_options(form.out_features, form.in_features))

    def check(self, handle: "Compression") -> None:
        for _, form in handle.forms():
            self.structure_options(form.out_features, form.in_features)   # fails when nothing fits

    def planned_forms(self, handle: "Compression") -> list[tuple[str, WeightForm]]:
        """Each matrix as ``form_for`` fits it (the structure does not change while training)."""
        return [(name, copy.deepcopy(form) if self.fits(form) else
                 self.form_for(form.materialize().detach().cpu().float())) for name, form in handle.forms()]

    def convert(self, handle: "Compression") -> None:
        convert_forms(handle, lambda name, dense: self.form_for(dense), keep=self.fits)


class StructuredMethod(FitsStructure):
    """Every LSTM matrix becomes ``config.structure``, the largest that fits the compression; then training.

    Registered subclasses fix ``structure`` (``kp``, ``lmf``, ``hmd``, ``circulant``); the class itself takes
    any structure from its config.
    """

    Config = Structured
    has_finetune = False
    structure: ClassVar[str | None] = None  # set by registered subclasses; their config defaults to it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("structure"):
            base = cls.Config.base if isinstance(cls.Config, Preset) else cls.Config
            cls.Config = Preset(base, structure=cls.structure)

    def __init__(self, config: Structured | None = None) -> None:
        super().__init__(config)
        wanted = self.config.structure      # the config checked its ranges when it was made
        if self.structure is not None and wanted != self.structure:
            raise ValueError(f"method {self.name} uses structure {self.structure}, not {wanted}; pick the "
                             f"method of that structure instead")

    def structure_bytes(self, out: int, inp: int) -> float:
        """Bytes the structured part of an ``out x inp`` matrix may take: all of the budget."""
        return out * inp * FLOAT_BYTES / self.config.compression

    def structure_options(self, out: int, inp: int) -> dict[str, Any]:
        """Options of the largest structure within ``structure_bytes``."""
        values = self.structure_bytes(out, inp) / FLOAT_BYTES
        return SIZERS[self.config.structure](out, inp, values, self.config)

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        forms = handle.forms()
        structured = {name: (form.structured if isinstance(form, DopedForm) else form) for name, form in forms}
        return {"structure": self.config.structure, "target_compression": self.config.compression,
                "lstm_weight_compression": weight_compression(forms),
                "structure_options": {name: form.options() for name, form in structured.items()}}


class DopedMethod(StructuredMethod):
    """``W -> S + D`` with ``D`` annealed to its final density under CMR; fine-tuning keeps ``D``'s mask.

    Registered subclasses fix ``structure`` (``doped-kp``, ``doped-lmf``, ``doped-hmd``).
    """

    Config = Doped
    has_finetune = True

    def __init__(self, config: Doped | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.annealing = GradualPruning(c.compression, c.initial_density, c.anneal_start, c.anneal_end,
                                        c.prune_every)

    def structure_bytes(self, out: int, inp: int) -> float:
        """What is left of the budget after D's row pointers, less D's share for its entries."""
        spare = super().structure_bytes(out, inp) - csr_nbytes(out, inp, 0)
        if spare <= 0:
            raise ValueError(f"a {out}x{inp} matrix cannot reach {self.config.compression}x with a sparse part: "
                             f"its row pointers alone take {csr_nbytes(out, inp, 0)} bytes of the "
                             f"{super().structure_bytes(out, inp):.0f} budget; lower the compression")
        return spare * (1.0 - self.config.doping_share)

    def form_for(self, weight: torch.Tensor) -> WeightForm:
        options = self.structure_options(*weight.shape)
        return DopedForm.from_dense(weight, self.config.structure, options, density=self.config.initial_density,
                                    cmr=self.config.cmr, cmr_mode=self.config.cmr_mode)

    def fits(self, form: WeightForm) -> bool:
        options = self.structure_options(form.out_features, form.in_features)
        return isinstance(form, DopedForm) and form.options() == {"structure": self.config.structure,
                                                                  "structure_options": options}

    def check(self, handle: "Compression") -> None:
        for name, form in handle.forms():   # on empty forms of each shape: fail now, not at the end of the phase
            out, inp = form.out_features, form.in_features
            empty = DopedForm(out, inp, self.config.structure, self.structure_options(out, inp))
            final_entries(name, empty, self.config.compression)

    def planned_forms(self, handle: "Compression") -> list[tuple[str, WeightForm]]:
        """Each matrix as ``S + D`` with ``D`` magnitude-pruned at once to its final entry count."""
        planned = super().planned_forms(handle)
        for name, form in planned:
            sparse = form.sparse
            if sparse.nnz() > (keep := final_entries(name, form, self.config.compression)):
                sparse.prune_to(keep / sparse.mask.numel())
        return planned

    def start(self, handle: "Compression") -> None:
        # CMR while D is annealed; fine-tuning trains S and the final D together
        set_cmr(handle.forms(), 0.0 if handle.finalized else self.config.cmr, self.config.cmr_mode)

    def after_step(self, handle: "Compression") -> None:
        if not handle.finalized:
            self.annealing.prune(handle.forms(), handle.step, schedule_length(handle, "Doped"))

    def finish(self, handle: "Compression") -> None:
        self.annealing.prune_to_final(handle.forms())  # should the schedule have stopped early

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        return super().summarize(handle) | sparsity_summary(handle.forms(), self.config.compression)


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
