"""Gradual magnitude pruning (Zhu & Gupta, 2017) to a target compression factor: ``leanlstm.Prune``, method ``prune``.

Every matrix of every compressed LSTM (``weight_hr`` of a projected one too) becomes ``MaskedSparse``; during the
compression phase the smallest-magnitude weights are masked out on the gradual schedule
(``schedules.gradual_sparsity``) until each matrix stores at most ``1 / compression`` of its dense bytes, counted
honestly as CSR: 4-byte values, 2-byte column indices (4 when a row is longer than 65536) and 4-byte row pointers.
So 20x is not 5% density but

    nnz = floor((out * in * 4 / 20 - (out + 1) * 4) / (4 + 2))   (2600x650: 54 599 entries, 3.23%)

With ``value_bits=8`` the budget counts int8 values (1 byte, plus a float32 scale per row): the matrices keep as
many entries as fit once quantised (``compress --method int8`` afterwards), the baseline of ADMM's joint pruning
and quantisation at equal bytes. ``finalize()`` sets every matrix to its final density (should the schedule have stopped early); fine-tuning then
trains the surviving weights with the mask fixed. ``nn.Linear`` heads stay dense unless ``heads`` gives them a
compression of their own: then each becomes a ``FormLinear`` pruned alike, on the same schedule, to that many times
fewer bytes (a language model's decoder is as large as its whole LSTM stack and, once the stack is compressed, most
of the per-step latency). With ``head_form="lowrank"`` the heads are instead factorised once, at ``convert``
(truncated SVD of the weight, ``W = U V``), to the largest rank whose factors fit the same budget at
``value_bits``, and then trained like every other weight (a rank-limited decoder keeps every vocabulary row, which
block pruning of unrelated rows does not). ``GradualPruning`` and the budget arithmetic are shared with the doping
methods, whose sparse part is pruned alike.

    handle = leanlstm.compress_(model, leanlstm.Prune(compression=20, total_steps=len(loader) * epochs))
    ...  loss.backward(); optimizer.step(); handle.after_step()      # masks follow the schedule
    handle.finalize()
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..graph import find_heads
from ..nn import LSTM  # noqa: F401  (the docstring examples)
from ..nn import FormLinear
from ..nn.forms import Doped as DopedForm
from ..nn.forms import BlockSparse, LowRank, MaskedSparse, WeightForm
from ..nn.forms.base import FLOAT_BYTES, VALUE_BITS
from ..nn.forms.sparse import csr_nbytes
from ..train import ConfigError, Range
from .base import COMPRESSION, STEPS, UNIT, Method, MethodConfig, named_forms, qualified
from .schedules import gradual_sparsity, phase_steps

if TYPE_CHECKING:
    from ..compress import Compression

Forms = nn.Module | Iterable[tuple[str, WeightForm]]


HEAD_FORMS = ("pruned", "lowrank")


@dataclass
class Prune(MethodConfig):
    """Gradual magnitude pruning of every LSTM matrix to ``compression`` (honest CSR bytes).

    >>> Prune(compression=20, total_steps=1000).anneal_end
    0.75
    """

    compression: float = 20.0     # target honest compression of the LSTM weight matrices (CSR bytes)
    initial_density: float = 1.0  # density when pruning starts (Zhu & Gupta's s_i = 1 - this)
    anneal_start: float = 0.0     # fraction of the schedule's steps at which pruning starts
    anneal_end: float = 0.75      # fraction at which the final density is reached
    prune_every: int = 10         # optimiser steps between pruning events (Zhu & Gupta's dt)
    total_steps: int = 0          # optimiser steps the schedule spans in a user loop (0: Trainer's phase length)
    value_bits: int = 32          # the value width the budget counts (8: sized for int8 values, to quantise after;
                                  # 4: for 4-bit values, block-sparse only)
    block: str = ""               # "16x4": prune whole blocks of 16 rows x 4 inputs (one VNNI instruction each)
    speed_check: bool = True      # time each pruned matrix against dense on the engine and warn when slower
    keep_slow_dense: bool = False  # keep the matrices that would run slower than dense dense (not pruned)
    heads: float = 0.0            # the nn.Linear heads' own compression (honest bytes, as the LSTM's); 0: stay dense
    head_form: str = "pruned"     # how heads meet it: "pruned" as the LSTMs, or "lowrank" (SVD once, then trained)

    ranges = {"compression": COMPRESSION, "initial_density": Range(0, 1, low_open=True), "anneal_start": UNIT,
              "anneal_end": UNIT, "prune_every": Range(1, 10**9, integer=True), "total_steps": STEPS,
              "heads": Range(0, 1e6)}
    choices = {"value_bits": VALUE_BITS, "head_form": HEAD_FORMS}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_anneal(self)
        parse_block(self.block)
        if 0 < self.heads < 1:
            raise ConfigError("heads", self.heads, "be 0 (the heads stay dense) or a compression of at least 1")
        if self.head_form != "pruned" and not self.heads:
            raise ConfigError("head_form", self.head_form, "be used with heads=N (the heads' compression)")
        check_4_bit_block("value_bits", self.value_bits, self.block)
        if self.value_bits == 4 and self.heads:
            raise ConfigError("value_bits", 4, "be 8 or 32 with heads=N: heads are stored in int8")

    def sparse_form(self, rows: int, cols: int) -> MaskedSparse:
        """An empty matrix of the form this config prunes into (unstructured, or block-sparse)."""
        return empty_sparse(rows, cols, parse_block(self.block))

    def sparse_from_dense(self, dense: torch.Tensor, density: float) -> MaskedSparse:
        return to_sparse(dense, density, parse_block(self.block))


def empty_sparse(rows: int, cols: int, block: tuple[int, int] | None) -> MaskedSparse:
    """An empty ``rows x cols`` sparse matrix: unstructured, or of whole ``block`` (rows, cols) blocks."""
    return MaskedSparse(rows, cols) if block is None else BlockSparse(rows, cols, *block)


def to_sparse(dense: torch.Tensor, density: float, block: tuple[int, int] | None) -> MaskedSparse:
    """``dense`` as a sparse matrix keeping its largest entries (or blocks of largest norm) at ``density``."""
    if block is None:
        return MaskedSparse.from_dense(dense, density=density)
    return BlockSparse.from_dense(dense, density=density, block_rows=block[0], block_cols=block[1])


def is_sparse_form(form: Any, block: tuple[int, int] | None) -> bool:
    """Whether ``form`` already is the sparse form ``empty_sparse(..., block)`` builds, block shape included (the
    budget arithmetic counts indices per block, so a block-sparse matrix of another block shape is converted)."""
    if block is None:
        return type(form) is MaskedSparse
    return type(form) is BlockSparse and (form.block_rows, form.block_cols) == tuple(block)


def check_anneal(config: Any) -> None:
    """The annealing window must not end before it starts."""
    if config.anneal_end < config.anneal_start:
        raise ConfigError("anneal_end", config.anneal_end, f"be at least anneal_start ({config.anneal_start})")


PruneConfig = Prune  # the name before issue 20


def byte_budget(form: WeightForm, compression: float) -> float:
    """Bytes a matrix may store to be ``compression`` times smaller than its dense float32 self."""
    if compression < 1.0:
        raise ValueError(f"compression must be at least 1, got {compression}")
    return form.out_features * form.in_features * FLOAT_BYTES / compression


def csr_entries_within(rows: int, cols: int, nbytes: float, value_bits: int = 32) -> int:
    """The most entries a ``rows x cols`` CSR matrix with values of ``value_bits`` can hold in ``nbytes`` (exactly
    as ``csr_nbytes`` counts: int8 values cost 1 byte and their row scales 4), capped at ``rows * cols``; -1 if
    even an empty one (its row pointers and scales) does not fit.

    >>> csr_entries_within(2600, 650, 2600 * 650 * 4 / 20), csr_entries_within(2600, 650, 2600 * 650 * 4 / 20, 8)
    (54599, 105732)
    """
    empty = csr_nbytes(rows, cols, 0, value_bits)
    if nbytes < empty:
        return -1
    entries = min(math.floor((nbytes - empty) * 8 / (csr_nbytes(rows, cols, 8, value_bits) - empty)), rows * cols)
    while entries > 0 and csr_nbytes(rows, cols, entries, value_bits) > nbytes:   # a sub-byte width's rounding
        entries -= 1
    return entries


def sparse_part(form: WeightForm) -> MaskedSparse | None:
    """The masked-sparse matrix a pruning schedule acts on: the form itself, or a doped form's ``D``."""
    if isinstance(form, MaskedSparse):
        return form
    if isinstance(form, DopedForm):
        return form.sparse
    return None


def final_entries(name: str, form: WeightForm, compression: float, value_bits: int | None = None) -> int:
    """Entries the sparse part of ``form`` may keep so that the whole form meets ``compression``, its values
    counted at ``value_bits`` (default: the width they have now)."""
    sparse = sparse_part(form)
    fixed = form.nbytes() - sparse.nbytes()                 # a doped form's structured part
    bits = sparse.value_bits if value_bits is None else value_bits
    budget = byte_budget(form, compression) - fixed
    if isinstance(sparse, BlockSparse):                     # whole blocks, one index a block
        entries = sparse.entries_within(budget, bits)
    else:
        entries = csr_entries_within(form.out_features, form.in_features, budget, bits)
    if entries < 0:
        raise ValueError(f"{name} ({form.out_features}x{form.in_features}) cannot reach {compression}x: its "
                         f"budget is {byte_budget(form, compression):.0f} bytes but the structured part "
                         f"({fixed} B) and the sparse part's row pointers (and scales) "
                         f"({csr_nbytes(form.out_features, form.in_features, 0, bits)} B) already "
                         f"exceed it; "
                         f"lower the compression or give the structure a smaller share")
    return entries


def as_forms(source: Forms) -> list[tuple[str, WeightForm]]:
    """``(name, form)`` pairs: those given, or every matrix of every ``leanlstm.LSTM`` in a module."""
    return named_forms(source) if isinstance(source, nn.Module) else list(source)


def weight_compression(source: Forms) -> float:
    """Dense float32 bytes of the weight matrices over the bytes their forms store (biases excluded).

    >>> weight_compression(LSTM(8, 16))
    1.0
    """
    forms = [form for _, form in as_forms(source)]
    return sum(f.out_features * f.in_features * FLOAT_BYTES for f in forms) / sum(f.nbytes() for f in forms)


def sparsity_summary(source: Forms, target: float) -> dict[str, Any]:
    """The honest weight compression, its target, and each sparse part's density."""
    forms = as_forms(source)
    densities = {name: sparse_part(form).density() for name, form in forms if sparse_part(form) is not None}
    return {"target_compression": target, "lstm_weight_compression": weight_compression(forms),
            "sparse_density": densities}


class GradualPruning:
    """Prunes every sparse part (``sparse_part``) by magnitude on Zhu & Gupta's schedule.

    Each matrix goes from ``initial_density`` at ``start`` (a fraction of the schedule's steps) to the density of
    its compression budget at ``end``, in events ``every`` steps apart. Stateless: the targets follow from the
    forms and the step, so resuming needs nothing beyond the masks (which the model's state dict holds).

    >>> lstm = LSTM(8, 16).replace_forms("sparse")
    >>> GradualPruning(compression=4.0).prune(lstm, step=100, total=100)
    >>> 4.0 <= weight_compression(lstm) < 4.05
    True
    """

    def __init__(self, compression: float, initial_density: float = 1.0, start: float = 0.0,
                 end: float = 0.75, every: int = 1, value_bits: int | None = None) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"the schedule needs 0 <= start <= end <= 1, got start={start}, end={end}")
        self.compression, self.initial_density = compression, initial_density
        self.start, self.end, self.every, self.value_bits = start, end, every, value_bits

    def targets(self, source: Forms, step: int, total: int) -> dict[str, int]:
        """Entries each sparse part should keep after ``step`` of ``total``."""
        begin, end = phase_steps(self.start, total), phase_steps(self.end, total)
        out = {}
        for name, form in as_forms(source):
            sparse = sparse_part(form)
            if sparse is None:
                continue
            numel = sparse.mask.numel()
            final = max(0.0, 1.0 - final_entries(name, form, self.compression, self.value_bits) / numel)
            initial = min(1.0 - self.initial_density, final)
            sparsity = gradual_sparsity(step, final, initial, begin, end, self.every)
            out[name] = round((1.0 - sparsity) * numel)
        return out

    @torch.no_grad()
    def prune(self, source: Forms, step: int, total: int) -> None:
        """Mask each sparse part down to its scheduled entry count (never back up)."""
        forms = dict(as_forms(source))
        for name, keep in self.targets(forms.items(), step, total).items():
            sparse = sparse_part(forms[name])
            if keep < sparse.nnz():
                keep_entries(sparse, keep)

    def prune_to_final(self, source: Forms) -> None:
        """Every sparse part at its final density (the schedule's value at the last step)."""
        self.prune(source, 1, 1)


def keep_entries(sparse: MaskedSparse, count: int) -> None:
    """Keep the ``count`` largest-magnitude entries of a sparse matrix (of a block-sparse one, the blocks of largest
    norm that ``count`` entries fill)."""
    if isinstance(sparse, BlockSparse):
        sparse.keep_blocks(min(count // sparse.block_size, sparse.nblocks()))
    else:
        sparse.prune_to(count / sparse.mask.numel())


def parse_block(text: str) -> tuple[int, int] | None:
    """``"16x4"`` -> ``(16, 4)``; ``""`` -> None (unstructured).

    >>> parse_block("16x4"), parse_block("")
    ((16, 4), None)
    """
    if not text:
        return None
    rows, sep, cols = text.partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit() or int(rows) < 1 or int(cols) < 1:
        raise ConfigError("block", text, "be ROWSxCOLS with positive whole numbers, e.g. 16x4, or empty")
    return int(rows), int(cols)


def check_4_bit_block(field: str, bits: int, block: str) -> None:
    """ConfigError when ``bits`` is 4 without a ``block``: only block-sparse forms store 4-bit values."""
    if bits == 4 and not block:
        raise ConfigError(field, 4, "be used with block=16x4: only block-sparse forms store 4-bit values")


def convert_forms(handle: "Compression", build, keep) -> None:
    """Every matrix of the handle's LSTMs that ``keep(form)`` rejects becomes ``build(name, dense)``; all forms are
    built before any is set, so a failure changes nothing. Matrices the speed guard keeps dense
    (``handle.method.kept_dense``) stay as they are."""
    converted = []
    for lstm_name, lstm in handle.lstms.items():
        for index, layer in enumerate(lstm.layers):
            for matrix, form in layer.forms():
                name = qualified(lstm_name, f"layers.{index}.weight_{matrix}")
                if not keep(form) and name not in handle.method.kept_dense:
                    dense = form.materialize().detach().cpu().float()   # fitted on the CPU, as replace_forms does
                    converted.append((layer, matrix, build(name, dense)))
    for layer, matrix, form in converted:
        layer.set_form(matrix, form)


def heads_to_convert(handle: "Compression", method: str) -> list[tuple[str, nn.Module]]:
    """The model's heads (``graph.find_heads``) for a method that compresses them; refuses a head whose weight is
    shared with another module (a decoder tied to the embedding), which compressing would silently untie."""
    heads = find_heads(handle.model)
    if not heads:
        raise ValueError(f"{method} was asked to compress the model's heads, but {type(handle.model).__name__} has "
                         f"no nn.Linear outside its LSTMs; leave heads=0")
    for name, head in heads:
        if isinstance(head, nn.Linear):
            owners = [other for other, p in handle.model.named_parameters(remove_duplicate=False)
                      if p is head.weight and other != qualified(name, "weight")]
            if owners:
                raise ValueError(f"{name}.weight is shared with {', '.join(owners)} (tied weights): {method} cannot "
                                 f"compress one without the other; untie them or leave heads=0")
    return heads


def lowrank_rank(name: str, out: int, inp: int, compression: float, value_bits: int = 32) -> int:
    """The largest rank whose two factors (``out x r`` and ``r x inp``, at ``value_bits`` with their scales) store
    at most ``1 / compression`` of the dense float32 bytes; a ``ValueError`` when not even rank 1 fits.

    >>> lowrank_rank("decoder.weight", 10000, 650, 12), lowrank_rank("decoder.weight", 10000, 650, 12, value_bits=8)
    (50, 199)
    """
    form = LowRank(1, 1, 1)
    form.set_value_bits(value_bits)
    budget = out * inp * FLOAT_BYTES / compression

    def nbytes(rank: int) -> int:
        return (form.values_nbytes(torch.empty(out, rank, device="meta"))
                + form.values_nbytes(torch.empty(rank, inp, device="meta")))

    low, high = 0, min(out, inp)
    while low < high:                       # the largest rank within the budget (bytes grow with the rank)
        middle = (low + high + 1) // 2
        low, high = (middle, high) if nbytes(middle) <= budget else (low, middle - 1)
    if low == 0:
        raise ValueError(f"{name} ({out}x{inp}) cannot reach {compression}x as a low-rank product: rank 1 stores "
                         f"{nbytes(1)} bytes against a budget of {budget:.0f}; lower the compression")
    return low


def convert_heads(handle: "Compression", heads: list[tuple[str, nn.Module]], build, keep) -> None:
    """Every head whose weight ``keep(form)`` rejects becomes a ``FormLinear`` of ``build(name, dense)`` (its bias
    kept), all built before any is installed. Heads the speed guard keeps dense (``kept_dense``) stay as they are."""
    new = {}
    for name, head in heads:
        if (isinstance(head, FormLinear) and keep(head.form)) or qualified(name, "weight") in handle.method.kept_dense:
            continue
        dense = head.weight.detach().cpu().float()
        new[name] = FormLinear.from_linear(head.to_linear() if isinstance(head, FormLinear) else head,
                                           build(qualified(name, "weight"), dense))
    handle.install(new)


def schedule_length(handle: "Compression", method: str) -> int:
    """The steps a pruning schedule spans: the config's ``total_steps``, else what ``Trainer`` set."""
    total = handle.total_steps
    if not total:
        raise ValueError(f"{method} prunes on a schedule over the optimiser steps before finalize(), but does not "
                         f"know how many there will be: pass total_steps=N in its config (leanlstm.Trainer sets it "
                         f"from its epochs)")
    return total


class PruneMethod(Method):
    """Gradual magnitude pruning of every LSTM matrix to ``compression``; fine-tuning keeps the masks."""

    name = "prune"
    Config = Prune

    def __init__(self, config: Prune | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.pruner = GradualPruning(c.compression, c.initial_density, c.anneal_start, c.anneal_end, c.prune_every,
                                     c.value_bits)
        self.head_pruner = GradualPruning(c.heads, c.initial_density, c.anneal_start, c.anneal_end, c.prune_every,
                                          c.value_bits) if c.heads and c.head_form == "pruned" else None

    def _budgets(self, handle: "Compression") -> list[tuple[str, nn.Module, float]]:
        """Every matrix this method prunes (a form, or a head not converted yet) with its compression: the LSTMs'
        and, with ``heads`` pruned, the heads'."""
        found = [(name, form, self.config.compression) for name, form in handle.forms()]
        if self.head_pruner is not None:
            found += [(qualified(name, "weight"), head, self.config.heads) for name, head in find_heads(handle.model)]
        return found

    def _head_rank(self, name: str, head: nn.Module) -> int:
        return lowrank_rank(name, head.out_features, head.in_features, self.config.heads, self.config.value_bits)

    def _lowrank_heads(self, handle: "Compression") -> list[tuple[str, nn.Module]]:
        """With ``head_form="lowrank"``: the heads to factorise (all of them; refused when tied or absent)."""
        if not self.config.heads or self.config.head_form != "lowrank":
            return []
        return heads_to_convert(handle, "Prune")

    def check(self, handle: "Compression") -> None:
        if self.head_pruner is not None:
            heads_to_convert(handle, "Prune")
        for name, matrix, compression in self._budgets(handle):  # each budget on its shape alone: fail now
            final_entries(name, self.config.sparse_form(matrix.out_features, matrix.in_features), compression,
                          self.config.value_bits)
        for name, head in self._lowrank_heads(handle):
            self._head_rank(qualified(name, "weight"), head)

    def planned_forms(self, handle: "Compression") -> list[tuple[str, WeightForm]]:
        """Each matrix magnitude-pruned at once to its final entry count (what the schedule ends at); low-rank
        heads as ``convert`` factorises them."""
        planned = []
        for name, matrix, compression in self._budgets(handle):
            dense = (matrix.materialize() if isinstance(matrix, WeightForm) else matrix.weight).detach().cpu().float()
            entries = final_entries(name, self.config.sparse_form(*dense.shape), compression, self.config.value_bits)
            sparse = self.config.sparse_from_dense(dense, 1.0)
            keep_entries(sparse, entries)
            planned.append((name, sparse))
        for name, head in self._lowrank_heads(handle):
            name = qualified(name, "weight")
            planned.append((name, LowRank.from_dense(head.weight.detach().cpu().float(), self._head_rank(name, head))))
        return planned

    def convert(self, handle: "Compression") -> None:
        density = self.config.initial_density
        block = parse_block(self.config.block)

        def build(name: str, dense: torch.Tensor) -> MaskedSparse:
            return self.config.sparse_from_dense(dense, density)

        def keep(form) -> bool:
            return is_sparse_form(form, block)

        convert_forms(handle, build, keep)
        if self.head_pruner is not None:
            convert_heads(handle, heads_to_convert(handle, "Prune"), build, keep)
        heads = self._lowrank_heads(handle)
        if heads:
            ranks = {qualified(name, "weight"): self._head_rank(qualified(name, "weight"), head) for name, head in heads}
            convert_heads(handle, heads, lambda name, dense: LowRank.from_dense(dense, ranks[name]),
                          keep=lambda form: isinstance(form, LowRank))

    def after_step(self, handle: "Compression") -> None:
        if not handle.finalized:
            total = schedule_length(handle, "Prune")
            self.pruner.prune(handle.forms(), handle.step, total)
            if self.head_pruner is not None:
                self.head_pruner.prune(handle.head_forms(), handle.step, total)

    def finish(self, handle: "Compression") -> None:
        self.pruner.prune_to_final(handle.forms())  # should the schedule have stopped early
        if self.head_pruner is not None:
            self.head_pruner.prune_to_final(handle.head_forms())

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        summary = sparsity_summary(handle.forms(), self.config.compression)
        if self.config.value_bits != 32:        # sized for narrower values than it holds yet: say what they give
            summary["budget_value_bits"] = self.config.value_bits
        if self.config.heads:
            heads = handle.head_forms()
            summary |= {"target_head_compression": self.config.heads, "head_compression": weight_compression(heads),
                        "head_density": {name: sparse_part(form).density() for name, form in heads
                                         if sparse_part(form) is not None},
                        "head_rank": {name: form.rank for name, form in heads if isinstance(form, LowRank)}}
        return summary
