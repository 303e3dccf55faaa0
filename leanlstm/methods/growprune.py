"""Grow-and-prune training (Dai, Yin & Jha, *Grow and Prune Compact, Fast, and Accurate LSTMs*, arXiv 1805.11797;
growth and pruning as in their NeST, arXiv 1711.02017): ``leanlstm.GrowPrune``, method ``gp``.

Every matrix of every compressed LSTM (any cell: an H-LSTM's gate networks too) becomes ``MaskedSparse`` and goes
through three phases, counted in optimiser steps (``handle.step``)::

    seed       a sparse mask at seed_density: random (NeST's randomly initialised sparse seed), the largest
               weights given ("magnitude"), or the mask of a matrix that is already MaskedSparse (a given mask)
    growth     grow_steps times, every grow_every steps: activate the grow_ratio fraction of the dormant
               (masked-out) connections with the largest |G|, G = dL/dW summed over the grow_every steps
               before (MaskedSparse.track_gradient: the gradient w.r.t. the forward's matrix, which exists at
               masked-out entries although weight.grad is zero there); a grown weight starts at -lr * G / steps,
               the step SGD would have made had it been active at 0 (NeST initialises from the gradient), or 0
    pruning    every prune_every steps of retraining: remove the prune_ratio fraction of each matrix's active
               weights with the smallest magnitude, never below the matrix's target, until every matrix stores
               at most 1/compression of its dense bytes (honest CSR bytes, as ``prune`` counts them) -- or until
               the validation loss rises more than loss_tolerance above its value when pruning began
    then       the masks stay fixed; ``finalize()`` prunes any matrix still above its target (a schedule cut
               short) unless the tolerance stopped pruning; fine-tuning keeps the masks.

Masked-out weights are set to exactly zero after every optimiser step (momentum or Adam would move them).
Masks are buffers of the model's state dict; the handle's state holds the gradient sums of an unfinished growth
window, the resolved schedule and the tolerance's numbers, so a run resumed mid-phase continues exactly.

``grow_every`` / ``prune_every`` = 0 fit the schedule to the phase (``total_steps``, or the Trainer's length):
growth over its first quarter, pruning over the next half, the last quarter retraining the final masks.

From the papers: the sparse, randomly initialised seed; growth of the dormant connections whose |dL/dw|
(accumulated over training batches) is largest, a growth ratio setting how many per growth step (their rule is
a percentile threshold on |G|; here the ratio is a fraction of the dormant connections, so counts are exact and
the schedule can be planned); a grown weight initialised from its gradient; magnitude pruning by a pruning ratio
per step with retraining in between, until the size is reached or accuracy degrades. Chosen here, not taken
from the papers: every default number below, ratios per matrix rather than per network, the window's mean
gradient and a descent sign for the initial value, the schedule's shares, and stopping on validation loss.

    handle = leanlstm.compress_(model, leanlstm.GrowPrune(compression=10, total_steps=len(loader) * epochs))
    ...  loss.backward(); optimizer.step(); handle.after_step()
    handle.method.observe_validation(val_loss)                       # optional, at each epoch end
    handle.finalize()
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import distributed
from ..nn import LSTM  # noqa: F401  (the docstring examples)
from ..nn.forms import MaskedSparse
from ..train import MAX_LR, MAX_SEED, Callback, Range
from .base import COMPRESSION, STEPS, UNIT, Method, MethodConfig
from .pruning import convert_forms, final_entries, sparsity_summary

if TYPE_CHECKING:
    from ..compress import Compression

log = logging.getLogger(__name__)

SEEDS = ("random", "magnitude")
INITS = ("gradient", "zero")
CRITERIA = ("gradient", "random")


@dataclass
class GrowPrune(MethodConfig):
    """Grow-and-prune every LSTM matrix from a sparse seed to ``compression`` (honest CSR bytes).

    >>> GrowPrune(compression=10).seed_density, GrowPrune(prune_every=50).prune_ratio
    (0.2, 0.2)
    """

    compression: float = 10.0     # target honest compression of every LSTM weight matrix (CSR bytes, as prune)
    seed_density: float = 0.2     # density of the sparse seed every matrix starts from, in (0, 1]
    seed_mask: str = "random"     # "random" (NeST's seed) or "magnitude" (keep the largest given weights)
    generator_seed: int = 0       # seed of the random seed masks' generator
    grow_steps: int = 2           # growth steps
    grow_ratio: float = 0.5       # fraction of a matrix's dormant connections each growth step activates
    grow_every: int = 0           # optimiser steps before each growth step: its gradient window (0: from the phase)
    grow_criterion: str = "gradient"  # which dormant connections grow: largest |dL/dW| (the paper's), or "random"
    grow_init: str = "gradient"   # grown weights: "gradient" (-lr * mean dL/dW over the window) or "zero"
    growth_lr: float = 0.0        # the lr of grow_init="gradient" (0: the Trainer phase's lr)
    prune_ratio: float = 0.2      # fraction of a matrix's active weights each pruning step removes
    prune_every: int = 0          # optimiser steps of retraining before each pruning step (0: from the phase)
    loss_tolerance: float = 0.0   # stop pruning once val loss > (1 + this) x its value when pruning began (0: off)
    total_steps: int = 0          # optimiser steps of the phase in a user loop (needed only for the 0 = auto fields)
    speed_check: bool = True      # time each sparse matrix against dense on the engine and warn when slower
    keep_slow_dense: bool = False  # keep the matrices that would run slower than dense dense (not sparse)

    ranges = {"compression": COMPRESSION, "seed_density": Range(0, 1, low_open=True), "grow_ratio": UNIT,
              "prune_ratio": Range(0, 1, low_open=True, high_open=True),
              "generator_seed": Range(0, MAX_SEED, integer=True),
              "grow_steps": Range(0, 10**6, integer=True), "grow_every": STEPS, "prune_every": STEPS,
              "total_steps": STEPS, "growth_lr": Range(0, MAX_LR, note="0: the Trainer phase's lr"),
              "loss_tolerance": Range(0, 1e6, note="0: off")}
    choices = {"seed_mask": SEEDS, "grow_init": INITS, "grow_criterion": CRITERIA}


# --- the schedule: pure arithmetic on entry counts ---------------------------------------------------------
def grown(active: int, numel: int, ratio: float) -> int:
    """Entries a growth step activates in a matrix with ``active`` of ``numel`` entries active."""
    return round(ratio * (numel - active))


def pruned_keep(active: int, target: int, ratio: float) -> int:
    """Entries a pruning step keeps: ``ratio`` of the active ones go (at least one), never below ``target``."""
    return max(target, active - max(1, round(ratio * active)))


def prune_events(active: int, numel: int, target: int, config: GrowPrune) -> int:
    """Pruning steps a matrix needs after its growth to reach ``target`` entries.

    >>> prune_events(200, 1000, 67, GrowPrune())      # 0.2 -> 0.6 -> 0.8 dense, then 20% a step down to 6.7%
    12
    """
    for _ in range(config.grow_steps):
        active += grown(active, numel, config.grow_ratio)
    events = 0
    while active > target:
        active, events = pruned_keep(active, target, config.prune_ratio), events + 1
    return events


@dataclass
class Plan:
    """The resolved schedule: growth at steps ``grow_every * k`` (k = 1..grow_steps), then pruning at
    ``growth_end + prune_every * j`` (j = 1, 2, ...) until every matrix is at its target."""

    grow_every: int
    prune_every: int
    grow_steps: int
    prune_events: int         # pruning steps the slowest matrix needs

    @property
    def growth_end(self) -> int:
        return self.grow_every * self.grow_steps

    @property
    def pruning_end(self) -> int:
        return self.growth_end + self.prune_every * self.prune_events

    def growing(self, step: int) -> bool:
        """Whether ``step`` ends a growth window."""
        return 0 < step <= self.growth_end and step % self.grow_every == 0

    def pruning(self, step: int) -> bool:
        return step > self.growth_end and (step - self.growth_end) % self.prune_every == 0

    def pruned(self, step: int) -> bool:
        """Whether the first pruning step has happened by ``step``."""
        return self.prune_events > 0 and step >= self.growth_end + self.prune_every


def make_plan(config: GrowPrune, counts: list[tuple[str, int, int, int]], total: int, goal: str = "") -> Plan:
    """The schedule for matrices ``(name, seed entries, numel, target entries)`` over a phase of ``total`` steps
    (0: unknown); raises a ``ValueError`` saying what to change when the ``goal`` (default: the config's
    ``compression``) cannot be reached in time. ``config``: any config with GrowPrune's schedule fields.

    >>> make_plan(GrowPrune(), [("w", 200, 1000, 67)], total=960)
    Plan(grow_every=120, prune_every=40, grow_steps=2, prune_events=12)
    """
    if not counts:
        return Plan(1, 1, 0, 0)                     # no sparse matrix: nothing to grow or prune
    what, goal = type(config).__name__, goal or f"{config.compression}x"
    events = max(prune_events(active, numel, target, config) for _, active, numel, target in counts)
    auto = [name for name, value, used in (("grow_every", config.grow_every, config.grow_steps > 0),
                                           ("prune_every", config.prune_every, events > 0)) if used and not value]
    if auto and not total:
        raise ValueError(f"{what} fits {' and '.join(auto)} = 0 to the phase, but does not know its length: pass "
                         f"total_steps=N (leanlstm.Trainer sets it from its epochs) or give {' and '.join(auto)}")
    grow_every = config.grow_every or (total // (4 * config.grow_steps) if config.grow_steps else 1)
    prune_every = config.prune_every or (total // (2 * events) if events else 1)
    plan = Plan(grow_every, prune_every, config.grow_steps, events)
    if not (grow_every and prune_every) or (total and plan.pruning_end > total):
        raise ValueError(f"{what} cannot reach {goal} in {total} optimiser steps: "
                         f"{config.grow_steps} growth steps x {grow_every} steps, then {events} pruning steps "
                         f"(prune_ratio {config.prune_ratio}) x {prune_every} steps; lower grow_every / prune_every, "
                         f"raise prune_ratio, lower seed_density / grow_ratio / grow_steps, or train longer")
    return plan


# --- growth and pruning of one matrix -------------------------------------------------------------------------
@torch.no_grad()
def grow_(form: MaskedSparse, count: int, init: torch.Tensor | None = None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Activate the ``count`` dormant entries with the largest ``|form.dense_grad|`` (with a ``generator``: random
    dormant entries instead, the ablation of the growth criterion); they take their values from ``init`` (same
    shape), else 0. Returns their flat indices.

    >>> form = MaskedSparse.from_dense(torch.ones(2, 3), density=0.0)
    >>> form.dense_grad = torch.tensor([[0.1, -3.0, 0.2], [2.0, 0.0, -0.5]])
    >>> grow_(form, 2).tolist(), form.mask.int().tolist()
    ([1, 3], [[0, 1, 0], [1, 0, 0]])
    """
    score = (form.dense_grad.abs() if generator is None
             else torch.rand(form.mask.shape, generator=generator).to(form.mask.device))
    score = score.masked_fill(form.mask, -1.0).flatten()                        # active entries never chosen
    picked = score.topk(min(count, int((~form.mask).sum()))).indices
    mask = form.mask.flatten().clone()
    mask[picked] = True
    form.weight.view(-1)[picked] = 0.0 if init is None else init.flatten()[picked].to(form.weight.dtype)
    form.set_mask(mask.view_as(form.mask))
    return picked


@torch.no_grad()
def prune_(form: MaskedSparse, keep: int) -> None:
    """Keep the ``keep`` active entries of largest magnitude (dormant ones are never kept instead).

    >>> form = MaskedSparse.from_dense(torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.1, 3.0]]))
    >>> prune_(form, 3); form.mask.int().tolist()
    [[0, 1, 0], [1, 0, 1]]
    """
    score = form.weight.abs().masked_fill(~form.mask, -1.0).flatten()
    mask = torch.zeros_like(form.mask).flatten()
    mask[score.topk(keep).indices] = True
    form.set_mask(mask.view_as(form.mask))


def track_growth(forms: list[MaskedSparse], growing: bool) -> None:
    """Sum each form's dense gradient while growth is ahead (kept where a sum is under way), else drop the sums."""
    for form in forms:
        if growing and form.dense_grad is None:
            form.track_gradient()
        elif not growing:
            form.track_gradient(False)


def grow_all(forms: list[tuple[str, MaskedSparse]], ratio: float, lr: float | None, window: int,
             generator: torch.Generator | None = None) -> None:
    """One growth step of every matrix: the window's gradient sums (averaged over processes), ``grown`` of each
    matrix's dormant connections activated (``grow_``; a grown weight starts at ``-lr x`` its mean gradient, or 0
    without ``lr``), the sums reset for the next window."""
    for name, form in forms:
        if distributed.is_distributed():          # every process grows the same connections
            dist.all_reduce(form.dense_grad)
            form.dense_grad /= dist.get_world_size()
        init = None if lr is None else form.dense_grad * (-lr / window)
        picked = grow_(form, grown(form.nnz(), form.mask.numel(), ratio), init, generator)
        log.debug("%s grew %d connections to density %.4f", name, len(picked), form.density())
        form.dense_grad.zero_()


def seed_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """A random mask with exactly ``round(density * numel)`` entries.

    >>> int(seed_mask(torch.Size((4, 5)), 0.3, torch.Generator().manual_seed(0)).sum())
    6
    """
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:round(density * numel)]] = True
    return mask.view(shape)


# --- the training loop: grow, then prune, every optimiser step -------------------------------------------------
class GrowPruneLoop(Method):
    """Grow-and-prune's training loop, for every method built on it (``gp``, ``symbiotic``): after each optimiser
    step the masked-out weights go back to zero, growth windows sum the dense gradients and grow, pruning steps
    follow, on a ``Plan`` fitted to the phase; the unfinished window's sums are checkpointed. A subclass converts
    the matrices to ``MaskedSparse`` and says what each must reach (``_counts``, ``_target``)."""

    goal = ""            # what the schedule must reach, for its errors ("": the config's compression)

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.plan: Plan | None = None
        self.lr: float | None = None               # the Trainer phase's lr (grow_init="gradient")
        self.handle: "Compression | None" = None   # the handle whose hooks ran last (start)

    def _counts(self, handle: "Compression") -> list[tuple[str, int, int, int]]:
        """``(name, entries now or at the seed, numel, target entries)`` of every matrix grown and pruned."""
        raise NotImplementedError

    def _target(self, name: str, form: MaskedSparse) -> int:
        """The entries ``form`` keeps once pruned."""
        raise NotImplementedError

    def _growth_generator(self, handle: "Compression") -> torch.Generator | None:
        """A generator for random growth (the criterion's ablation), or None: growth by gradient."""
        return None

    @staticmethod
    def _sparse(handle: "Compression") -> list[tuple[str, MaskedSparse]]:
        return [(name, form) for name, form in handle.forms() if isinstance(form, MaskedSparse)]

    def start(self, handle: "Compression") -> None:
        self.handle = handle
        growing = not handle.finalized and self.config.grow_steps > 0 and (
            self.plan is None or handle.step < self.plan.growth_end)
        track_growth([form for _, form in self._sparse(handle)], growing)

    def on_train_begin(self, handle: "Compression", lr: float) -> None:
        if handle.finalized:
            return
        self.lr = lr
        self._plan(handle)       # a schedule the phase cannot hold fails here, before the first step

    def _plan(self, handle: "Compression") -> Plan:
        if self.plan is None:
            self.plan = make_plan(self.config, self._counts(handle), handle.total_steps, self.goal)
            log.info("%s grow-and-prune schedule: %s", self.name, self.plan)
        return self.plan

    def after_step(self, handle: "Compression") -> None:
        with torch.no_grad():        # masked-out weights stay exactly zero whatever the optimiser
            for _, form in self._sparse(handle):
                form.weight.mul_(form.mask)
        if handle.finalized:
            return
        plan = self._plan(handle)
        if self.config.grow_init == "gradient" and handle.step <= plan.growth_end:
            self._growth_lr()        # no lr known: refused at the first step, not at the first growth
        if plan.growing(handle.step):
            self._grow(handle, plan)
        elif plan.pruning(handle.step):
            self._prune(handle)

    def _grow(self, handle: "Compression", plan: Plan) -> None:
        lr = self._growth_lr() if self.config.grow_init == "gradient" else None
        grow_all(self._sparse(handle), self.config.grow_ratio, lr, plan.grow_every, self._growth_generator(handle))
        if handle.step >= plan.growth_end:
            track_growth([form for _, form in self._sparse(handle)], False)

    def _growth_lr(self) -> float:
        lr = self.config.growth_lr or self.lr
        if not lr:
            raise ValueError(f"{type(self.config).__name__}(grow_init='gradient') starts a grown weight at -lr x its "
                             f"mean gradient but knows no lr: pass growth_lr=<your optimiser's lr>, or "
                             f"grow_init='zero' (leanlstm.Trainer passes its lr)")
        return lr

    def _prune(self, handle: "Compression", to_target: bool = False) -> None:
        """One pruning step of every matrix above its target (``to_target``: straight to it)."""
        for name, form in self._sparse(handle):
            target = self._target(name, form)
            if form.nnz() > target:
                prune_(form, target if to_target else pruned_keep(form.nnz(), target, self.config.prune_ratio))

    def state_dict(self) -> dict[str, Any]:
        forms = self._sparse(self.handle) if self.handle is not None else []
        sums = {name: form.dense_grad.detach().clone() for name, form in forms if form.dense_grad is not None}
        return {"plan": asdict(self.plan) if self.plan else None, "lr": self.lr, "dense_grad": sums}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        self.plan = Plan(**state["plan"]) if state["plan"] else None
        self.lr = state["lr"]
        forms = dict(handle.forms())
        for name, total in state["dense_grad"].items():    # an unfinished growth window's sums
            forms[name].dense_grad = total.to(forms[name].weight).clone()


# --- the method -----------------------------------------------------------------------------------------------
class GrowPruneMethod(GrowPruneLoop):
    """Grow-and-prune every LSTM matrix from a sparse seed to ``compression``; fine-tuning keeps the masks."""

    name = "gp"
    Config = GrowPrune

    def __init__(self, config: GrowPrune | None = None) -> None:
        super().__init__(config)
        self.reference_loss: float | None = None   # validation loss when pruning began
        self.stopped = False                       # pruning stopped by loss_tolerance

    # --- conversion and targets ---------------------------------------------------------------------------
    def check(self, handle: "Compression") -> None:
        counts = self._counts(handle)                  # raises for a budget no matrix shape can meet
        if handle.total_steps:
            self.plan = make_plan(self.config, counts, handle.total_steps)

    def _counts(self, handle: "Compression") -> list[tuple[str, int, int, int]]:
        """Every matrix, before or after convert."""
        counts = []
        for name, form in handle.forms():
            numel = form.out_features * form.in_features
            active = form.nnz() if isinstance(form, MaskedSparse) else round(self.config.seed_density * numel)
            shape_only = MaskedSparse(form.out_features, form.in_features)
            counts.append((name, active, numel, final_entries(name, shape_only, self.config.compression)))
        return counts

    def _target(self, name: str, form: MaskedSparse) -> int:
        return final_entries(name, form, self.config.compression)

    def convert(self, handle: "Compression") -> None:
        c = self.config
        generator = torch.Generator().manual_seed(c.generator_seed)

        def build(name: str, dense: torch.Tensor) -> MaskedSparse:
            if c.seed_mask == "magnitude":
                return MaskedSparse.from_dense(dense, density=c.seed_density)
            form = MaskedSparse.from_dense(dense)
            form.set_mask(seed_mask(dense.shape, c.seed_density, generator))
            return form

        convert_forms(handle, build, keep=lambda form: isinstance(form, MaskedSparse))

    def _growth_generator(self, handle: "Compression") -> torch.Generator | None:
        if self.config.grow_criterion != "random":
            return None
        # seeded by the step: a resumed run grows the same entries
        return torch.Generator().manual_seed(self.config.generator_seed * 1_000_003 + handle.step)

    def _prune(self, handle: "Compression", to_target: bool = False) -> None:
        if not self.stopped:         # the tolerance stopped pruning for good: the masks stay
            super()._prune(handle, to_target)

    # --- validation loss, epoch ends, the end --------------------------------------------------------------
    def observe_validation(self, loss: float) -> bool:
        """Feed the validation loss (after each epoch); returns whether pruning goes on. With ``loss_tolerance``
        set, pruning stops for good once ``loss`` exceeds ``(1 + loss_tolerance)`` x the loss when pruning
        began: the lowest seen before the first pruning step, else the first seen after it. The masks stay as
        the last pruning step left them."""
        handle = self.handle
        began = self.plan is not None and handle is not None and self.plan.pruned(handle.step)
        if self.reference_loss is None or not began:
            self.reference_loss = loss if self.reference_loss is None else min(self.reference_loss, loss)
        limit = self.reference_loss * (1.0 + self.config.loss_tolerance)
        if self.config.loss_tolerance and began and not self.stopped and loss > limit:
            self.stopped = True
            log.info("GP: validation loss %.4f rose past %.4f (%.4f x (1 + %g)) at step %d; pruning stops at "
                     "%.2fx", loss, limit, self.reference_loss, self.config.loss_tolerance, handle.step,
                     sparsity_summary(handle.forms(), self.config.compression)["lstm_weight_compression"])
        return not self.stopped

    def finish(self, handle: "Compression") -> None:
        self._prune(handle, to_target=True)        # a schedule cut short: every matrix at its target now

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        return sparsity_summary(handle.forms(), self.config.compression) | {
            "gp_schedule": asdict(self.plan) if self.plan else None, "gp_stopped_by_tolerance": self.stopped,
            "gp_reference_val_loss": self.reference_loss}

    def callbacks(self) -> list[Callback]:
        """The handle's hooks, and the validation loss fed to ``observe_validation`` at each epoch end."""
        return super().callbacks() + [ValidationFeed(self)]

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"reference_loss": self.reference_loss, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        super().load_state_dict(state, handle)
        self.reference_loss, self.stopped = state["reference_loss"], state["stopped"]


class ValidationFeed(Callback):
    """For ``leanlstm.train.Trainer``: hands each epoch's validation loss to ``observe_validation``."""

    def __init__(self, method: GrowPruneMethod) -> None:
        self.method = method

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if "val_loss" in metrics and not self.method.driver.bind(trainer.model).finalized:
            self.method.observe_validation(metrics["val_loss"])
