"""AntMan (Rajbhandari, Shrivastava & He, arXiv 1910.01740): every LSTM matrix as a group low-rank ("sparse
low-rank") product sized to a target reduction of multiply-adds, trained by distillation from the dense model.

    handle = leanlstm.compress_(model, leanlstm.AntMan(reduction=10))       # every LSTM matrix: 10x fewer MACs
    ...  loss = (1 - w) * ce + w * soft_target_loss(logits, teacher_logits)  # your loop, the dense model as teacher

``leanlstm compress --method antman --from RUN --distill-from RUN`` does the same on a task (``--distill-from``: the
dense run as teacher). The paper's method section was not readable here (see ``nn.forms.antman``), so the
structures, the sizing rule below and the loss are our reading of its abstract and of issue 25, not its text.
Distillation is ``tasks.distill``'s Hinton loss, ``(1 - w) CE + w T^2 KL(teacher || student)``; whether AntMan
uses that loss, an MSE on logits or extra per-module ("local") terms could not be checked.

Structures (``structure``): ``grouplowrank`` (default; ``forms.GroupLowRank``), ``group`` (``forms.GroupDense``)
or ``lowrank`` (``forms.LowRank``, AntMan's plain low-rank module). For all three one product ``W x`` costs as
many multiply-adds as the form stores values, so a reduction of multiply-adds and of bytes is the same number
(``budget`` says which the user means; biases are excluded from both).

Sizing, per ``out x in`` matrix, ``M = out * in / reduction`` multiply-adds (values) at most, ``g`` ranging over the
divisors of ``gcd(out, in)`` (the forms need equal groups), ``u = g^2`` with the shuffle, else ``g``:

    group         the fewest groups g with out * in / g <= M
    grouplowrank  groups = ``groups`` when set, else the largest g with floor(M / (in + out)) >= g * min_block_rank
                  (with the shuffle every block then keeps rank >= min_block_rank; g = 1, plain low rank, when none);
                  rank = the largest multiple of u with rank * (in + out) / g <= M, capped at
                  u * min(out, in) / g (no block of higher rank than its sides)
    lowrank       rank = floor(M / (in + out))

Each lands at or just above the target: the next size up (rank + u, or the next divisor down) would not fit.
Example, 2600x650 at 10x with the shuffle: M = 169 000, floor(M / 3250) = 52, so g = 5 (g = 10 would leave blocks
of rank 5 < 8); rank 250 (blocks of rank 10): 162 500 multiply-adds, a 10.4x reduction (rank 275 would need 178 750).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..nn.forms import GroupLowRank  # noqa: F401  (the docstring examples)
from ..nn.forms import LowRank, WeightForm
from ..train import Range
from .base import COMPRESSION, MethodConfig
from .doping import FitsStructure
from .pruning import weight_compression

if TYPE_CHECKING:
    from ..compress import Compression

STRUCTURES = ("grouplowrank", "group", "lowrank")
BUDGETS = ("macs", "bytes")


@dataclass
class AntMan(MethodConfig):
    """Every LSTM matrix as AntMan's group low-rank product with ``reduction`` times fewer multiply-adds.

    >>> AntMan(reduction=10).structure
    'grouplowrank'
    """

    structure: str = "grouplowrank"   # grouplowrank | group | lowrank
    reduction: float = 10.0           # target reduction of each LSTM matrix's multiply-adds (or bytes; see budget)
    budget: str = "macs"              # macs | bytes: what reduction divides (the same for these forms)
    groups: int = 0                   # groups per matrix (a divisor of both its sizes); 0: chosen per matrix
    min_block_rank: int = 8           # grouplowrank, groups=0: the most groups whose blocks keep this rank
    shuffle: bool = True              # channel shuffle between the groups of consecutive stages
    speed_check: bool = True          # time each converted matrix against dense on the engine and warn when slower
    keep_slow_dense: bool = False     # keep the matrices that would run slower than dense dense (not converted)

    ranges = {"reduction": COMPRESSION, "groups": Range(0, 10**6, integer=True, note="0: chosen per matrix"),
              "min_block_rank": Range(1, 10**6, integer=True)}
    choices = {"structure": STRUCTURES, "budget": BUDGETS}


def multiply_adds(form: WeightForm) -> int:
    """Multiply-adds of one product ``W x`` through ``form``'s structure (the dense count for forms that do not say).
    Two groups give twice the rank for the same cost:

    >>> multiply_adds(LowRank(20, 10, rank=2)), multiply_adds(GroupLowRank(20, 10, groups=2, rank=4))
    (60, 60)
    """
    if hasattr(form, "multiply_adds"):
        return form.multiply_adds()
    if isinstance(form, LowRank):
        return form.rank * (form.out_features + form.in_features)
    return form.out_features * form.in_features


def macs_reduction(forms: list[tuple[str, WeightForm]]) -> float:
    """Dense multiply-adds of the matrices over those of their forms."""
    dense = sum(f.out_features * f.in_features for _, f in forms)
    return dense / sum(multiply_adds(f) for _, f in forms)


def _divisors(out: int, inp: int) -> list[int]:
    common = math.gcd(out, inp)
    return [g for g in range(1, common + 1) if common % g == 0]


def _largest_rank(out: int, inp: int, g: int, unit: int, values: float) -> int:
    rank = math.floor(values * g / (out + inp) / unit) * unit
    return min(rank, unit * min(out, inp) // g)


class AntManMethod(FitsStructure):
    """Converts every LSTM matrix to the configured AntMan structure sized to the target; training does the rest.

    ``distill_from_source``: runs (``leanlstm compress --from RUN``) should distil from the source model by
    default, as the paper trains its compressed models.
    """

    name = "antman"
    Config = AntMan
    has_finetune = False
    distill_from_source: ClassVar[bool] = True

    def __init__(self, config: AntMan | None = None) -> None:
        super().__init__(config)      # the config checked its ranges when it was made

    # --- sizing ---------------------------------------------------------------------------------------------
    def budget_values(self, out: int, inp: int) -> float:
        """Multiply-adds (= stored float32 values, = bytes / 4) one ``out x inp`` matrix may take."""
        return out * inp / self.config.reduction

    def structure_options(self, out: int, inp: int) -> dict[str, Any]:
        """Options of the structure for one ``out x inp`` matrix (see the module's sizing rules)."""
        c, values = self.config, self.budget_values(out, inp)
        if c.structure == "lowrank":
            rank = min(math.floor(values / (out + inp)), out, inp)
            return {"rank": self._at_least_one(rank, out, inp, values)}
        candidates = _divisors(out, inp)
        if c.groups:
            if c.groups not in candidates:
                raise ValueError(f"groups={c.groups} does not divide both sizes of a {out}x{inp} matrix; "
                                 f"divisors of both: {candidates}")
            candidates = [c.groups]
        if c.structure == "group":
            fitting = [g for g in candidates if out * inp // g <= values]
            groups = self._at_least_one(min(fitting, default=0), out, inp, values)
            return {"groups": groups, "shuffle": c.shuffle}
        lowrank = math.floor(values / (out + inp))              # the plain low-rank rank at this budget
        if not c.groups:                                          # blocks of rank lowrank / g with the shuffle
            candidates = [g for g in candidates if g == 1 or lowrank >= g * c.min_block_rank]
        sized = {}
        for g in candidates:
            unit = g * g if c.shuffle else g
            rank = _largest_rank(out, inp, g, unit, values)
            if rank >= unit:
                sized[g] = rank
        groups = max(sized, default=0)
        return {"groups": self._at_least_one(groups, out, inp, values), "rank": sized.get(groups, 0),
                "shuffle": c.shuffle}

    def _at_least_one(self, size: int, out: int, inp: int, values: float) -> int:
        if size < 1:
            raise ValueError(f"no {self.config.structure} structure of a {out}x{inp} matrix fits in {values:.0f} "
                             f"multiply-adds ({self.config.reduction}x fewer); lower the reduction"
                             + (" or change groups" if self.config.groups else ""))
        return size

    # --- hooks (form_for, fits, check, convert: FitsStructure's; the fit is a per-block truncated SVD) -----------
    def summarize(self, handle: "Compression") -> dict[str, Any]:
        forms = handle.forms()
        return {"structure": self.config.structure, "target_reduction": self.config.reduction,
                "budget": self.config.budget, "lstm_weight_compression": weight_compression(forms),
                "lstm_macs_reduction": macs_reduction(forms),
                "lstm_macs": sum(multiply_adds(f) for _, f in forms),
                "lstm_dense_macs": sum(f.out_features * f.in_features for _, f in forms),
                "structure_options": {name: form.options() for name, form in forms}}


__all__ = ["AntMan", "AntManMethod", "macs_reduction", "multiply_adds"]
