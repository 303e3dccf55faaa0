"""Hardware-guided symbiotic training (Yin, Chen, Li, Che, Zhang & Jha, *Hardware-Guided Symbiotic Training for
Compact, Accurate, yet Execution-Efficient LSTM*, arXiv 1901.10997): compress every LSTM to a per-step latency
budget measured on the user's own machine and backend: ``leanlstm.Symbiotic``, method ``symbiotic``.

    handle = leanlstm.compress_(model, leanlstm.Symbiotic(latency_budget_us=40, backend="leanlstm", total_steps=N))
    ...  loss.backward(); optimizer.step(); handle.after_step()
    handle.finalize()                    # measures the result on the backend: within the budget, or loudly not
    handle.summary()["symbiotic_measured_us"]

``leanlstm compress --method symbiotic --set backend=onnxruntime --set latency_budget_us=40 ...`` does the same in a
run. ``speedup=5`` in place of the budget asks for stacks 5x faster than the dense ones on ``backend``, timed when
compression starts (``Design.dense_us``): a target that means the same on a slower or faster machine. What happens,
in order:

1. **Profile** (``check``, before anything changes): a per-layer latency table for the model's shapes on
   ``backend`` (``runtime.profile.LayerProfile``, cached in ``profile_dir`` per machine and backend version; a
   profile from elsewhere is re-measured, never reused): for every layer a few widths at and below its own, and
   at the widths it ends on, each matrix alone sparse at each of ``densities``.
2. **Widths, snapped to latency valleys.** Each layer starts at the fastest profiled width at or above what
   accuracy needs (``LatencyTable.fastest_at_or_above``): ``hidden_sizes`` if given (e.g. what an ISS run found),
   else the width it has. A larger width is taken only when it runs faster by more than ``tolerance``.
3. **Sparsity only where the hardware rewards it.** Each matrix may be sparse only at the profiled densities at
   which making it sparse runs its layer faster than dense on ``backend`` (``LayerTable.faster_densities``,
   sparse and dense timed in the same interleaved run, faster in the median and in the fastest sample); where
   dense is as fast, it stays dense and the log says so with the numbers. On backends that run every form as its
   dense matrix (``runtime.profile.FORMS_RUN_DENSE``: torch, ONNX Runtime) sparsity is not even profiled. Where
   sparse is faster, the matrix starts at the highest such density (smaller *and* faster: the symbiosis).
4. **Down to the budget.** When the latency model (``runtime.latency_model``) predicts more than ``budget x (1 -
   margin)``, every layer's need is scaled by one common factor, the largest that fits (bisected), each snapped
   to the fastest width of its ladder at or above it (``LatencyTable.snapped_sizes``: every smaller width on that
   ladder runs faster than every larger one), so no layer becomes a bottleneck. If even the smallest widths do not
   fit, matrices go to lower faster densities, the step saving the most latency per parameter first. Then the
   widths just above the chosen ones are profiled too and layers step back up while the budget allows, the one
   furthest below its need first. A budget below the fastest model the profile allows is refused, naming how
   fast that is.
   **4b. Compact enough** (``compression``, off by default): where the design still keeps more than the current
   recurrent parameters / ``compression``, matrices go to lower densities of ``densities`` (dense ones too), one
   step at a time, the step adding the least predicted latency per parameter removed, always within the budget
   and its margin; the paper's grow-and-prune prunes for compactness as well as speed (its CPU model is 30.5x
   smaller at 5.2x the speed), where steps 2-4 alone stop at the densities latency asks for. Refused, saying how
   far the densities reach, when no design gets there. ``sizing="hardware"`` only.
5. **Grow and prune** (``methods.growprune.GrowPruneLoop``, the ``gp`` method's training loop): layers whose width
   changed are rebuilt at ``convert`` keeping their largest-norm units (ISS's components: a unit's rows and the
   columns reading it), and the modules reading them lose the same columns; a layer whose valley lies above its
   width (up to ``max_growth`` above it) gains units, which nothing reads until training gives them weight; every
   sparse matrix starts from its largest weights at ``seed_density`` (never above its target), grows the dormant
   connections with the largest accumulated gradient, then is magnitude-pruned to its planned density, where pruning
   stops (the profile says what more sparsity would buy, and the budget is met). Dense matrices just train.
6. **Measure** (``finalize()``): the compressed stacks are timed on ``backend``; the summary reports the measured
   latency against the budget, and a result over budget is logged as a warning with the numbers.

``sizing="size"`` replaces steps 2-4 by the "smaller is better" baseline, for ablations (same profile, budget,
margin, grow-and-prune and final measurement): it assumes latency falls with size. Its estimate of a design
(``Planner.assumed``) is the latency model's for the layers dense at its widths, times the share of their weights
kept: sparsity is expected to save in proportion to the weights it removes, whatever the profile says. Widths are
what accuracy needs times one common factor, rounded up to an integer: never snapped to a valley, never stepped up
to a larger, faster width. Every matrix is sparse at one density of ``densities``, also where dense runs faster
and on backends that run sparse matrices dense (with ``sparsity=False``: every matrix dense). For each density the
largest factor the estimate fits within ``budget x (1 - margin)`` is bisected (assuming the estimate monotone, as
size is); of those designs the one keeping the most weights is taken, the densest on ties. The latency model's own
prediction of that design (``predicted_us``; the estimate is ``assumed_us``) may lie over the budget: the design
is kept and trained all the same, the log warns, and the final measurement reports it. Nothing is refused for
being too fast: with no factor fitting, the smallest widths at the lowest density are taken.

From the paper: latency hysteresis (a larger layer can run faster than a smaller one) measured on the target
hardware and guiding training; widths at latency valleys, "the fastest size at or above" rather than "smaller is
better"; sparsity only where it buys execution speed on that hardware (its introduction notes that extreme weight
sparsity buys little on GPUs); grow-and-prune training (NeST's gradient growth and magnitude pruning, as in
``methods.growprune``). The stored copies of the paper this was written from hold its abstract and introduction,
not its algorithm: the rest is chosen here. The table's key (cell, input, hidden, which matrix is sparse at which
density) and its measurement in interleaved runs; the additive stack model with its overhead term; widths decided
once, before training; the unit choice by ISS component norm; one common width factor, then greedy density steps and a
balanced climb back; compaction after the climb, by density alone (widths stay); the sweep (the current width, what
accuracy needs and the current width rounded up to multiples of 8-64 up to ``max_growth`` above them,
``profile_sizes`` widths spaced geometrically below, ``REFINE`` more where the widths end); growth (a layer grows
where a larger width is the faster one: its new units start with random rows read by zero columns, so the model
computes the same function until training uses them); the margin; the budget as the
LSTM stacks' latency (embeddings and heads are not counted: the method does not change them, as with ISS's
``target_latency_us``); and every default number.

Not done: changing widths while training. A model whose width changes is rebuilt in place (the same LSTM objects), so
build the optimiser after ``compress_``; an LSTM whose output nothing in the model reads (a bare LSTM) loses the
removed top-layer channels from its output, as with ISS. The handle's state holds the design, so a resumed run
continues with the same widths and densities even if a re-profile would now choose others.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ..graph import trace
from ..nn import LSTM, Dense
from ..nn.forms import MaskedSparse
from ..runtime.backends import get_backend
from ..runtime.latency import measure
from ..runtime.latency_model import LatencyModel, LayerSpec
from ..runtime.profile import (LatencyTable, LayerProfile, LayerSettings, layer_cell, layer_key, layer_model,
                               runs_forms_dense)
from ..train import MAX_LR, ConfigError, Range
from .base import STEPS, UNIT, MethodConfig, qualified
from .growprune import INITS, GrowPruneLoop, make_plan
from .iss import (find_readers, input_columns, input_width, layer_components, narrowed, output_channels,
                  shrunk_lstm, widened_lstm, widened_reader)
from .pruning import weight_compression

if TYPE_CHECKING:
    from ..compress import Compression

log = logging.getLogger(__name__)

ROUND_TO = (8, 16, 32, 64)      # what accuracy needs, rounded up to these: the vector widths where valleys sit
REFINE = 4                      # widths profiled between a layer's chosen width and the next larger one
SIZINGS = ("hardware", "size")  # how widths and densities are chosen: guided by the profile, or by size alone


@dataclass
class Symbiotic(MethodConfig):
    """Compress every LSTM to ``latency_budget_us`` per step on ``backend``, guided by a measured profile.

    >>> config = Symbiotic(latency_budget_us=40, backend="onnxruntime")
    >>> config.densities, Symbiotic.from_strings({"hidden_sizes": "43,93"}).hidden_sizes
    ([0.1, 0.2, 0.35, 0.5], [43, 93])
    """

    latency_budget_us: float = 0.0  # per-step latency (us, batch 1) the compressed LSTM stacks must meet; this or
                                    # speedup is required
    speedup: float = 0.0            # instead of a budget in us: the dense stacks' latency on backend, measured when
                                    # compression starts, over this (5.2: the paper's CPU figure); holds on any machine
    backend: str = "leanlstm"       # the inference backend the budget holds on (leanlstm.runtime.backends)
    hidden_sizes: list = field(default_factory=list)  # what accuracy needs per layer, every stack in order ([]: as now)
    min_hidden: int = 8             # the smallest width the budget may shrink a layer to (what it needs, if smaller)
    max_growth: float = 0.25        # a layer may grow this share above its width (or what it needs) where a larger
                                    # width runs faster: a valley above it (0: never grow)
    sparsity: bool = True           # sparse matrices where the profile says sparse runs faster than dense
    densities: list = field(default_factory=lambda: [0.1, 0.2, 0.35, 0.5])  # densities profiled for each matrix
    compression: float = 0.0        # also keep this many times fewer recurrent parameters than now (step 4b; 0: the
                                    # budget alone decides)
    tolerance: float = 0.02         # a larger width or a sparse form must be faster by this fraction to be chosen
    margin: float = 0.1             # plan for budget x (1 - margin): room for the final measurement's noise
    profile_dir: str = ""           # profile cache ("": $LEANLSTM_CACHE/profiles, else ~/.cache/leanlstm/profiles)
    profile_sizes: int = 8          # widths profiled at and below what each layer needs
    profile_repeats: int = 7        # timed sequences per profiled layer
    seq_len: int = 35               # steps per timed sequence (profile and final measurement)
    threads: int = 1                # threads every measurement pins
    measure_repeats: int = 15       # timed sequences of the final measurement
    seed_density: float = 0.2       # sparse matrices start from their largest weights at this density (<= target)
    grow_steps: int = 2             # growth steps (methods.growprune)
    grow_ratio: float = 0.5         # fraction of a matrix's dormant connections each growth step activates
    grow_every: int = 0             # optimiser steps per growth window (0: from the phase)
    grow_init: str = "gradient"     # grown weights: "gradient" (-lr * mean dL/dW over the window) or "zero"
    growth_lr: float = 0.0          # the lr of grow_init="gradient" (0: the Trainer phase's lr)
    prune_ratio: float = 0.2        # fraction of a matrix's active weights each pruning step removes
    prune_every: int = 0            # optimiser steps of retraining before each pruning step (0: from the phase)
    total_steps: int = 0            # optimiser steps of the phase in a user loop (needed only for the 0 = auto fields)
    speed_check: bool = False       # also time each sparse matrix alone on the leanlstm engine at finalize (the
                                    # handle's guard; warns only): the profile already decided, layer by layer
    sizing: str = "hardware"        # "hardware": steps 2-4 of the module doc; "size": the "smaller is better" baseline

    ranges = {"latency_budget_us": Range(0, 1e9, note="this or speedup: > 0"),
              "speedup": Range(0, 1e6, note="this or latency_budget_us: > 1"),
              "min_hidden": Range(1, 10**6, integer=True),
              "max_growth": Range(0, 10),
              "compression": Range(0, 1e6, note="0 (off) or at least 1"),
              "tolerance": Range(0, 1, high_open=True), "margin": Range(0, 1, high_open=True),
              "profile_sizes": Range(1, 1000, integer=True), "profile_repeats": Range(1, 10**5, integer=True),
              "seq_len": Range(1, 10**5, integer=True), "threads": Range(1, 1024, integer=True),
              "measure_repeats": Range(1, 10**5, integer=True), "seed_density": Range(0, 1, low_open=True),
              "grow_steps": Range(0, 10**6, integer=True), "grow_ratio": UNIT,
              "prune_ratio": Range(0, 1, low_open=True, high_open=True), "grow_every": STEPS, "prune_every": STEPS,
              "total_steps": STEPS, "growth_lr": Range(0, MAX_LR, note="0: the Trainer phase's lr")}
    choices = {"grow_init": INITS, "sizing": SIZINGS}

    def __post_init__(self) -> None:
        super().__post_init__()
        get_backend(self.backend)            # an unknown backend is refused now, naming the known ones
        if self.latency_budget_us > 0 and self.speedup > 0:
            raise ConfigError("speedup", self.speedup, "be 0 when latency_budget_us is given: give one of them")
        if 0 < self.speedup <= 1:
            raise ConfigError("speedup", self.speedup, "be above 1 (1 is the dense stacks' own speed)")
        if 0 < self.compression < 1:
            raise ConfigError("compression", self.compression, "be 0 (off) or at least 1 (fewer parameters)")
        if self.compression and self.sizing == "size":
            raise ConfigError("compression", self.compression, 'be 0 with sizing="size" (its one density, from '
                              "densities, sets its size)")
        for size in self.hidden_sizes:
            Range(1, 10**6, integer=True).check("every entry of hidden_sizes", size)
        self.densities = [float(d) for d in self.densities]
        for density in self.densities:
            Range(0, 1, low_open=True, high_open=True).check("every entry of densities", density)
        if self.sparsity and not self.densities:
            raise ConfigError("densities", self.densities, "list at least one density when sparsity is on")


# --- the design: widths and densities the profile and the budget choose --------------------------------------
@dataclass
class Level:
    """One layer of one stack (all its directions), as the planner sees it."""

    lstm: str                  # the stack's name in the model ("" for a bare LSTM)
    layer: int                 # its index in the stack
    cell: str                  # the LayerKey cell
    matrices: tuple[str, ...]
    directions: int
    stack_input: int           # the stack's input width (what layer 0 reads)
    proj: int                  # the projection size (fixed), or 0
    current: int               # the width it has
    need: int                  # what accuracy needs
    lowest: int                # the smallest width the budget may give it
    highest: int = 0           # the largest: what it needs or has, grown by max_growth


class Choice(NamedTuple):
    widths: tuple[int, ...]            # per level
    densities: tuple[float, ...]       # per (level, matrix) slot; 1.0: dense


@dataclass
class Design:
    """What the planner chose: widths per stack, a target density per sparse matrix, and the numbers behind it."""

    widths: dict[str, list[int]]
    densities: dict[str, float]        # qualified matrix name -> target density (sparse matrices only)
    entries: dict[str, int]            # ... -> its entries at the designed width (rows x columns)
    refused: dict[str, str]            # matrices kept dense because the profile says dense is faster: why
    predicted_us: float                # by the latency model (the profile), whatever the sizing
    fastest_us: float
    budget_us: float
    backend: str
    sizing: str = "hardware"
    assumed_us: float | None = None    # sizing "size": what its own estimate (``Planner.assumed``) expected
    dense_us: float | None = None      # config.speedup: the dense stacks as measured before compressing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Design":
        return cls(**values)


def sweep_sizes(lowest: int, need: int, current: int, count: int, highest: int | None = None) -> list[int]:
    """Widths to profile for one layer: its current width; what accuracy needs and its current width, each also
    rounded up to multiples of 8, 16, 32 and 64 (where valleys sit), up to ``highest`` (default: the current
    width; above it the layer would grow); ``count`` widths from ``need`` down to ``lowest``, spaced geometrically
    (multiples of 8 from 32 up).

    >>> sweep_sizes(8, 100, 128, 4), sweep_sizes(8, 100, 100, 1, highest=125)
    ([8, 19, 40, 100, 104, 112, 128], [8, 100, 104, 112])
    """
    highest = current if highest is None else highest
    above = {need, current} | {-(-base // m) * m for m in ROUND_TO for base in (need, current + 1)}
    sizes = {s for s in above if need <= s <= max(highest, current)} | {lowest}
    if count > 1 and lowest < need:
        ratio = (lowest / need) ** (1 / (count - 1))
        for k in range(1, count):
            width = need * ratio ** k
            width = round(width / 8) * 8 if width >= 32 else round(width)
            sizes.add(min(max(width, lowest), need))
    return sorted(sizes)


@functools.lru_cache(maxsize=None)
def matrix_entries(cell: str, input_size: int, hidden_size: int) -> dict[str, int]:
    """Entries of each matrix of one layer of this shape (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        layer = layer_model(layer_key(cell, input_size, hidden_size)).layers[0]
    return {matrix: form.out_features * form.in_features for matrix, form in layer.forms()}


class Planner:
    """Chooses widths and densities for ``levels`` from a latency model (which measures what it lacks)."""

    def __init__(self, levels: list[Level], model: LatencyModel, config: Symbiotic) -> None:
        self.levels, self.model, self.config = levels, model, config
        self.slots = [(i, matrix) for i, level in enumerate(levels) for matrix in level.matrices]
        self.reference: list[int] = []     # per level: the input width its widths were swept at
        self.top: list[int] = []           # per level: its snapped width, the most the budget lets it keep
        self._predicted: dict[Choice, float] = {}

    # --- shapes, latency, parameters ----------------------------------------------------------------------
    def input_size(self, i: int, widths: tuple[int, ...]) -> int:
        level = self.levels[i]
        if level.layer == 0:
            return level.stack_input
        before = self.levels[i - 1]
        return before.directions * (before.proj or widths[i - 1])

    def predict(self, choice: Choice) -> float:
        if choice not in self._predicted:
            stacks: dict[str, list[LayerSpec]] = {}
            for i, level in enumerate(self.levels):
                sparse = tuple((m, d) for (j, m), d in zip(self.slots, choice.densities) if j == i and d < 1.0)
                spec = LayerSpec(level.cell, self.input_size(i, choice.widths), choice.widths[i], sparse)
                stacks.setdefault(level.lstm, []).extend([spec] * level.directions)
            self._predicted[choice] = sum(self.model.stack_us(specs) for specs in stacks.values())
        return self._predicted[choice]

    def params(self, choice: Choice) -> float:
        total = 0.0
        for (i, matrix), density in zip(self.slots, choice.densities):
            level = self.levels[i]
            entries = matrix_entries(level.cell, self.input_size(i, choice.widths), choice.widths[i])[matrix]
            total += level.directions * entries * density
        return total

    def options(self, i: int, matrix: str, widths: tuple[int, ...]) -> list[float]:
        """Densities at which ``matrix`` of level ``i`` runs faster sparse (highest first); [] where dense is."""
        if not self.config.sparsity or runs_forms_dense(self.config.backend):
            return []
        level, inputs = self.levels[i], self.input_size(i, widths)
        keys = [layer_key(level.cell, inputs, widths[i])] + [
            layer_key(level.cell, inputs, widths[i], matrix, d) for d in self.config.densities]
        return self.model.table(keys).faster_densities(level.cell, inputs, widths[i], matrix, self.config.tolerance)

    def sweep(self, i: int, sizes: list[int] = ()) -> LatencyTable:
        """Level ``i``'s widths profiled at its reference input (``sizes`` measured first if new), within its range."""
        level, inputs = self.levels[i], self.reference[i]
        table = self.model.table([layer_key(level.cell, inputs, s) for s in sizes])
        rows = table.sweep(level.cell, inputs).rows
        return LatencyTable({s: row for s, row in rows.items() if level.lowest <= s <= level.highest})

    def ladder(self, i: int) -> list[int]:
        """The widths level ``i`` may take, smallest first: every profiled width snapped up, up to its top."""
        return [s for s in self.sweep(i).snapped_sizes(self.config.tolerance) if s <= self.top[i]]

    # --- step 2 and 3: snapped widths, the first densities -----------------------------------------------------
    def start(self) -> Choice:
        widths: list[int] = []
        for i, level in enumerate(self.levels):
            self.reference.append(self.input_size(i, tuple(widths)))
            sweep = self.sweep(i, sweep_sizes(level.lowest, level.need, level.current, self.config.profile_sizes,
                                              level.highest))
            width = sweep.fastest_at_or_above(level.need, self.config.tolerance)
            self.top.append(width)
            widths.append(width)
            if width != level.need:
                log.info("symbiotic: %s layer %d: %d units run %.2f us, %d (what it needs) %.2f us on %s: %d it is",
                         level.lstm or "LSTM", level.layer, width, sweep.latency(width), level.need,
                         sweep.latency(level.need), self.config.backend, width)
        return self.refit(Choice(tuple(widths), (1.0,) * len(self.slots)), range(len(self.levels)))

    def refit(self, choice: Choice, levels: Iterable[int]) -> Choice:
        """Densities of ``levels``' matrices valid at their (new) shapes: kept where still faster, else the highest
        faster density, else dense."""
        levels = set(levels)
        densities = list(choice.densities)
        for index, (i, matrix) in enumerate(self.slots):
            if i in levels:
                options = self.options(i, matrix, choice.widths)
                if densities[index] not in options:
                    densities[index] = options[0] if options else 1.0
        return choice._replace(densities=tuple(densities))

    def resized(self, choice: Choice, i: int, width: int) -> Choice:
        """``choice`` with level ``i`` at ``width``, its matrices and the next layer's (its input) refitted."""
        widths = choice.widths[:i] + (width,) + choice.widths[i + 1:]
        follows = [i + 1] if i + 1 < len(self.levels) and self.levels[i + 1].layer > 0 else []
        return self.refit(choice._replace(widths=widths), [i] + follows)

    def with_density(self, choice: Choice, index: int, density: float) -> Choice:
        densities = list(choice.densities)
        densities[index] = density
        return choice._replace(densities=tuple(densities))

    # --- step 4: down to the budget, then back up as far as it allows -------------------------------------------
    def wanted(self, i: int, factor: float) -> int:
        """Level ``i``'s width at ``factor`` x what it needs, rounded up, not below its lowest."""
        return max(self.levels[i].lowest, math.ceil(factor * self.levels[i].need - 1e-9))

    def scaled(self, factor: float) -> Choice:
        """Every layer at the fastest width of its ladder at or above ``factor`` x what it needs (the smallest such
        ladder width: each runs faster than every larger one), every matrix refitted."""
        widths = []
        for i in range(len(self.levels)):
            ladder = self.ladder(i)
            widths.append(next((s for s in ladder if s >= self.wanted(i, factor)), ladder[-1]))
        return self.refit(Choice(tuple(widths), (1.0,) * len(self.slots)), range(len(self.levels)))

    def lowest_factor(self) -> float:
        """The smallest share of what it needs any layer may keep."""
        return min(level.lowest / level.need for level in self.levels)

    def scale(self, target: float, steps: int = 10, build: Any = None, cost: Any = None) -> Choice:
        """The largest common factor of what the layers need whose snapped widths fit ``target`` (bisected on a
        log scale): every layer gives up the same share, none becomes a bottleneck. If even the smallest widths do
        not fit, those. ``build(factor)`` and ``cost(choice)`` replace ``scaled`` and ``predict`` if given."""
        build, cost = build or self.scaled, cost or self.predict
        low, high = self.lowest_factor(), 1.0
        best = build(low)
        if cost(best) > target:
            return best
        for _ in range(steps):
            middle = math.sqrt(low * high)
            choice = build(middle)
            if cost(choice) <= target:
                low, best = middle, choice
            else:
                high = middle
        return best

    # --- sizing "size": the "smaller is better" baseline ----------------------------------------------------------
    def sized(self, factor: float, density: float = 1.0) -> Choice:
        """Every layer at ``factor`` x what it needs, rounded up (no snapping), every matrix at ``density``."""
        return Choice(tuple(self.wanted(i, factor) for i in range(len(self.levels))), (density,) * len(self.slots))

    def assumed(self, choice: Choice) -> float:
        """Latency as "smaller is better" sees it: the model's latency of the layers dense at these widths, times
        the share of their weights ``choice`` keeps (sparsity assumed to save in proportion to size)."""
        dense = choice._replace(densities=(1.0,) * len(self.slots))
        return self.predict(dense) * self.params(choice) / self.params(dense)

    def downs(self, choice: Choice) -> Iterator[Choice]:
        """Every single step down: a layer to its next smaller ladder width, a matrix to its next lower density."""
        for i in range(len(self.levels)):
            smaller = [s for s in self.ladder(i) if s < choice.widths[i]]
            if smaller:
                yield self.resized(choice, i, smaller[-1])
        for index, (i, matrix) in enumerate(self.slots):
            lower = [d for d in self.options(i, matrix, choice.widths) if d < choice.densities[index]]
            if lower:
                yield self.with_density(choice, index, lower[0])

    def ups(self, choice: Choice) -> Iterator[tuple[tuple[float, float], Choice]]:
        """Every single step up with its priority: a layer to its next larger ladder width (up to its top), the
        layer furthest below what it needs first; then a sparse matrix to its next higher faster density (sparse
        stays sparse where it is faster), the one giving back the most parameters first."""
        for i, level in enumerate(self.levels):
            larger = [s for s in self.ladder(i) if s > choice.widths[i]]
            if larger:
                yield (0, choice.widths[i] / level.need), self.resized(choice, i, larger[0])
        for index, (i, matrix) in enumerate(self.slots):
            higher = [d for d in self.options(i, matrix, choice.widths) if d > choice.densities[index]]
            if higher and choice.densities[index] < 1.0:
                move = self.with_density(choice, index, higher[-1])
                yield (1, -self.params(move)), move

    def descend(self, choice: Choice, target: float) -> Choice:
        """Greedy: while over ``target``, take the step down that saves the most latency per parameter removed."""
        while self.predict(choice) > target:
            best, best_score = None, 0.0
            for move in self.downs(choice):
                gain = self.predict(choice) - self.predict(move)
                score = gain / max(self.params(choice) - self.params(move), 1.0)
                if gain > 0 and score > best_score:
                    best, best_score = move, score
            if best is None:
                break
            choice = best
        return choice

    def refine(self, choice: Choice) -> None:
        """Profile ``REFINE`` more widths between each layer's width and the next larger on its ladder: the
        sweep is coarse, and the last step down may have gone further than the budget needs."""
        for i, width in enumerate(choice.widths):
            larger = [s for s in self.ladder(i) if s > width]
            if larger:
                self.sweep(i, between(width, larger[0], REFINE))

    def ascend(self, choice: Choice, target: float) -> Choice:
        """While some step up still fits ``target``, take the first by priority (``ups``). Ends: widths only
        grow, and between width steps densities only rise."""
        while True:
            fitting = [(priority, move) for priority, move in self.ups(choice) if self.predict(move) <= target]
            if not fitting:
                return choice
            choice = min(fitting, key=lambda pair: pair[0])[1]

    # --- step 4b: compact enough ------------------------------------------------------------------------------
    def dense_params(self) -> float:
        """The stacks' recurrent parameters as they are now, every matrix dense (what ``compression`` divides)."""
        return self.params(Choice(tuple(level.current for level in self.levels), (1.0,) * len(self.slots)))

    def compact(self, choice: Choice, params: float, target: float) -> Choice | None:
        """Lower densities until ``choice`` keeps at most ``params`` parameters, staying within ``target`` us: at
        each step one matrix goes to its next lower density of ``densities`` (a dense one to the highest), the
        step adding the least predicted latency per parameter it removes (steps that add none first, the largest
        of those first). None when no step is left within ``target``."""
        ladder = sorted(self.config.densities, reverse=True)
        while (kept := self.params(choice)) > params:
            best, best_key, now = None, None, self.predict(choice)
            for index in range(len(self.slots)):
                lower = [d for d in ladder if d < choice.densities[index]]
                if not lower:
                    continue
                move = self.with_density(choice, index, lower[0])
                latency = self.predict(move)
                if latency > target:
                    continue
                removed = kept - self.params(move)
                key = (max(latency - now, 0.0) / removed, -removed)
                if best_key is None or key < best_key:
                    best, best_key = move, key
            if best is None:
                return None
            choice = best
        return choice

    def fastest(self) -> Choice:
        """Every layer at the smallest width of its ladder, every matrix at its fastest faster density."""
        choice = Choice(tuple(self.ladder(i)[0] for i in range(len(self.levels))), (1.0,) * len(self.slots))
        densities = []
        for i, matrix in self.slots:
            level, inputs = self.levels[i], self.input_size(i, choice.widths)
            options = self.options(i, matrix, choice.widths)
            table = self.model.table([])
            densities.append(min(options, default=1.0, key=lambda d: table.latency(
                layer_key(level.cell, inputs, choice.widths[i], matrix, d))))
        return choice._replace(densities=tuple(densities))


def between(low: int, high: int, count: int) -> list[int]:
    """Up to ``count`` widths strictly between ``low`` and ``high``, evenly spread; multiples of 8 where any lie
    between (the vector widths).

    >>> between(64, 96, 4), between(10, 13, 4)
    ([72, 80, 88], [11, 12])
    """
    inside = [s for s in range(low + 1, high) if s % 8 == 0] or list(range(low + 1, high))
    if len(inside) <= count:
        return inside
    return sorted({inside[round(k * (len(inside) - 1) / (count - 1))] for k in range(count)})


def size_only(planner: Planner, target: float) -> Choice:
    """The "smaller is better" design (sizing "size"): for each density of the ladder (with sparsity off: dense),
    every matrix at it and the largest common factor of what the layers need whose unsnapped widths
    ``Planner.assumed`` expects within ``target``; of these, the one keeping the most weights (the densest on ties).
    If none fits, the fastest by that estimate (over the budget: the log and the final measurement say so)."""
    config, candidates = planner.config, []
    for density in sorted(config.densities, reverse=True) if config.sparsity else [1.0]:
        build = functools.partial(planner.sized, density=density)
        full = build(1.0)
        candidates.append(full if planner.assumed(full) <= target else
                          planner.scale(target, build=build, cost=planner.assumed))
    fitting = [choice for choice in candidates if planner.assumed(choice) <= target]
    return max(fitting, key=planner.params) if fitting else min(candidates, key=planner.assumed)


def levels_of(lstms: dict[str, LSTM], config: Symbiotic) -> list[Level]:
    """The planner's view of the stacks, with what accuracy needs checked against what each layer has."""
    levels = []
    for name, lstm in lstms.items():
        for index in range(lstm.num_layers):
            layer = lstm.layer(index, 0)
            levels.append(Level(name, index, layer_cell(layer), tuple(layer.matrices), lstm.num_directions,
                                lstm.input_size, lstm.proj_size, layer.hidden_size, layer.hidden_size, 0))
    needs = list(config.hidden_sizes) or [level.current for level in levels]
    if len(needs) != len(levels):
        raise ValueError(f"hidden_sizes lists {len(needs)} sizes, but the model's LSTMs have {len(levels)} layers "
                         f"({[level.current for level in levels]}): give one size per layer, every stack in order")
    for number, (level, need) in enumerate(zip(levels, needs)):
        if need > level.current and not config.max_growth:
            raise ValueError(f"hidden_sizes[{number}] = {need} is above the {level.current} units layer {level.layer} "
                             f"of {level.lstm or 'the LSTM'!r} has, and max_growth=0 adds none: give at most "
                             f"{level.current}, or let layers grow (max_growth > 0)")
        if need <= level.proj:
            raise ValueError(f"hidden_sizes[{number}] = {need} must exceed the stack's proj_size {level.proj}")
        level.need = need
        level.lowest = min(need, max(config.min_hidden, level.proj + 1))
        level.highest = max(need, level.current) + math.floor(config.max_growth * max(need, level.current))
    return levels


def design(lstms: dict[str, LSTM], config: Symbiotic, model: LatencyModel) -> Design:
    """Widths and densities for ``lstms`` within the budget (steps 2-4 of the module doc); a budget below the
    fastest model the profile allows is refused, saying how fast that is."""
    levels = levels_of(lstms, config)
    planner = Planner(levels, model, config)
    budget = config.latency_budget_us
    target = budget * (1 - config.margin)
    if config.sizing == "size":
        choice = size_only(planner, target)
        if planner.predict(choice) > budget:
            log.warning("symbiotic (sizing size): widths %s, every matrix at density %g: expected %.2f us per step "
                        "by size, but the latency model predicts %.2f us, over the budget of %.2f us; kept as the "
                        "baseline (the final measurement reports it)", list(choice.widths), min(choice.densities),
                        planner.assumed(choice), planner.predict(choice), budget)
        smallest = planner.sized(planner.lowest_factor(), min(config.densities) if config.sparsity else 1.0)
        return _design(planner, choice, config, planner.predict(smallest))
    choice = planner.start()
    if planner.predict(choice) > target:
        choice = planner.descend(planner.scale(target), target)   # every layer alike, then lower densities
    if planner.predict(choice) > target:
        fastest = planner.fastest()
        if planner.predict(fastest) > budget:
            raise TooFast(_too_fast(planner, fastest, config), planner.predict(fastest))
        choice = min(choice, fastest, key=planner.predict)
    if planner.predict(choice) <= target:
        planner.refine(choice)
        choice = planner.ascend(choice, target)
    else:
        log.warning("symbiotic: the plan runs %.2f us per step, within the budget of %.2f us but not its %.0f%% "
                    "margin: the final measurement may land above it", planner.predict(choice), budget,
                    100 * config.margin)
    return _design(planner, compacted(planner, choice, config, budget), config, planner.predict(planner.fastest()))


def compacted(planner: Planner, choice: Choice, config: Symbiotic, budget: float) -> Choice:
    """``choice`` with at most the parameters ``config.compression`` allows (step 4b), within the budget and its
    margin; refused, saying how far the densities reach, when no such design exists."""
    if not config.compression:
        return choice
    params = planner.dense_params() / config.compression
    # a plan already past the margin (the warning above) may still shed parameters, never latency
    found = planner.compact(choice, params, max(budget * (1 - config.margin), planner.predict(choice)))
    if found is None:
        floor = choice._replace(densities=(min(config.densities),) * len(planner.slots))
        raise ValueError(f"compression = {config.compression:g} asks for at most {params:,.0f} recurrent parameters, "
                         f"but the design at widths {list(choice.widths)} keeps {planner.params(floor):,.0f} even "
                         f"with every matrix at density {min(config.densities):g} (or goes over the budget on the "
                         f"way): add lower densities (densities=...), a looser budget, or a smaller compression")
    if found != choice:
        log.info("symbiotic: compression %g: %.0f recurrent parameters (at most %.0f), predicted %.2f us per step",
                 config.compression, planner.params(found), params, planner.predict(found))
    return found


def time_stacks(lstms: dict[str, LSTM], config: Symbiotic) -> tuple[float, dict[str, Any], dict[str, float]]:
    """``(total us per step, {label: error} of stacks that failed, {label: us} of the others)`` of ``lstms`` on
    ``config.backend``, copies timed in one interleaved run (``runtime.latency.measure``)."""
    stacks = {name or "(model)": copy.deepcopy(lstm).cpu().eval() for name, lstm in lstms.items()}
    result = measure(stacks, backends=(config.backend,), seq_len=config.seq_len, repeats=config.measure_repeats,
                     threads=config.threads)["models"]
    failed = {label: r["errors"].get(config.backend) for label, r in result.items()
              if config.backend not in r["backends"]}
    times = {label: r["backends"][config.backend]["median"] for label, r in result.items() if label not in failed}
    return sum(times.values()), failed, times


class TooFast(ValueError):
    """A budget below the fastest model the profile allows; ``fastest_us`` is how fast that is."""

    def __init__(self, message: str, fastest_us: float) -> None:
        super().__init__(message)
        self.fastest_us = fastest_us


def _too_fast(planner: Planner, fastest: Choice, config: Symbiotic) -> str:
    sparse = sorted({d for d in fastest.densities if d < 1.0})
    return (f"latency_budget_us = {config.latency_budget_us:g} is below the fastest model symbiotic can build here: "
            f"{planner.predict(fastest):.2f} us per step on {config.backend} (widths {list(fastest.widths)}"
            f"{f', sparse matrices down to density {sparse[0]:g}' if sparse else ', every matrix dense'}). Give a "
            f"budget of at least that, a lower min_hidden ({config.min_hidden}), or lower densities")


def _design(planner: Planner, choice: Choice, config: Symbiotic, fastest_us: float) -> Design:
    widths: dict[str, list[int]] = {}
    densities, entries, refused = {}, {}, {}
    table = planner.model.table([])
    for i, level in enumerate(planner.levels):
        widths.setdefault(level.lstm, []).append(choice.widths[i])
        inputs = planner.input_size(i, choice.widths)
        dense_us = table.latency(layer_key(level.cell, inputs, choice.widths[i]))
        for (j, matrix), density in zip(planner.slots, choice.densities):
            if j != i:
                continue
            names = [qualified(level.lstm, f"layers.{level.layer * level.directions + d}.weight_{matrix}")
                     for d in range(level.directions)]
            for name in names:
                if density < 1.0:
                    densities[name] = density
                    entries[name] = matrix_entries(level.cell, inputs, choice.widths[i])[matrix]
                elif config.sparsity and runs_forms_dense(config.backend):
                    refused[name] = (f"{config.backend} runs every form as the dense matrix it materialises: "
                                     f"sparse cannot be faster there (not profiled)")
                elif config.sparsity:
                    planner.options(i, matrix, choice.widths)          # measures the densities if not yet
                    best = min(table.latency(layer_key(level.cell, inputs, choice.widths[i], matrix, d))
                               for d in config.densities)
                    refused[name] = (f"dense runs its layer in {dense_us:.2f} us, sparse at best {best:.2f} us "
                                     f"(densities {config.densities}) on {config.backend}")
    return Design(widths, densities, entries, refused, planner.predict(choice), fastest_us, config.latency_budget_us,
                  config.backend, config.sizing, planner.assumed(choice) if config.sizing == "size" else None)


# --- rebuilding at the designed widths --------------------------------------------------------------------------
def kept_units(name: str, lstm: LSTM, widths: list[int], readers: list) -> dict[tuple[int, str], torch.Tensor]:
    """Per cell layer and group, the units to keep: the ``widths[l]`` hidden units with the largest ISS component
    norms (their rows, and the columns of whatever reads them), every unit of the other groups."""
    keep = {}
    with torch.no_grad():
        for group in layer_components(name, lstm, readers):
            if group.group == "hidden":
                width = widths[group.layer // lstm.num_directions]
                keep[(group.layer, group.group)] = group.squared_norms().topk(width).indices.sort().values.cpu()
            else:
                keep[(group.layer, group.group)] = torch.arange(group.size)
    return keep


def every_unit(lstm: LSTM) -> dict[tuple[int, str], torch.Tensor]:
    return {(flat, group.name): torch.arange(group.size)
            for flat, layer in enumerate(lstm.layers) for group in layer.groups()}


def resized_modules(handle: "Compression", widths: dict[str, list[int]], readers: dict[str, list[str]]
                    ) -> dict[str, nn.Module]:
    """The modules replacing the stacks whose widths change and the modules reading them, by name: layers that
    shrink keep their largest units (and the readers lose the others' columns), then layers that grow gain new
    units (``iss.widened_lstm``: read by nothing yet, so the function is unchanged) and the readers zero columns
    for them."""
    smaller = {name: [min(w, size) for w, size in zip(widths[name], handle.lstms[name].hidden_sizes)]
               for name in widths}
    new = _shrunk_modules(handle, smaller, readers)
    for name, lstm in handle.lstms.items():
        if widths[name] == smaller[name]:
            continue
        new[name], channels = widened_lstm(new.get(name, lstm), widths[name])
        width = new[name].num_directions * new[name].layers[-1].output_size
        for reader in readers[name]:
            new[reader] = widened_reader(new.get(reader, handle.module(reader)), width, channels)
    return new


def _shrunk_modules(handle: "Compression", widths: dict[str, list[int]], readers: dict[str, list[str]]
                    ) -> dict[str, nn.Module]:
    """The modules replacing the stacks whose layers shrink to ``widths`` and the modules reading them."""
    changed = [name for name, lstm in handle.lstms.items() if list(lstm.hidden_sizes) != widths[name]]
    keep, inputs = {}, {}
    for name in changed:
        lstm = handle.lstms[name]
        columns = [r for reader in readers[name] for r in input_columns(reader, handle.module(reader))]
        keep[name] = kept_units(name, lstm, widths[name], columns)
        for reader in readers[name]:
            inputs[reader] = output_channels(lstm, keep[name], lstm.num_layers - 1)
    new = {}
    for name in set(changed) | (set(inputs) & set(handle.lstms)):
        lstm = handle.lstms[name]
        new[name] = shrunk_lstm(lstm, keep.get(name) or every_unit(lstm), inputs.get(name))
    for reader, columns in inputs.items():
        present = handle.module(reader)
        if reader not in handle.lstms and len(columns) < input_width(present):
            new[reader] = narrowed(present, columns)
    return new


def transplant_(lstm: LSTM, new: LSTM) -> None:
    """Give ``lstm`` the layers and sizes of ``new``, in place: the model and the handle keep the same object."""
    lstm.layers = new.layers
    lstm.hidden_sizes = list(new.hidden_sizes)
    lstm.input_size = new.input_size


def default_profile_root() -> Path:
    """``$LEANLSTM_CACHE/profiles``, else ``$XDG_CACHE_HOME/leanlstm/profiles``, else ``~/.cache/leanlstm/profiles``."""
    if os.environ.get("LEANLSTM_CACHE"):
        return Path(os.environ["LEANLSTM_CACHE"]).expanduser() / "profiles"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "leanlstm" / "profiles"


# --- the method -----------------------------------------------------------------------------------------------
class SymbioticMethod(GrowPruneLoop):
    """Profile, design widths and densities for the budget, grow and prune to them, measure the result.

    ``profile``: the latency source to plan with instead of the one opened from ``profile_dir``: a
    ``runtime.profile.LayerProfile``, or anything with its ``ensure(keys) -> LayerTable`` (tests inject tables).
    """

    name = "symbiotic"
    Config = Symbiotic
    goal = "its planned densities"

    def __init__(self, config: Symbiotic | None = None, profile: Any = None) -> None:
        super().__init__(config)
        self.profile = profile
        self.design: Design | None = None
        self.readers: dict[str, list[str]] = {}
        self.pending: dict[str, nn.Module] = {}     # the resized modules check built, for convert to put in place
        self.measured: dict[str, Any] | None = None
        # a run times the result first on the backend it was designed for, beside the usual two
        self.latency_backends = tuple(dict.fromkeys((self.config.backend, "leanlstm", "onnxruntime")))

    def source(self) -> Any:
        if self.profile is None:
            c = self.config
            root = Path(c.profile_dir).expanduser() if c.profile_dir else default_profile_root()
            folder = root / f"{c.backend}-seq{c.seq_len}-repeats{c.profile_repeats}-threads{c.threads}"
            self.profile = LayerProfile(folder, LayerSettings(c.backend, c.seq_len, c.profile_repeats, c.threads))
        return self.profile

    # --- before anything changes: the profile and the design ------------------------------------------------
    def check(self, handle: "Compression") -> None:
        c = self.config
        if c.latency_budget_us <= 0 and c.speedup <= 0:
            raise ValueError(f"Symbiotic needs latency_budget_us=N: the per-step latency (us, batch 1) the LSTM "
                             f"stacks must meet on {c.backend} (leanlstm.runtime.latency(model) measures them now), "
                             f"or speedup=S: S times faster than they run now")
        for name, form in handle.forms():
            if form.name not in ("dense", "sparse"):
                raise ValueError(f"symbiotic plans dense and pruned matrices; {name} is a {form.name} form")
        if self.design is None:
            self.design = self._design(handle)
        else:         # resumed: the checkpoint's design and dense timing, so the budget means what it meant
            log.info("symbiotic: continuing the design of the checkpoint")
        c = replace(c, latency_budget_us=self.design.budget_us, speedup=0.0)
        self._log_design()
        changed = [name for name, lstm in handle.lstms.items() if list(lstm.hidden_sizes) != self.design.widths[name]]
        self.pending = {}
        if changed:           # built now (non-dense forms refused by name), put in place by convert
            self.readers = self._readers(handle)
            self.pending = resized_modules(handle, self.design.widths, self.readers)
        if handle.total_steps:
            self.plan = make_plan(c, self._counts(handle, planned=True), handle.total_steps, self.goal)

    def _design(self, handle: "Compression") -> Design:
        """The design for the profile; with ``speedup``, the budget from the dense stacks timed now."""
        c, dense_us = self.config, None
        if c.speedup:
            dense_us, failed, _ = time_stacks(handle.lstms, c)
            if failed:
                raise ValueError(f"speedup={c.speedup:g} needs the dense stacks timed on {c.backend}, which failed "
                                 f"({failed}); give latency_budget_us instead")
            log.info("symbiotic: the dense stacks run %.2f us per step on %s; speedup %g: a budget of %.2f us",
                     dense_us, c.backend, c.speedup, dense_us / c.speedup)
            c = replace(c, latency_budget_us=dense_us / c.speedup, speedup=0.0)
        try:
            planned = design(handle.lstms, c, LatencyModel(self.source()))
        except TooFast as error:
            if dense_us is None:
                raise
            raise ValueError(f"speedup={self.config.speedup:g} of the dense stacks' {dense_us:.2f} us per step on "
                             f"{c.backend} asks for {c.latency_budget_us:.2f} us, below the fastest model "
                             f"symbiotic can build here ({error.fastest_us:.2f} us): give speedup <= "
                             f"{dense_us / error.fastest_us:.2f}, a lower min_hidden ({c.min_hidden}), or lower "
                             f"densities") from error
        return replace(planned, dense_us=dense_us)

    def _readers(self, handle: "Compression") -> dict[str, list[str]]:
        graph = trace(handle.model) if any(handle.lstms) else None
        try:
            return {name: find_readers(handle.model, name, lstm, handle.module, graph, tuple(handle.lstms))
                    for name, lstm in handle.lstms.items()}
        except ValueError as error:
            raise ValueError(f"symbiotic narrows layers as ISS removes units, and cannot here: {error}. Give "
                             f"hidden_sizes equal to the current widths and a budget they meet, or read the LSTM "
                             f"output through an nn.Linear") from error

    def _log_design(self) -> None:
        d = self.design
        log.info("symbiotic on %s (sizing %s): widths %s, %d sparse matrices %s; predicted %.2f us per step%s for "
                 "a budget of %.2f us (fastest possible %.2f us)", d.backend, d.sizing, d.widths, len(d.densities),
                 d.densities, d.predicted_us, "" if d.assumed_us is None else f" ({d.assumed_us:.2f} us by size)",
                 d.budget_us, d.fastest_us)
        for name, why in d.refused.items():
            log.info("symbiotic: %s stays dense: %s", name, why)

    def _counts(self, handle: "Compression", planned: bool = False) -> list[tuple[str, int, int, int]]:
        """``(name, entries now or at the seed, numel, target entries)`` of every matrix the design makes sparse."""
        counts, present = [], {} if planned else dict(handle.forms())
        for name, target in self.design.densities.items():
            form, numel = present.get(name), self.design.entries[name]
            seed = round(min(self.config.seed_density, target) * numel)
            counts.append((name, form.nnz() if isinstance(form, MaskedSparse) else seed, numel,
                           max(1, round(target * numel))))
        return counts

    # --- convert: the designed widths and forms ---------------------------------------------------------------
    def convert(self, handle: "Compression") -> None:
        new, self.pending = self.pending, {}
        for name, module in new.items():
            if name in handle.lstms:
                transplant_(handle.lstms[name], module)
            else:
                handle.install({name: module})
        if new:
            log.info("symbiotic: hidden sizes now %s",
                     {name or "(model)": lstm.hidden_sizes for name, lstm in handle.lstms.items()})
        self._set_forms(handle)

    def _set_forms(self, handle: "Compression") -> None:
        """Sparse matrices become MaskedSparse at their seed (largest weights), the others Dense; all are built
        before any is set, so a failure changes nothing."""
        changes = []
        for lstm_name, lstm in handle.lstms.items():
            for index, layer in enumerate(lstm.layers):
                for matrix, form in layer.forms():
                    target = self.design.densities.get(qualified(lstm_name, f"layers.{index}.weight_{matrix}"))
                    if isinstance(form, Dense if target is None else MaskedSparse):
                        continue                                    # already in its form (a restored model)
                    dense = form.materialize().detach().cpu().float()
                    changes.append((layer, matrix, Dense.from_dense(dense) if target is None else
                                    MaskedSparse.from_dense(dense, density=min(self.config.seed_density, target))))
        for layer, matrix, form in changes:
            layer.set_form(matrix, form)

    def _target(self, name: str, form: MaskedSparse) -> int:
        return max(1, round(self.design.densities[name] * form.mask.numel()))

    # --- the end: the measured latency against the budget ------------------------------------------------------
    def finish(self, handle: "Compression") -> None:
        self._prune(handle, to_target=True)          # a schedule cut short: every matrix at its density now
        self.measured = self._measure(handle)
        m = self.measured
        if m["within_budget"]:
            log.info("symbiotic: measured %.2f us per step on %s, within the budget of %.2f us (predicted %.2f us)",
                     m["measured_us"], m["backend"], m["budget_us"], m["predicted_us"])
        else:
            log.warning("symbiotic: %s", m["warning"])

    def _measure(self, handle: "Compression") -> dict[str, Any]:
        c, d = self.config, self.design
        total, failed, per_stack = time_stacks(handle.lstms, c)
        out = {"backend": c.backend, "budget_us": d.budget_us, "predicted_us": d.predicted_us,
               "measured_us": total, "per_stack_us": per_stack, "within_budget": not failed and total <= d.budget_us,
               "warning": None}
        if failed:
            out["warning"] = f"could not measure {sorted(failed)} on {c.backend} ({failed}): the budget is unchecked"
        elif total > d.budget_us:
            out["warning"] = (f"OVER THE LATENCY BUDGET: the compressed LSTM stacks measure {total:.2f} us per step "
                              f"on {c.backend} (batch 1, {c.seq_len}-step sequences, {c.threads} thread(s)), "
                              f"{100 * (total / d.budget_us - 1):.0f}% above the budget of {d.budget_us:.2f} us; the "
                              f"profile predicted {d.predicted_us:.2f} us. A busy machine reads slow: measure again "
                              f"when it is idle, or compress again with a lower budget or a larger margin")
        return out

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        d, m = self.design, self.measured or {}
        out = {"symbiotic_backend": d.backend, "symbiotic_sizing": d.sizing, "symbiotic_budget_us": d.budget_us,
               "symbiotic_predicted_us": d.predicted_us, "symbiotic_assumed_us": d.assumed_us,
               "symbiotic_fastest_us": d.fastest_us,
               "symbiotic_widths": d.widths, "symbiotic_densities": d.densities,
               "symbiotic_kept_dense": sorted(d.refused), "lstm_weight_compression": weight_compression(handle.forms()),
               "sparse_density": {name: form.density() for name, form in self._sparse(handle)},
               "symbiotic_schedule": asdict(self.plan) if self.plan else None}
        if m:
            out |= {"symbiotic_measured_us": m["measured_us"], "symbiotic_within_budget": m["within_budget"],
                    "symbiotic_warning": m["warning"]}
        if d.dense_us is not None:
            out |= {"symbiotic_dense_us": d.dense_us, "symbiotic_speedup_target": self.config.speedup}
            if m.get("measured_us"):
                out["symbiotic_measured_speedup"] = d.dense_us / m["measured_us"]
        return out

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"design": self.design.to_dict() if self.design else None,
                                       "measured": self.measured}

    def resume(self, state: dict[str, Any]) -> None:
        if state.get("design"):      # check takes it instead of timing the dense stacks and designing again
            self.design = Design.from_dict(state["design"])

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        super().load_state_dict(state, handle)
        self.design = Design.from_dict(state["design"]) if state["design"] else self.design
        self.measured = state["measured"]
