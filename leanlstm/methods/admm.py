"""ADMM joint pruning and int8 (or 4-bit) quantisation (ADMM-NN: Ren et al., ASPLOS 2019; the ADMM pruning of Zhang
et al., ECCV 2018): ``leanlstm.ADMM``, method ``admm``.

Training minimises ``loss(W)`` subject to ``W`` in ``S``: at most ``k`` non-zero entries per matrix (``k`` from
the byte budget, counted as int8 CSR: 1-byte values, 2-byte column indices, 4-byte row pointers and a 4-byte scale
per row), each on its row's int8 grid. ADMM splits it with an auxiliary ``Z`` and a scaled dual ``U`` per matrix:

    W-step   ordinary training of  loss(W) + rho/2 ||W - Z + U||^2       (``penalty``, every step)
    Z-step   Z = proj_S(W + U): keep the k largest magnitudes, snap them to the int8 grid of their rows
    U-step   U = U + W - Z                                                 (both every ``update_every`` steps)

and ``rho`` grows by ``rho_growth`` at each Z/U update (up to ``rho_max``), pulling ``W`` onto ``S``. With
``anneal_end > 0`` the sparsity set itself tightens over the phase (progressive ADMM, Ye et al. 2018): ``k`` falls
from dense to its final value on the cubic schedule of gradual pruning, reaching it at that fraction of the phase,
so that ``W`` never has to travel from a dense solution to a 3%-dense one in a single projection. At
``finalize()`` the hard constraint is applied, ``W = proj_S(W)`` with its mask, and fine-tuning is the papers'
masked retraining: the mask stays fixed and the values stay on the int8 grid (float latent weights with a
straight-through update, ``leanlstm.nn.quant.Latent``), so the result runs in the int8 engine exactly as trained.

Two options shape the progressive phase. ``masked_steps=True`` is the papers' alternation of ADMM and masked
retraining at every update: the matrix is first hard-pruned to the previous projection's support (the entries the
penalty has pulled towards zero for a whole interval), their weights and duals cleared, so what ADMM removed stays
removed and the W-step trains the weights that remain. ``dual_while_tightening=False`` holds ``U`` at zero until
``k`` is final: while the set shrinks at every update, one dual step per set gives each newly dropped entry
``U = W``, a penalty target of ``-W`` (beyond zero). On a short proxy of PTB `medium-cpu` at 60x (BENCHMARKS.md,
ADMM section) masked steps closed most of ADMM's gap to gradual magnitude pruning (validation 122.7 against 153.4
without them; pruning 118.8); holding the dual helped alone (145.3) and made no difference with masked steps.

From the papers: the splitting, the Euclidean projections (top-k magnitude for sparsity, nearest level for
quantisation), the growing rho, masked retraining. Chosen here: one joint projection onto sparse-and-quantised
(ADMM-NN prunes first and quantises after; with 255 levels per row the joint step costs nothing and keeps one
phase), int8 levels per row (the engine's), the default numbers, and budgets per matrix rather than per network.
``quantise=False`` gives ADMM pruning alone (float32 values). ``block="16x4"`` makes the sparsity set whole blocks
(``BlockSparse``, pruning's ``block``): the projection keeps the blocks of largest L2 norm, one index a block, so
at 60x int8 bytes a 2600x650 matrix keeps 5.8% of its weights instead of 1.8%, in the engine's VNNI blocks.
``bits=4`` (with ``block``) projects onto 15 levels per row instead of 255, as ADMM-NN quantises to a few bits:
the engine keeps such blocks packed, two values a byte, so at 60x a 2600x650 matrix keeps 11.3% of its weights.

    handle = leanlstm.compress_(model, leanlstm.ADMM(compression=60, total_steps=len(loader) * epochs))
    ...  loss = loss + handle.penalty(); loss.backward(); optimizer.step(); handle.after_step()
    handle.finalize()        # then fine-tune (masked retraining), still calling handle.after_step()
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..nn.forms import MaskedSparse
from ..nn.forms.blocksparse import block_norms, expand_blocks
from ..nn.quant import BITS, CLIPS, QUANT_BITS, Latent, quantise_tensor
from ..train import Range
from .base import COMPRESSION, STEPS, UNIT, Method, MethodConfig
from .pruning import (GradualPruning, check_4_bit_block, convert_forms, empty_sparse, final_entries, is_sparse_form,
                      parse_block, schedule_length, sparsity_summary, to_sparse)

if TYPE_CHECKING:
    from ..compress import Compression

log = logging.getLogger(__name__)


@dataclass
class ADMM(MethodConfig):
    """ADMM pruning of every LSTM matrix to ``compression`` (bytes against dense float32), with int8 values.

    >>> ADMM().compression, ADMM(quantise=False).rho
    (60.0, 0.001)
    """

    compression: float = 60.0     # dense float32 bytes over stored bytes (int8 CSR with scales when quantise)
    quantise: bool = True         # values on the per-row int8 grid (False: ADMM pruning with float32 values)
    rho: float = 1e-3             # initial penalty weight
    rho_growth: float = 1.3       # rho is multiplied by this at every Z/U update ...
    rho_max: float = 1.0          # ... up to this
    updates: int = 12             # Z/U updates over the compression phase (when update_every is 0)
    update_every: int = 0         # optimiser steps between Z/U updates (0: the phase's steps / updates)
    anneal_end: float = 0.0       # fraction of the phase at which Z reaches the final sparsity (0: from the start)
    masked_steps: bool = False    # each update first hard-prunes W to the previous projection's support
    dual_while_tightening: bool = True  # U accumulates while the target tightens (False: zero until k is final)
    clip: str = "max"             # each row's int8 scale in the projection: its max, or least squared error
    total_steps: int = 0          # optimiser steps of the compression phase in a user loop (0: Trainer's)
    speed_check: bool = True      # time each sparse matrix against dense on the engine and warn when slower
    keep_slow_dense: bool = False  # keep the matrices that would run slower than dense dense (not pruned)
    block: str = ""               # "16x4": the sparsity set keeps whole blocks (one index a block; pruning's block)
    bits: int = BITS              # the quantisation levels' width when quantise: 8, or 4 (with block: packed tiles)

    ranges = {"compression": COMPRESSION, "rho": Range(0, 1e6, low_open=True), "rho_growth": Range(1, 100),
              "rho_max": Range(0, 1e9, low_open=True), "updates": Range(1, 10**6, integer=True),
              "update_every": STEPS, "total_steps": STEPS, "anneal_end": UNIT}
    choices = {"clip": CLIPS, "bits": QUANT_BITS}

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_block(self.block)
        check_4_bit_block("bits", self.bits, self.block)


def top_mask(values: torch.Tensor, entries: int, block: tuple[int, int] | None = None) -> torch.Tensor:
    """The mask of the ``entries`` largest magnitudes of ``values``; with ``block`` (rows, cols), of the
    ``entries // (rows * cols)`` blocks of largest L2 norm (the Euclidean projection onto whole blocks).

    >>> top_mask(torch.tensor([[3.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]]), 4, (2, 2)).int().tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    if block is not None:
        rows, cols = values.shape
        norms = block_norms(values.detach(), *block)
        chosen = torch.zeros(norms.numel(), dtype=torch.bool, device=values.device)
        count = min(entries // (block[0] * block[1]), norms.numel())
        if count > 0:
            chosen[norms.reshape(-1).topk(count).indices] = True
        return expand_blocks(chosen.reshape(norms.shape), rows, cols, *block).to(values.device)
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if entries > 0:
        mask[values.detach().abs().flatten().topk(entries).indices] = True
    return mask.view_as(values)


def project(values: torch.Tensor, entries: int, quantise: bool = True, clip: str = "max",
            block: tuple[int, int] | None = None, bits: int = BITS) -> torch.Tensor:
    """The projection onto ``S``: the ``entries`` largest magnitudes of ``values`` (with ``block``, the blocks of
    largest norm they fill), snapped to their rows' grid of ``bits`` when ``quantise``; zeros elsewhere.

    >>> project(torch.tensor([[0.5, -2.0, 0.1], [1.0, 0.2, -3.0]]), 3, quantise=False).tolist()
    [[0.0, -2.0, 0.0], [1.0, 0.0, -3.0]]
    """
    return kept(values, top_mask(values, entries, block), quantise, clip, bits)


def kept(values: torch.Tensor, mask: torch.Tensor, quantise: bool = True, clip: str = "max", bits: int = BITS
         ) -> torch.Tensor:
    """``values`` on ``mask``, snapped to their rows' grid of ``bits`` when ``quantise``; zeros elsewhere."""
    return quantise_tensor(values, mask, clip, bits) if quantise else values.detach() * mask


class ADMMMethod(Method):
    """ADMM training towards sparse int8 matrices, then masked retraining on the int8 grid."""

    name = "admm"
    Config = ADMM

    def __init__(self, config: ADMM | None = None) -> None:
        super().__init__(config)
        self.rho = self.config.rho
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.support: dict[str, torch.Tensor] = {}     # the last projection's kept entries (masked_steps)
        self.latent: Latent | None = None
        self._saved: dict[str, Any] | None = None
        c = self.config
        self.block = parse_block(c.block)
        # the projection's entry counts: gradual pruning's schedule (final from the start when anneal_end is 0)
        self.schedule = GradualPruning(c.compression, end=c.anneal_end, value_bits=c.bits if c.quantise else None)
        if c.quantise:
            self.latency_backends = ("leanlstm-int8", "leanlstm", "torch-int8", "onnxruntime", "onnxruntime-int8")

    def _entries(self, name: str, form: MaskedSparse) -> int:
        shape_only = empty_sparse(form.out_features, form.in_features, self.block)
        if self.config.quantise:
            shape_only.set_value_bits(self.config.bits)
        return final_entries(name, shape_only, self.config.compression)

    def check(self, handle: "Compression") -> None:
        for name, form in handle.forms():      # every budget on its shape alone: fail now, not at the end
            self._entries(name, form)

    def convert(self, handle: "Compression") -> None:
        convert_forms(handle, lambda name, dense: to_sparse(dense, 1.0, self.block),
                      keep=lambda form: is_sparse_form(form, self.block))

    def start(self, handle: "Compression") -> None:
        if self._saved is not None:
            self._load(handle, self._saved)
            self._saved = None
        self.final_entries = self.schedule.targets(handle.forms(), 1, 1)     # the schedule's last value
        if not handle.finalized and not self.z:
            entries = self._targets(handle)
            for name, form in handle.forms():
                self.z[name] = self._project(form.materialize().detach(), entries[name], name)
                self.u[name] = torch.zeros_like(form.weight, requires_grad=False)
        if handle.finalized and self.config.quantise and self.latent is None:
            self.latent = self._latent(handle)

    def _targets(self, handle: "Compression") -> dict[str, int]:
        """Entries each matrix's projection keeps at the handle's step: the final count from the start, or with
        ``anneal_end`` the gradual-pruning schedule from dense down to it."""
        # at step 0 the schedule's value does not depend on its length, which a Trainer sets only after attach
        total = schedule_length(handle, "ADMM") if handle.step else 1
        return self.schedule.targets(handle.forms(), handle.step, total)

    def _project(self, values: torch.Tensor, entries: int, name: str) -> torch.Tensor:
        """``Z = proj_S(values)``; with ``masked_steps`` its support is kept for the next update to prune to."""
        mask = top_mask(values, entries, self.block)
        if self.config.masked_steps:
            self.support[name] = mask
        return kept(values, mask, self.config.quantise, self.config.clip, self.config.bits)

    def _latent(self, handle: "Compression") -> Latent:
        """Float latent weights of the masked retraining, snapped to the grid of ``bits`` (the width ``finish``
        recorded on the forms, checked there)."""
        forms = list(handle.forms())
        return Latent([(name, form.weight, form.mask) for name, form in forms],
                      bits={name: self.config.bits for name, _ in forms})

    def _update_every(self, handle: "Compression") -> int:
        if self.config.update_every:
            return self.config.update_every
        return max(1, schedule_length(handle, "ADMM") // self.config.updates)

    # --- every step ---------------------------------------------------------------------------------------------
    def penalty(self, handle: "Compression") -> torch.Tensor | None:
        if handle.finalized:
            return None
        total = None
        for name, form in handle.forms():
            z, u = self.z[name].to(form.weight.device), self.u[name].to(form.weight.device)
            term = (form.materialize() - z + u).square().sum()
            total = term if total is None else total + term
        return None if total is None else self.rho / 2 * total

    @torch.no_grad()
    def after_step(self, handle: "Compression") -> None:
        for _, form in handle.forms():          # masked-out weights stay exactly zero whatever the optimiser
            form.weight.mul_(form.mask)
        if handle.finalized:
            if self.latent is not None:
                self.latent.update()
            return
        if handle.step % self._update_every(handle) == 0 and handle.step <= schedule_length(handle, "ADMM"):
            self._admm_update(handle)

    @torch.no_grad()
    def _admm_update(self, handle: "Compression") -> None:
        gaps = []
        entries = self._targets(handle)
        for name, form in handle.forms():
            if self.config.masked_steps:      # what the last projection dropped, the penalty has pulled to zero
                self._mask_to(form, self.support[name].to(form.mask.device), name)
            w = form.materialize().detach()
            u = self.u[name].to(w.device)
            z = self._project(w + u, entries[name], name)
            if self.config.dual_while_tightening or entries[name] == self.final_entries[name]:
                u += w - z
            self.z[name], self.u[name] = z, u
            gaps.append(float((w - z).norm() / w.norm().clamp_min(1e-12)))
        self.rho = min(self.rho * self.config.rho_growth, self.config.rho_max)
        log.info("ADMM step %d: rho %.3g, ||W - Z|| / ||W|| median %.4f", handle.step, self.rho,
                 sorted(gaps)[len(gaps) // 2])

    def _mask_to(self, form: MaskedSparse, support: torch.Tensor, name: str) -> None:
        """Hard-prune ``form`` to ``support`` (within its mask): the entries dropped are zero from now on, in the
        weight and in the dual, so no later projection can pick them again."""
        mask = form.mask & support
        form.set_mask(mask)
        self.u[name].mul_(mask.to(self.u[name].device))

    def finish(self, handle: "Compression") -> None:
        """The hard constraint: each matrix is its projection, with the mask of its kept entries."""
        with torch.no_grad():
            for name, form in handle.forms():
                w = form.materialize().detach()
                mask = top_mask(w, self._entries(name, form), self.block)
                form.set_mask(mask)
                form.weight.copy_(kept(w, mask, self.config.quantise, self.config.clip, self.config.bits))
                if self.config.quantise:
                    form.set_value_bits(self.config.bits)
        self.z, self.u, self.support = {}, {}, {}

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        out = sparsity_summary(handle.forms(), self.config.compression) | {"final_rho": self.rho}
        if self.config.quantise:
            out["value_bits"] = self.config.bits
        return out

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "z": {k: v.cpu() for k, v in self.z.items()},
                "u": {k: v.cpu() for k, v in self.u.items()},
                "support": {k: v.cpu() for k, v in self.support.items()},
                "latent": self.latent.state_dict() if self.latent is not None else None}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        self._saved = state

    def _load(self, handle: "Compression", state: dict[str, Any]) -> None:
        self.rho = state["rho"]
        devices = {name: form.weight.device for name, form in handle.forms()}
        self.z = {k: v.to(devices[k]) for k, v in state["z"].items()}
        self.u = {k: v.to(devices[k]) for k, v in state["u"].items()}
        self.support = {k: v.to(devices[k]) for k, v in state.get("support", {}).items()}
        if state.get("latent") is not None:
            self.latent = self._latent(handle)
            self.latent.load_state_dict(state["latent"])
