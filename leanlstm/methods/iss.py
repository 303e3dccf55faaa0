"""Intrinsic Sparse Structures (Wen et al., ICLR 2018): group Lasso over units, then remove dead units.

    handle = leanlstm.compress_(model, leanlstm.ISS(strength=0.002))
    ...  loss = task_loss + handle.penalty(); loss.backward(); optimizer.step(); handle.after_step()
    handle.finalize()            # dead units leave the LSTMs and every module reading them, in place

What a unit is comes from the cell: each cell layer's ``groups()`` lists, per group of units (an LSTM's
``hidden`` units; with ``proj_size`` also its ``proj`` units), which rows and columns of which matrices unit ``k``
owns. For a plain LSTM layer the component of hidden unit ``k`` (``rows_k = gate_rows(H, [k])``, its row in each of
the four gate blocks) is::

    weight_ih[rows_k, :]   (4 x in)   the four gate pre-activations of unit k, from the layer's input
    weight_hh[rows_k, :]   (4 x H)    ... and from the previous hidden state
    weight_hh[:, k]        (4H)       h_k fed back into the layer's own recurrence
    consumer[:, k]         (out)      h_k read by the next layer's weight_ih (both directions), or by whatever
                                      reads the stack's output: an nn.Linear, another LSTM's weight_ih, found
                                      from the module graph (``leanlstm.graph.consumers``); nothing for a bare LSTM

With a projection the hidden unit's component holds its gate rows and column ``k`` of ``weight_hr``; projection
unit ``j`` (the layer's output channel) holds row ``j`` of ``weight_hr``, column ``j`` of ``weight_hh`` and the
consumers' column ``j``. In a bidirectional stack each direction has its own units, and direction ``d``'s output
channel ``k`` is the consumers' column ``d * output_size + k``.

Neighbouring components overlap: the entry ``weight_hh[rows_k, j]`` is a gate-row entry of component k and a
column entry of component j, and the regulariser counts it in both, as the paper does. Within one component the
four entries ``weight_hh[rows_k, k]`` count once (Wen et al.'s code adds row and column sums and so counts them
twice; the difference is 4 entries of thousands).

Biases are not in the components and the LSTM's input width is never reduced. Training adds
``strength * sum_k sqrt(||component_k||^2 + eps)`` to the task loss and, after every optimiser step, sets the
component weights of magnitude at most ``threshold`` to exactly zero, and also every whole component whose
root-mean-square entry is at most ``threshold`` (``group_rule``). The second rule is ours: with the element rule
alone, collapsed components hover just above zero because the unit's bias-driven output keeps feeding task
gradient into its consumer column (measured on PTB medium, lambda 0.05: after one epoch half the first layer's
components had norm < 0.031 over 10,396 entries, yet only 18 were exactly zero). ``group_rule=False`` gives the
element rule alone, as published. A unit whose whole component is zero still has a (bias-driven) h_k, but nothing
reads it, so ``shrink`` slices it out of every matrix and bias and the smaller dense model has the same outputs.

One stack has one size per layer (both directions) and one ``proj_size``: where directions or layers lose
different numbers of units, the one that lost more keeps some of its dead (all-zero) units, which changes
nothing the model computes. A layer that lost every unit keeps one. An LSTM whose output no module reads (a bare
LSTM, or one whose output the model returns) loses its dead top-layer channels from that output.

``shrink_each_epoch`` (ours, for speed) removes dead units at every epoch end instead of once after training,
so the later epochs train the smaller model: on PTB the structure is mostly decided in the first epoch, so the
run costs a fraction of the dense model's training. It differs from the published schedule in two ways. A dead
unit can no longer come back to life: in five PTB small runs (13 epochs each) none did; the count of surviving
units per layer only fell, epoch after epoch. And the group rule's root-mean-square is taken over the smaller
component (the dead neighbours' rows and columns no longer count), so it fires somewhat later: removing 300 of
650 first-layer units raises a survivor's RMS by about 14%. ``benchmarks/sweeps/ptb-small-iss.txt`` measures
the net effect against the published schedule at the same strength.

The PTB task loss is summed over the unrolled steps and averaged over the batch, as in the paper, so the
paper's lambda (``strength``) transfers unchanged.

**Steering ISS: targets, any optimiser.** A fixed strength has a cliff: in a user's 2x128 keyword spotter one
strength kept all 128 units of a layer and the next one tried left 5. ``target_params=N`` (LSTM parameters
after the shrink, biases included, as ``dense_lstm_params`` counts them) or ``target_latency_us=T`` (per-step
engine latency of the LSTM stacks) makes the handle search the strength while training, with a controller:

- every ``adapt_every`` steps in which no unit died, the strength grows by ``adapt_rate`` (from ``strength``);
- a step never removes more units than the target allows: if thresholding would leave fewer parameters than
  the target, the units that died in that step with the largest norms before it get their weights back;
- once removing any one more unit would cross the target, the strength drops to 0 (the term and the proximal
  step stop) and the handle logs that the target is reached; the model then trains at that size.

A unit, once dead, stays dead in these modes (its component is zeroed after every step): Adam moves every entry
by about its learning rate whatever the gradient's scale, so a zeroed component would otherwise grow back at once.

``proximal=True`` replaces the loss term by a proximal step that does not depend on the optimiser being SGD:
after every ``optimizer.step()`` (whatever it is, Adam included) each component is group-soft-thresholded,
``w_k <- w_k * max(0, 1 - lr * strength / ||w_k||)``, the proximal operator of ``lr * strength * ||w_k||``.
This is exact for SGD at learning rate ``lr``; under Adam, whose steps are about ``lr`` per entry, a component
survives only while the task keeps moving it by more than ``lr * strength`` a step, so ``strength`` reads as a
norm per step relative to ``lr`` (set ``lr`` to the optimiser's). A component whose norm falls below the shrink
becomes exactly zero, so no hovering above the threshold. Latency targets are turned into a parameter target
from the engine's measured latency at the current sizes (latency of these matvec-bound stacks grows about
linearly with parameters), re-measured at every epoch end.

When an epoch ends with no unit removed and the components' summed norm not shrinking (by 1% or more), the
handle warns that nothing is being removed: the strength is too weak for this optimiser and learning rate.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..graph import consumers, find_lstms, replace_module, trace
from ..nn import LSTM, Dense, FormLinear
from ..nn.lstm import dense_lstm_params
from ..train import ConfigError, Range
from .base import Method, MethodConfig, qualified

if TYPE_CHECKING:
    from ..compress import Compression

log = logging.getLogger(__name__)
PLOT = "components.png"


@dataclasses.dataclass
class ISS(MethodConfig):
    """Group Lasso over the units of every LSTM layer, thresholding after each step; ``finalize()`` removes the
    dead units.

    >>> ISS(strength=0.002).threshold
    0.0001
    """

    strength: float = 0.00245   # lambda of the group-Lasso term (Wen et al.'s PTB value; same loss scaling here)
    threshold: float = 1e-4     # after every step |w| <= threshold becomes 0 (Wen et al.: 1e-4); see hover_level
    eps: float = 1e-8           # inside each component's sqrt: finite (zero) gradient for an all-zero component
    group_rule: bool = True     # also zero whole components whose RMS entry is <= threshold (see module doc)
    shrink_each_epoch: bool = False  # remove dead units at every epoch end, so later epochs train a smaller model
    proximal: bool = False      # group soft-thresholding after each optimiser step (Adam too) instead of the loss term
    lr: float = 1e-3            # proximal: the shrink per step is lr * strength (give the optimiser's learning rate)
    target_params: int = 0      # LSTM parameters to stop at (after the shrink, biases included); 0: strength alone
    target_latency_us: float = 0.0  # per-step engine latency of the LSTM stacks to stop at; 0: none
    adapt_every: int = 20       # with a target: steps between strength increases while no unit dies
    adapt_rate: float = 1.25    # with a target: the factor of each increase

    ranges = {"strength": Range(0, 10), "threshold": Range(0, 1, note="weights at or below it become 0"),
              "eps": Range(1e-30, 1, note="smaller ones round to 0 in float32: NaN gradients"),
              "lr": Range(0, 10, low_open=True), "target_params": Range(0, 10**12, integer=True),
              "target_latency_us": Range(0, 1e9), "adapt_every": Range(1, 10**9, integer=True),
              "adapt_rate": Range(1, 100, low_open=True)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params and self.target_latency_us:
            raise ConfigError("target_latency_us", self.target_latency_us, "be 0 when target_params is given "
                              "(give one target)")
        if (self.target_params or self.target_latency_us) and self.strength == 0:
            raise ConfigError("strength", self.strength, "be > 0 with a target (the search starts from it)")

    @property
    def targeted(self) -> bool:
        return bool(self.target_params or self.target_latency_us)


ISSConfig = ISS  # the name before issue 20


# --- components ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Slice:
    """Entries of one dense matrix that units own: ``index`` along ``dim``, entry ``index[j]`` owned by unit
    ``owner[j]`` (the gate rows of unit k, its column, a consumer's column)."""

    name: str              # the parameter's qualified name, e.g. "rnn.layers.0.weight_ih.weight" or "fc.weight"
    weight: torch.Tensor   # (out, in)
    dim: int
    index: torch.Tensor
    owner: torch.Tensor


@dataclasses.dataclass
class Overlap:
    """Entries ``weight[rows[j], cols[j]]`` that two slices of one component both hold, for unit ``owner[j]``:
    counted once (a unit's gate rows cross its own column of ``weight_hh``)."""

    weight: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    owner: torch.Tensor


Memo = dict[tuple[int, int], torch.Tensor]


@dataclasses.dataclass
class Components:
    """The ISS components of one group of units of one cell layer: unit ``k`` owns its entries in every slice."""

    lstm: str        # qualified name of the LSTM module ("" for a bare LSTM)
    layer: int       # flat layer index, l * D + d
    group: str       # the cell's group name: "hidden", "proj"
    size: int
    output: bool     # unit k is the layer's output channel k
    slices: list[Slice]
    overlaps: list[Overlap]

    def per_unit(self, values: Callable[[torch.Tensor], torch.Tensor], memo: Memo | None = None) -> torch.Tensor:
        """``sum of values(w)`` over each unit's entries (shared entries once): shape (size,), differentiable.
        ``memo`` shares the row and column sums of a matrix between the components that slice it."""
        memo = {} if memo is None else memo
        total = self.slices[0].weight.new_zeros(self.size)
        for part in self.slices:
            sums = _sums(part.weight, part.dim, values, memo)              # one value per row (dim 0) or column
            total = total.index_add(0, part.owner, sums[part.index])
        for shared in self.overlaps:
            total = total.index_add(0, shared.owner, -values(shared.weight)[shared.rows, shared.cols])
        return total

    def squared_norms(self, memo: Memo | None = None) -> torch.Tensor:
        """``||component_k||^2`` for every unit k, differentiable: shape (size,)."""
        return self.per_unit(torch.square, memo)

    def nonzeros(self) -> torch.Tensor:
        """Nonzero entries of each component: shape (size,). A unit is dead when its count is 0."""
        with torch.no_grad():
            return self.per_unit(lambda w: (w != 0).to(w.dtype))

    def entries(self, unit: int) -> dict[str, set[tuple[int, int]]]:
        """``{parameter name: {(row, col), ...}}``: the explicit entries of one component (tests, docs)."""
        out: dict[str, set[tuple[int, int]]] = {}
        for part in self.slices:
            picked = part.index[part.owner == unit].tolist()
            other = range(part.weight.shape[1 - part.dim])
            cells = {(i, j) if part.dim == 0 else (j, i) for i in picked for j in other}
            out.setdefault(part.name, set()).update(cells)
        return out

    @torch.no_grad()
    def zero_where_(self, dead: torch.Tensor) -> None:
        """Zero the components of the units where the bool tensor ``dead`` (size,) is true; on the device, without
        reading ``dead`` back (no synchronisation in the training step)."""
        for part in self.slices:
            keep = (~dead[part.owner]).to(part.weight.dtype)
            scale = part.weight.new_ones(part.weight.shape[part.dim]).scatter_reduce(0, part.index, keep, "amin")
            part.weight.mul_(scale.view((-1, 1) if part.dim == 0 else (1, -1)))

    @torch.no_grad()
    def scale_(self, factor: torch.Tensor) -> None:
        """Multiply each unit's component by ``factor`` (size,), in place (an entry two slices share, both)."""
        for part in self.slices:
            ones = part.weight.new_ones(part.weight.shape[part.dim])
            scale = ones.scatter_reduce(0, part.index, factor[part.owner].to(part.weight.dtype), "prod")
            part.weight.mul_(scale.view((-1, 1) if part.dim == 0 else (1, -1)))

    @torch.no_grad()
    def restore_(self, unit: int, saved: dict[int, torch.Tensor]) -> None:
        """Copy unit ``unit``'s component entries back from ``saved`` (``id(weight)`` -> a copy of that weight)."""
        for part in self.slices:
            picked = part.index[part.owner == unit]
            part.weight.index_copy_(part.dim, picked, saved[id(part.weight)].index_select(part.dim, picked))

    @torch.no_grad()
    def zero_(self, units: torch.Tensor) -> None:
        """Zero the whole components of ``units`` (a 1-D index tensor), in place."""
        for part in self.slices:
            picked = part.index[torch.isin(part.owner, torch.as_tensor(units, dtype=torch.long).to(part.owner.device))]
            part.weight.index_fill_(part.dim, picked, 0.0)


def _sums(weight: torch.Tensor, dim: int, values: Callable, memo: Memo) -> torch.Tensor:
    key = (id(weight), dim)
    if key not in memo:
        memo[key] = values(weight).sum(1 - dim)
    return memo[key]


def _unit_index(index_fn: Callable[[torch.Tensor], torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, owner)`` of a group part: the cell gives indices for any unit set, so ask unit by unit (once)."""
    per_unit = [index_fn(torch.tensor([unit])).flatten().cpu() for unit in range(size)]
    counts = torch.tensor([len(indices) for indices in per_unit])
    return torch.cat(per_unit), torch.repeat_interleave(torch.arange(size), counts)


def _overlaps(slices: list[Slice]) -> list[Overlap]:
    """Entries that a row slice and a column slice of the same matrix both give to one unit."""
    found = []
    for rows in slices:
        for cols in slices:
            if rows.dim == 0 and cols.dim == 1 and rows.weight is cols.weight:
                r_index, r_owner, c_index, c_owner = (t.cpu() for t in (rows.index, rows.owner, cols.index, cols.owner))
                r, c, o = [], [], []
                for unit in torch.unique(r_owner).tolist():
                    mine_r, mine_c = r_index[r_owner == unit], c_index[c_owner == unit]
                    r.append(mine_r.repeat_interleave(len(mine_c)))
                    c.append(mine_c.repeat(len(mine_r)))
                    o.append(torch.full((len(mine_r) * len(mine_c),), unit))
                if r:
                    device = rows.weight.device
                    found.append(Overlap(rows.weight, *(torch.cat(t).to(device) for t in (r, c, o))))
    return found


# --- where a model's units are -------------------------------------------------------------------------------
Reader = tuple[str, torch.Tensor]   # (parameter name, dense weight whose columns read the stack's output)


def _dense_weight(module: nn.Module, prefix: str, matrix: str, what: str) -> torch.Tensor:
    form = module.form(matrix)
    if not isinstance(form, Dense):
        raise ValueError(f"ISS removes whole rows and columns of dense matrices, but {prefix}.weight_{matrix} is a "
                         f"{type(form).__name__} form ({what}). Apply ISS before other methods, or convert it with "
                         f"lstm.replace_forms('dense')")
    return form.weight


def input_columns(name: str, module: nn.Module) -> list[Reader]:
    """The weights of ``module`` (an nn.Linear or an LSTM) whose columns read its input."""
    if isinstance(module, nn.Linear):
        return [(qualified(name, "weight"), module.weight)]
    if isinstance(module, nn.LSTM):
        suffixes = ("_l0", "_l0_reverse") if module.bidirectional else ("_l0",)
        return [(qualified(name, f"weight_ih{s}"), getattr(module, f"weight_ih{s}")) for s in suffixes]
    if isinstance(module, LSTM):
        return [(qualified(name, f"layers.{d}.weight_ih.weight"),
                 _dense_weight(module.layer(0, d), qualified(name, f"layers.{d}"), "ih", "it reads an ISS output"))
                for d in range(module.num_directions)]
    raise TypeError(f"cannot narrow the input of a {type(module).__name__}")


def input_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.input_size


def find_readers(model: nn.Module, name: str, lstm: LSTM, resolve: Callable[[str], nn.Module],
                 graph: fx.GraphModule | None = None, compressed: tuple[str, ...] = ()) -> list[str]:
    """Names of the modules reading LSTM ``name``'s output, each an nn.Linear or an LSTM as wide as that output;
    anything else that reads it is refused with its name (ISS could not narrow it). ``compressed``: the LSTMs ISS
    itself compresses (shrunk, not only narrowed)."""
    if not name:
        return []
    readers = []
    for link in consumers(model, name, graph):
        if link.how == "opaque":
            raise ValueError(f"ISS cannot remove units of {name!r}: its output reaches {link.ops[-1]!r}, an "
                             f"operation that mixes or drops channels. ISS follows the output through dropout, "
                             f"activations, views and time slicing to nn.Linear or LSTM modules")
        if link.module is None:           # the model returns the output (narrows with it) or the state
            if link.how == "output":
                log.warning("ISS: %s's output is the model's own output; removed top-layer units narrow it", name)
            continue
        if link.how == "state":
            raise ValueError(f"ISS cannot remove units of {name!r}: {link.name!r} reads its returned state (h_n or "
                             f"c_n), whose channels ISS cannot follow; read the output instead (e.g. out[:, -1])")
        module = resolve(link.name)
        if not isinstance(module, (nn.Linear, nn.LSTM, LSTM)):
            raise ValueError(f"ISS cannot remove units of {name!r}: its output is read by {link.name!r}, a "
                             f"{type(module).__name__}; ISS narrows the inputs of nn.Linear and LSTM modules only")
        if input_width(module) != lstm.output_size:
            raise ValueError(f"ISS cannot remove units of {name!r}: {link.name!r} reads {input_width(module)} "
                             f"features, not the {lstm.output_size} channels of its output (a reshape?)")
        input_columns(link.name, module)   # a compressed (non-dense) reader is refused here, by name
        if isinstance(module, LSTM) and link.name not in compressed:   # narrowing rebuilds its first layer densely
            for d in range(module.num_directions):
                for matrix, _ in module.layer(0, d).forms():
                    _dense_weight(module.layer(0, d), qualified(link.name, f"layers.{d}"), matrix,
                                  "ISS narrows its input, rebuilding its first layer densely")
        readers.append(link.name)
    return readers


def layer_components(lstm_name: str, lstm: LSTM, readers: list[Reader]) -> list[Components]:
    """Every group of every cell layer of one stack; the top layer's output groups reach into ``readers``."""
    found, D = [], lstm.num_directions
    for flat, layer in enumerate(lstm.layers):
        l, d = divmod(flat, D)
        prefix = qualified(lstm_name, f"layers.{flat}")
        for group in layer.groups():
            slices = []
            for matrix, dim, index_fn in group.parts:
                weight = _dense_weight(layer, prefix, matrix, "ISS removes its units")
                index, owner = _unit_index(index_fn, group.size)
                slices.append(Slice(f"{prefix}.weight_{matrix}.weight", weight, dim, index.to(weight.device),
                                    owner.to(weight.device)))
            if group.output:
                if l + 1 < lstm.num_layers:   # the next layer's directions all read [forward | reverse]
                    nxt = [(qualified(lstm_name, f"layers.{(l + 1) * D + e}.weight_ih.weight"),
                            _dense_weight(lstm.layer(l + 1, e), qualified(lstm_name, f"layers.{(l + 1) * D + e}"),
                                          "ih", "ISS removes its units"))
                           for e in range(D)]
                else:
                    nxt = readers
                units = torch.arange(group.size)
                columns = units + d * layer.output_size       # direction d's channels in [forward | reverse]
                slices += [Slice(name, weight, 1, columns.to(weight.device), units.to(weight.device))
                           for name, weight in nxt]
            found.append(Components(lstm_name, flat, group.name, group.size, group.output, slices,
                                    _overlaps(slices)))
    return found


class UnitMap:
    """The ISS components of a model's LSTMs (``names``), given the modules that read each one's output."""

    def __init__(self, model: nn.Module, readers: dict[str, list[str]]) -> None:
        self.model, self.readers = model, readers
        self._counts: list[torch.Tensor] | None = None
        self.lstms = {name: submodule(model, name) for name in readers}
        resolve = lambda name: submodule(model, name)  # noqa: E731
        self.components = [c for name, lstm in self.lstms.items()
                           for c in layer_components(name, lstm, [r for reader in readers[name]
                                                                  for r in input_columns(reader, resolve(reader))])]

    @classmethod
    def of(cls, model: nn.Module) -> "UnitMap":
        """Every ``leanlstm.LSTM`` in ``model``, readers found from its module graph."""
        lstms = [(name, lstm) for name, lstm in find_lstms(model) if isinstance(lstm, LSTM)]
        if not lstms:
            raise TypeError(f"ISS works on leanlstm.LSTM modules; {type(model).__name__} holds none (convert a "
                            f"torch.nn.LSTM with leanlstm.LSTM.from_torch, or use leanlstm.compress_)")
        graph = trace(model) if any(name for name, _ in lstms) else None
        names = tuple(name for name, _ in lstms)
        return cls(model, {name: find_readers(model, name, lstm, lambda n: submodule(model, n), graph, names)
                           for name, lstm in lstms})

    def entry_counts(self) -> list[torch.Tensor]:
        """Entries of each component, per group (they change only with the structure)."""
        if self._counts is None:
            with torch.no_grad():
                self._counts = [group.per_unit(torch.ones_like) for group in self.components]
        return self._counts

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every matrix that lies in some component, once."""
        seen: dict[int, tuple[str, torch.Tensor]] = {}
        for group in self.components:
            for part in group.slices:
                seen.setdefault(id(part.weight), (part.name, part.weight))
        return list(seen.values())

    def of_layer(self, layer: int, lstm: str | None = None, group: str | None = None) -> Components:
        """The components of one group (default: the first) of flat layer ``layer`` of LSTM ``lstm`` (default: the
        only one)."""
        if lstm is None:
            if len(self.lstms) != 1:
                raise ValueError(f"the model has several LSTMs ({', '.join(self.lstms)}); name one")
            lstm = next(iter(self.lstms))
        matches = [c for c in self.components if c.lstm == lstm and c.layer == layer
                   and (group is None or c.group == group)]
        if not matches:
            raise ValueError(f"no group {group or ''!r} in layer {layer} of LSTM {lstm!r}")
        return matches[0]


def submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def components(model: nn.Module) -> list[Components]:
    """The ISS components of every ``leanlstm.LSTM`` in ``model``, one entry per group of units per cell layer.

    >>> layers = components(LSTM(3, [2, 4]))
    >>> [(c.layer, c.group, c.size) for c in layers], [s.name for s in layers[0].slices][-1]
    ([(0, 'hidden', 2), (1, 'hidden', 4)], 'layers.1.weight_ih.weight')
    """
    return UnitMap.of(model).components


def group_lasso(groups: list[Components], eps: float = 1e-8) -> torch.Tensor:
    """``sum over groups and units of sqrt(||component||^2 + eps)`` (multiply by the strength yourself)."""
    memo: Memo = {}
    return sum(torch.sqrt(group.squared_norms(memo) + eps).sum() for group in groups)


def surviving(source: nn.Module | list[Components]) -> list[int]:
    """Number of units per group (per cell layer) whose component still has a nonzero entry."""
    groups = components(source) if isinstance(source, nn.Module) else source
    return [int((group.nonzeros() > 0).sum()) for group in groups]


@torch.no_grad()
def threshold_(units: UnitMap, threshold: float, group_rule: bool = False) -> None:
    """Set component weights with ``|w| <= threshold`` to exactly zero, in place (biases and embeddings stay).

    With ``group_rule`` also zero every whole component whose root-mean-square entry is at most ``threshold``
    (group by group: a removed component changes its neighbours' norms).
    """
    if group_rule:
        for group, entries in zip(units.components, units.entry_counts()):
            group.zero_where_(group.squared_norms() <= threshold**2 * entries)
    for _, weight in units.weights():
        weight.copy_(nn.functional.hardshrink(weight, threshold))  # 2-3x faster than masked_fill_


@torch.no_grad()
def zero_components_(model: nn.Module, layer: int, units: list[int], lstm: str | None = None,
                     group: str | None = None) -> nn.Module:
    """Zero the whole components of ``units`` of flat layer ``layer`` (group ``group``, default the first; LSTM
    ``lstm``, default the only one), consumer columns included, in place: to test or to prune by hand."""
    UnitMap.of(model).of_layer(layer, lstm, group).zero_(torch.as_tensor(units, dtype=torch.long))
    return model


@torch.no_grad()
def proximal_(units: UnitMap, shrink: float) -> None:
    """Group soft-thresholding, the proximal step of ``shrink * sum_k ||w_k||``: each component scaled by
    ``max(0, 1 - shrink / ||w_k||)`` (exactly zero when its norm is at most ``shrink``), in place, group by group.

    >>> lstm = LSTM(2, 3)
    >>> proximal_(UnitMap.of(lstm), shrink=100.0); surviving(lstm)
    [0]
    """
    for group in units.components:
        norms = group.squared_norms().sqrt()
        group.scale_(torch.clamp(1.0 - shrink / norms.clamp_min(1e-30), min=0.0))


def alive_units(units: UnitMap) -> list[torch.Tensor]:
    """Per group, a bool tensor (size,): which units' components still have a nonzero entry."""
    return [group.nonzeros() > 0 for group in units.components]


def projected_sizes(units: UnitMap, alive: list[torch.Tensor]) -> dict[str, tuple[list[int], int]]:
    """``{lstm name: (hidden sizes, proj_size)}`` that ``shrink`` would leave with units ``alive`` (one size per
    layer: the direction with more survivors; at least one unit; more hidden units than projections)."""
    sizes = {}
    for name, lstm in units.lstms.items():
        hidden, proj = [1] * lstm.num_layers, 1 if lstm.proj_size else 0
        for group, mask in zip(units.components, alive):
            if group.lstm == name:
                count = max(int(mask.sum()), 1)
                if group.group == "proj":
                    proj = max(proj, count)
                else:
                    layer = group.layer // lstm.num_directions
                    hidden[layer] = max(hidden[layer], count)
        sizes[name] = ([max(h, proj + 1) for h in hidden] if proj else hidden, proj)
    return sizes


def projected_params(units: UnitMap, sizes: dict[str, tuple[list[int], int]]) -> int:
    """LSTM parameters (biases included, every matrix dense) of the stacks at ``sizes`` (``projected_sizes``)."""
    return sum(dense_lstm_params(lstm.input_size, sizes[name][0], lstm.bias, proj_size=sizes[name][1],
                                 bidirectional=lstm.bidirectional) for name, lstm in units.lstms.items())


def can_remove_one(units: UnitMap, sizes: dict[str, tuple[list[int], int]], target: int) -> bool:
    """Whether removing one more hidden unit from some layer still leaves at least ``target`` parameters."""
    for name, (hidden, proj) in sizes.items():
        for layer, size in enumerate(hidden):
            if size > max(proj + 1, 1):
                smaller = dict(sizes) | {name: (hidden[:layer] + [size - 1] + hidden[layer + 1:], proj)}
                if projected_params(units, smaller) >= target:
                    return True
    return False


# --- removal ------------------------------------------------------------------------------------------------
def kept_units(lstm: LSTM, groups: list[Components]) -> dict[tuple[int, str], torch.Tensor]:
    """Units each group of each layer keeps: the live ones, padded with dead ones so that both directions of a
    layer keep equally many (one size per layer), every layer as many projections (one ``proj_size`` per stack),
    fewer than its hidden units, and no group none."""
    alive = {(g.layer, g.group): torch.nonzero(g.nonzeros() > 0).flatten().cpu() for g in groups}
    sizes = {(g.layer, g.group): g.size for g in groups}
    D = lstm.num_directions
    count = {}
    for (flat, name), units in alive.items():
        key = (flat // D, name)
        count[key] = max(count.get(key, 1), len(units))
    if lstm.proj_size:
        shared = max(n for (_, name), n in count.items() if name == "proj")
        for key in count:
            count[key] = shared if key[1] == "proj" else max(count[key], shared + 1)
    keep = {}
    for (flat, name), units in alive.items():
        live = set(units.tolist())
        dead = [u for u in range(sizes[(flat, name)]) if u not in live]
        padding = dead[:count[(flat // D, name)] - len(live)]
        keep[(flat, name)] = torch.tensor(sorted(live | set(padding)), dtype=torch.long)
    for (flat, name), units in keep.items():
        if len(units) > len(alive[(flat, name)]):
            log.info("ISS: layer %d of %r keeps %d dead %s units to match its stack", flat, groups[0].lstm,
                     len(units) - len(alive[(flat, name)]), name)
    return keep


def output_channels(lstm: LSTM, keep: dict[tuple[int, str], torch.Tensor], layer: int) -> torch.Tensor:
    """Columns of layer ``layer``'s output ([forward | reverse]) that stay."""
    D, parts = lstm.num_directions, []
    for d in range(D):
        flat = layer * D + d
        group = next(g for g in lstm.layers[flat].groups() if g.output)
        parts.append(keep[(flat, group.name)] + d * lstm.layers[flat].output_size)
    return torch.cat(parts)


@torch.no_grad()
def shrunk_lstm(lstm: LSTM, keep: dict[tuple[int, str], torch.Tensor], inputs: torch.Tensor | None) -> LSTM:
    """A dense stack keeping units ``keep`` and (of the first layer) input columns ``inputs`` (None: all)."""
    D, layers = lstm.num_directions, []
    for flat, layer in enumerate(lstm.layers):
        l = flat // D
        mine = {name: units for (f, name), units in keep.items() if f == flat}
        layers.append(layer.select(mine, inputs if l == 0 else output_channels(lstm, keep, l - 1)))
    return _stack_of(lstm, layers, input_size=layers[0].input_size)


def _stack_of(lstm: LSTM, layers: list[nn.Module], input_size: int) -> LSTM:
    """A stack like ``lstm`` whose cell layers are ``layers`` (their sizes and weights)."""
    config = lstm.config() | {"input_size": input_size, "layers": [layer.config() for layer in layers],
                              "hidden_size": [layers[l * lstm.num_directions].hidden_size
                                              for l in range(lstm.num_layers)],
                              "proj_size": getattr(layers[0], "proj_size", 0)}
    reference = next(lstm.parameters())
    new = LSTM.from_config(config).to(device=reference.device, dtype=reference.dtype)
    new.layers.load_state_dict(nn.ModuleList(layers).state_dict())
    return new.train(lstm.training)


@torch.no_grad()
def narrowed(module: nn.Module, columns: torch.Tensor) -> nn.Module:
    """``module`` (an nn.Linear or an LSTM) reading only input ``columns``, computing the same function on them."""
    if isinstance(module, nn.Linear):
        small = nn.Linear(len(columns), module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        small.weight.copy_(module.weight[:, columns.to(module.weight.device)])
        if module.bias is not None:
            small.bias.copy_(module.bias)
        return small.train(module.training)
    if isinstance(module, nn.LSTM):
        small = nn.LSTM(len(columns), module.hidden_size, module.num_layers, bias=module.bias,
                        batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                        proj_size=module.proj_size, device=module.weight_ih_l0.device, dtype=module.weight_ih_l0.dtype)
        for name, parameter in module.named_parameters():
            value = parameter[:, columns.to(parameter.device)] if name.startswith("weight_ih_l0") else parameter
            small.get_parameter(name).copy_(value)
        return small.train(module.training)
    D = module.num_directions
    layers = [layer.select({g.name: torch.arange(g.size) for g in layer.groups()}, columns) if flat < D else layer
              for flat, layer in enumerate(module.layers)]
    return _stack_of(module, layers, input_size=len(columns))


@torch.no_grad()
def widened_lstm(lstm: LSTM, widths: list[int]) -> tuple[LSTM, torch.Tensor]:
    """``lstm`` with layer ``l`` grown to ``widths[l]`` hidden units (``RecurrentLayer.widened``: the same
    function, the new units read by no old unit), and where the stack's old output channels now sit
    ([forward | reverse], each direction's old units first). Layers that neither grow nor read a grown layer
    are kept as they are (their forms too); the others become dense."""
    D, layers, before = lstm.num_directions, [], None       # before: where the previous layer's outputs sit
    grown_output = lstm.input_size
    for l in range(lstm.num_layers):
        grown = []
        for d in range(D):
            layer = lstm.layers[l * D + d]
            hidden = max(widths[l], layer.hidden_size)
            if hidden == layer.hidden_size and before is None:
                grown.append(layer)
            else:
                width = layer.input_size if before is None else D * grown_output
                grown.append(layer.widened(hidden, width, before))
        out = grown[0].output_size
        positions = torch.cat([torch.arange(lstm.layers[l * D + d].output_size) + d * out for d in range(D)])
        grown_output = out
        before = None if out == lstm.layers[l * D].output_size else positions
        layers += grown
    return _stack_of(lstm, layers, input_size=lstm.input_size), positions


@torch.no_grad()
def widened_reader(module: nn.Module, width: int, columns: torch.Tensor) -> nn.Module:
    """``module`` (an nn.Linear, FormLinear or an LSTM) reading ``width`` inputs, its old ones at ``columns`` and
    zeros from the rest: the same function of the old inputs. A FormLinear's form is not grown: it becomes a dense
    one (logged)."""
    if isinstance(module, FormLinear):
        log.warning("a %s head widened to %d inputs becomes dense", type(module.form).__name__, width)
        return FormLinear.from_linear(widened_reader(module.to_linear(), width, columns))
    if isinstance(module, nn.Linear):
        wide = nn.Linear(width, module.out_features, bias=module.bias is not None, device=module.weight.device,
                         dtype=module.weight.dtype)
        wide.weight.zero_()
        wide.weight[:, columns.to(module.weight.device)] = module.weight
        if module.bias is not None:
            wide.bias.copy_(module.bias)
        return wide.train(module.training)
    if isinstance(module, nn.LSTM):
        module = LSTM.from_torch(module)
    D = module.num_directions
    layers = [layer.widened(input_size=width, inputs=columns) if flat < D else layer
              for flat, layer in enumerate(module.layers)]
    return _stack_of(module, layers, input_size=width)


def shrinkage(units: UnitMap) -> dict[str, nn.Module]:
    """The smaller modules that replace the LSTMs and their readers, by qualified name."""
    keep = {name: kept_units(lstm, [g for g in units.components if g.lstm == name])
            for name, lstm in units.lstms.items()}
    inputs: dict[str, torch.Tensor] = {}      # reader -> the columns it keeps
    for name, lstm in units.lstms.items():
        channels = output_channels(lstm, keep[name], lstm.num_layers - 1)
        for reader in units.readers[name]:
            if reader in inputs:
                raise ValueError(f"{reader!r} reads more than one LSTM; ISS cannot tell its columns apart")
            inputs[reader] = channels
    new = {name: shrunk_lstm(lstm, keep[name], inputs.get(name)) for name, lstm in units.lstms.items()}
    for reader, columns in inputs.items():
        present = submodule(units.model, reader)
        if reader not in new and len(columns) < input_width(present):   # a reader that loses nothing stays
            new[reader] = narrowed(present, columns)
    return new


def install(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Put ``modules`` in place; returns the model (a replaced root module: the new one)."""
    for name, new in modules.items():
        if name:
            replace_module(model, name, new)
    return modules.get("", model)


def shrink(model: nn.Module) -> nn.Module:
    """A smaller dense copy of ``model`` without the units whose whole component is zero (``model`` is left as it
    is; the handle's ``finalize()`` does the same in place).

    Every module reading a stack's output (an nn.Linear, another LSTM) loses the removed columns, so the model's
    outputs are unchanged. A bare LSTM (no reader) keeps only its surviving output channels. States of the
    surviving units are unchanged.

    >>> lstm = zero_components_(LSTM(3, [4, 5]), layer=0, units=[1, 2])
    >>> shrink(lstm).hidden_sizes
    [2, 5]
    """
    copied = copy.deepcopy(model)
    return install(copied, shrinkage(UnitMap.of(copied)))


def hidden_sizes(lstms: dict[str, LSTM]) -> list[int]:
    return [size for lstm in lstms.values() for size in lstm.hidden_sizes]


# --- choosing the strength ----------------------------------------------------------------------------------
@dataclasses.dataclass
class StrengthSearch:
    strength: float                        # weakest strength tried that reached the target (else ``high``)
    reached: bool                          # whether any tried strength reached the target
    trials: list[tuple[float, float]]      # (strength, value) in the order evaluated


def search_strength(evaluate: Callable[[float], float], target: float, low: float, high: float,
                    steps: int = 6) -> StrengthSearch:
    """Bisect ``log(strength)`` in ``[low, high]`` for the weakest strength with ``evaluate(strength) <= target``.

    ``evaluate`` returns what a strength reaches (size, parameters, latency) and must not increase with the
    strength; it is called ``steps`` times (each call is typically one ISS run), never at ``low`` or ``high``.
    The answer lies within a factor ``(high / low) ** (1 / 2**steps)`` of the exact one.

    >>> round(search_strength(lambda s: 400 / (1 + 1000 * s), target=100, low=1e-4, high=1e-1, steps=12).strength, 4)
    0.003
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    trials, best = [], None
    for _ in range(steps):
        middle = math.sqrt(low * high)
        value = float(evaluate(middle))
        trials.append((middle, value))
        if value <= target:
            high = best = middle
        else:
            low = middle
    return StrengthSearch(best if best is not None else high, best is not None, trials)


# --- the method ---------------------------------------------------------------------------------------------
class ISSMethod(Method):
    """Group Lasso over ISS components with thresholding; then remove dead units and fine-tune with zeros frozen.

    ``leanlstm compress --method iss --strength 0.002 [--from RUN] --out DIR`` trains with the regulariser
    (from scratch, as published, or from a trained baseline, faster), shrinks to a smaller dense LSTM, fine-tunes,
    and draws ``components.png`` (surviving units per layer per epoch) into the run directory.
    """

    name = "iss"
    Config = ISS

    def __init__(self, config: ISS | None = None) -> None:
        super().__init__(config)
        self.readers: dict[str, list[str]] = {}
        self.log: list[dict[str, Any]] = []       # {"phase", "epoch", "components": surviving units per group}
        self.frozen: dict[str, torch.Tensor] = {}  # fine-tuning: where each component weight is nonzero
        self._units: UnitMap | None = None
        self.strength = self.config.strength       # the strength in use: a target's controller changes it
        self.resume_strength = self.config.strength  # the strength to return to should the target move (latency)
        self.target_params = self.config.target_params  # a latency target's estimate replaces it at start
        self._alive: list[torch.Tensor] | None = None   # targets and proximal: the units alive after the last step
        self._quiet = 0                                  # steps since a unit last died
        self._epoch_mark: tuple[float, int] | None = None   # (summed component norm, alive units) at the last mark

    def units(self, handle: "Compression") -> UnitMap:
        if self._units is None or self._units.model is not handle.model or any(
                self._units.lstms[name] is not lstm for name, lstm in handle.lstms.items()):
            self._units = UnitMap(handle.model, self.readers)
        return self._units

    def check(self, handle: "Compression") -> None:
        graph = trace(handle.model) if any(handle.lstms) else None
        self.readers = {name: find_readers(handle.model, name, lstm, handle.module, graph, tuple(handle.lstms))
                        for name, lstm in handle.lstms.items()}
        for name, lstm in handle.lstms.items():
            for flat, layer in enumerate(lstm.layers):
                for group in layer.groups():   # non-dense forms are refused here, by name
                    for matrix, _, _ in group.parts:
                        _dense_weight(layer, qualified(name, f"layers.{flat}"), matrix, "ISS removes its units")
        self._units = None

    def start(self, handle: "Compression") -> None:
        self._units = None
        if not self.log:
            self.log.append({"phase": handle.phase, "epoch": 0, "components": self.surviving(handle)})
        if not handle.finalized:
            if self.config.target_latency_us and not self.target_params:
                self.target_params = self.params_for_latency(handle)
            self._epoch_mark = self._mark(handle)

    def surviving(self, handle: "Compression") -> list[int]:
        return surviving(self.units(handle).components)

    def penalty(self, handle: "Compression") -> torch.Tensor | None:
        if handle.finalized or self.config.proximal or self.strength == 0:
            return None
        return self.strength * group_lasso(self.units(handle).components, self.config.eps)

    def after_step(self, handle: "Compression") -> None:
        if not handle.finalized and (self.config.proximal or self.config.targeted):
            self._steered_step(self.units(handle))
            return
        if not handle.finalized:
            threshold_(self.units(handle), self.config.threshold, self.config.group_rule)
            return
        with torch.no_grad():   # fine-tuning: zeros stay zero
            for name, weight in self.units(handle).weights():
                weight.mul_(self.frozen[name])

    def on_epoch_end(self, handle: "Compression") -> dict[str, Any]:
        counts = self.surviving(handle)
        self.log.append({"phase": handle.phase, "epoch": handle.epoch, "components": counts})
        out: dict[str, Any] = {"iss_components": counts}
        if not handle.finalized:
            self._warn_if_stuck(handle)
            if self.config.targeted:
                out |= {"iss_strength": self.strength, "iss_target_params": self.target_params}
        if self.config.shrink_each_epoch and not handle.finalized and self._would_shrink(handle):
            self._shrink(handle)
            out["new_parameters"] = True
        if not handle.finalized and self.config.target_latency_us:
            self.target_params = self.params_for_latency(handle)   # re-measured at the sizes reached so far
        return out

    # --- steering: targets, the proximal step, a warning when nothing moves ------------------------------------
    def _steered_step(self, units: UnitMap) -> None:
        """After an optimiser step with a target or the proximal step: dead units stay dead, the proximal step
        and the thresholds, no more deaths than the target allows, then the controller (see the module doc)."""
        groups = units.components
        alive = self._alive if self._alive is not None and [len(a) for a in self._alive] == [g.size for g in groups] \
            else alive_units(units)
        for group, mask in zip(groups, alive):
            group.zero_where_(~mask.to(group.slices[0].weight.device))
        target = self.target_params
        saved = {id(w): w.clone() for _, w in units.weights()} if target else {}
        norms = [group.squared_norms().detach() for group in groups] if target else []
        if self.config.proximal and self.strength > 0:
            proximal_(units, self.config.lr * self.strength)
        threshold_(units, self.config.threshold, self.config.group_rule)
        now = alive_units(units)
        if target:
            now = self._cap_deaths(units, alive, now, norms, saved, target)
        died = any(bool((before.cpu() & ~after.cpu()).any()) for before, after in zip(alive, now))
        self._alive = now
        if target:
            self._adapt(units, died, target)

    def _cap_deaths(self, units: UnitMap, before: list[torch.Tensor], after: list[torch.Tensor],
                    norms: list[torch.Tensor], saved: dict[int, torch.Tensor], target: int) -> list[torch.Tensor]:
        """Give the units that died in this step back their weights, largest norm first, until the stacks keep at
        least ``target`` parameters (a strength past the cliff removes many units in one step)."""
        after = [a.clone() for a in after]
        if projected_params(units, projected_sizes(units, after)) >= target:
            return after
        died = sorted(((float(norms[g][k]), g, k) for g, (b, a) in enumerate(zip(before, after))
                       for k in torch.nonzero(b & ~a).flatten().tolist()), reverse=True)
        for _, g, k in died:
            units.components[g].restore_(k, saved)
            after[g][k] = True
            if projected_params(units, projected_sizes(units, after)) >= target:
                break
        for group, alive in zip(units.components, after):   # a restored row also restored dead units' columns
            group.zero_where_(~alive)
        return after

    def _adapt(self, units: UnitMap, died: bool, target: int) -> None:
        """The controller: stop at the target; grow the strength while no unit dies."""
        sizes = projected_sizes(units, self._alive)
        self._quiet = 0 if died else self._quiet + 1
        if not can_remove_one(units, sizes, target):
            if self.strength > 0:
                log.info("ISS: reached the target: %d LSTM parameters (target %d), sizes %s, at strength %.4g",
                         projected_params(units, sizes), target, {n: s for n, s in sizes.items()}, self.strength)
                self.resume_strength, self.strength = self.strength, 0.0
            return
        if self.strength == 0:
            self.strength = self.resume_strength     # the target moved (a re-measured latency target)
        if self._quiet >= self.config.adapt_every:
            self.strength *= self.config.adapt_rate
            self._quiet = 0

    def _mark(self, handle: "Compression") -> tuple[float, int]:
        with torch.no_grad():
            groups = self.units(handle).components
            norm = float(sum(torch.sqrt(group.squared_norms()).sum() for group in groups))
        return norm, sum(surviving(groups))

    def _warn_if_stuck(self, handle: "Compression") -> None:
        """Warn when an epoch removed no unit and did not shrink the components' summed norm by 1% or more."""
        mark = self._mark(handle)
        if self._epoch_mark is not None and self.strength > 0 and 0 < mark[1] >= self._epoch_mark[1] \
                and mark[0] >= 0.99 * self._epoch_mark[0]:
            log.warning("ISS: nothing is being removed: epoch %d ended with %d live units, as many as before, and "
                        "the components' summed norm did not shrink (%.4g -> %.4g). Strength %.3g is too weak for "
                        "this optimiser and learning rate: raise it, use proximal=True (any optimiser), or give "
                        "target_params", handle.epoch, mark[1], self._epoch_mark[0], mark[0], self.strength)
        self._epoch_mark = mark

    def params_for_latency(self, handle: "Compression") -> int:
        """The parameter target of ``target_latency_us``: the engine's per-step latency of dense stacks at the sizes
        the live units give, scaled linearly in parameters to the target."""
        from ..runtime.latency import latency

        units = self.units(handle)
        sizes = projected_sizes(units, self._alive or alive_units(units))
        measured = 0.0
        for name, lstm in units.lstms.items():
            dense = LSTM(lstm.input_size, sizes[name][0], proj_size=sizes[name][1], bidirectional=lstm.bidirectional)
            measured += latency(dense, backends=("leanlstm",), seq_len=35, repeats=7)["backends"]["leanlstm"]["median"]
        params = projected_params(units, sizes)
        target = int(params * self.config.target_latency_us / measured)
        log.info("ISS: %d LSTM parameters run %.2f us per step on the engine; target %.2f us: about %d parameters",
                 params, measured, self.config.target_latency_us, target)
        return target

    def _would_shrink(self, handle: "Compression") -> bool:
        units = self.units(handle)
        for name, lstm in units.lstms.items():
            groups = [g for g in units.components if g.lstm == name]
            keep = kept_units(lstm, groups)
            if any(len(keep[(g.layer, g.group)]) < g.size for g in groups):
                return True
        return False

    def _shrink(self, handle: "Compression") -> None:
        before = hidden_sizes(handle.lstms)
        handle.install(shrinkage(self.units(handle)))
        self._units = self._alive = None
        log.info("ISS: hidden sizes %s -> %s", before, hidden_sizes(handle.lstms))

    def finish(self, handle: "Compression") -> None:
        self._shrink(handle)
        self.frozen = {name: weight != 0 for name, weight in self.units(handle).weights()}

    def on_train_begin(self, handle: "Compression", lr: float) -> None:
        if handle.finalized:
            return
        hover = self.hover_level(handle, lr)
        if self.config.threshold < hover:
            log.warning("ISS: threshold %.3g is below %.3g, the size at which entries of a collapsing component "
                        "oscillate under lr %.3g and strength %.3g; such components may never reach zero. Raise "
                        "the threshold or lower the strength", self.config.threshold, hover, lr,
                        self.config.strength)

    def hover_level(self, handle: "Compression", lr: float) -> float:
        """Typical entry size of a component whose norm oscillates at ``lr * strength`` (smallest components).

        An SGD step shrinks a component's norm by ``lr * strength``; once the norm is about that small the
        step overshoots and the entries oscillate around zero with about this size instead of settling.
        """
        entries = min(int(counts.min()) for counts in self.units(handle).entry_counts())
        return lr * self.config.strength / math.sqrt(entries)

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        first = self.log[0]["components"] if self.log else None
        units = self.units(handle)
        sizes = projected_sizes(units, alive_units(units))
        out = {"iss_hidden_sizes": hidden_sizes(handle.lstms), "iss_units_removed": self._removed(first, handle),
               "iss_components": [dict(entry) for entry in self.log], "iss_strength": self.strength,
               "iss_live_sizes": [size for hidden, _ in sizes.values() for size in hidden],
               "iss_projected_params": projected_params(units, sizes)}
        if self.config.targeted:
            out["iss_target_params"] = self.target_params
        if any(lstm.proj_size for lstm in handle.lstms.values()):
            out["iss_proj_sizes"] = [lstm.proj_size for lstm in handle.lstms.values()]
        return out

    def _removed(self, first: list[int] | None, handle: "Compression") -> list[int]:
        """Units removed per group since the handle began (each group's count in the first log entry)."""
        now = [g.size for g in self.units(handle).components]
        return [b - a for b, a in zip(first, now)] if first is not None and len(first) == len(now) else []

    def state_dict(self) -> dict[str, Any]:
        return {"components": [dict(entry) for entry in self.log], "frozen": dict(self.frozen),
                "strength": self.strength, "resume_strength": self.resume_strength,
                "target_params": self.target_params, "quiet": self._quiet}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        self.log = [dict(entry) for entry in state.get("components", [])]
        self.frozen = dict(state.get("frozen", {}))
        self.strength = state.get("strength", self.config.strength)
        self.resume_strength = state.get("resume_strength", self.config.strength)
        self.target_params = state.get("target_params", self.config.target_params)
        self._quiet = state.get("quiet", 0)
        self._units = self._alive = None
        if handle.finalized:
            shapes = {name: weight.shape for name, weight in self.units(handle).weights()}
            if {name: mask.shape for name, mask in self.frozen.items()} != shapes:
                raise ValueError("the ISS state's frozen zeros do not fit this model's weights; load the state of "
                                 "a handle made on the same model")

    def on_run_end(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        from ..report import plot_components

        try:
            plot_components(metrics, Path(run_dir) / PLOT)
        except Exception as error:  # the run is finished and saved; a missing plot must not fail it
            log.warning("ISS: could not draw %s (%s); draw it later with "
                        "leanlstm.report.plot_components('%s/metrics.json', ...)", PLOT, error, run_dir)
