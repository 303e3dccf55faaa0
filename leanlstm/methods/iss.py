"""Intrinsic Sparse Structures (Wen et al., ICLR 2018): group Lasso over hidden units, then remove dead units.

One ISS component of a layer is everything its hidden unit ``k`` touches (``rows_k = gate_rows(H, [k])``,
the row of unit k in each of the four gate blocks)::

    weight_ih[rows_k, :]   (4 x in)   the four gate pre-activations of unit k, from the layer's input
    weight_hh[rows_k, :]   (4 x H)    ... and from the previous hidden state
    weight_hh[:, k]        (4H)       h_k fed back into the layer's own recurrence
    consumer[:, k]         (out)      h_k read by the next layer's weight_ih, or by the decoder (softmax)
                                      weight for the top layer; a bare LSTM's top layer has no consumer

Neighbouring components overlap: the entry ``weight_hh[rows_k, j]`` is a gate-row entry of component k and a
column entry of component j, and the regulariser counts it in both, as the paper does. Within one component
the four entries ``weight_hh[rows_k, k]`` count once (Wen et al.'s code adds row and column sums and so counts
them twice; the difference is 4 entries of thousands).

Biases are not in the components and the embedding width is never reduced. Training adds
``strength * sum_k sqrt(||component_k||^2 + eps)`` to the task loss and, after every optimiser step, sets the
component weights of magnitude at most ``threshold`` to exactly zero, and also every whole component whose
root-mean-square entry is at most ``threshold`` (``group_rule``). The second rule is ours: with the element rule
alone, collapsed components hover just above zero because the unit's bias-driven output keeps feeding task
gradient into its consumer column (measured on PTB medium, lambda 0.05: after one epoch half the first layer's
components had norm < 0.031 over 10,396 entries, yet only 18 were exactly zero). ``group_rule=False`` gives the
element rule alone, as published. A unit whose whole component is zero
still has a (bias-driven) h_k, but nothing reads it, so ``shrink`` slices it out of every matrix and bias and
the smaller dense model has the same outputs.

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
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import LSTM, Dense
from ..nn.gates import NUM_GATES, gate_rows
from ..train import Callback
from .base import Method, MethodConfig

log = logging.getLogger(__name__)
PLOT = "components.png"


@dataclasses.dataclass
class ISSConfig(MethodConfig):
    strength: float = 0.00245   # lambda of the group-Lasso term (Wen et al.'s PTB value; same loss scaling here)
    threshold: float = 1e-4     # after every step |w| <= threshold becomes 0 (Wen et al.: 1e-4); see hover_level
    eps: float = 1e-8           # inside each component's sqrt: finite (zero) gradient for an all-zero component
    group_rule: bool = True     # also zero whole components whose RMS entry is <= threshold (see module doc)
    shrink_each_epoch: bool = False  # remove dead units at every epoch end, so later epochs train a smaller model


# --- components ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Part:
    """The entries ``rows x cols`` of the weight ``name`` (``None``: all rows or all columns)."""

    name: str
    rows: list[int] | None
    cols: list[int] | None


@dataclasses.dataclass
class LayerComponents:
    """The ISS components of one layer: one per hidden unit, over these (dense) weight matrices."""

    layer: int
    weight_ih: torch.Tensor            # (4H, in)
    weight_hh: torch.Tensor            # (4H, H)
    consumer: torch.Tensor | None      # (out, H): next layer's weight_ih or the decoder weight; None: nobody
    names: tuple[str, str, str | None]  # parameter names of the three, as in model.named_parameters()

    @property
    def hidden_size(self) -> int:
        return self.weight_hh.shape[1]

    def parts(self, unit: int) -> list[Part]:
        """The exact index sets of component ``unit``.

        The weight_hh entry (row of unit k in a gate, column j) lies in component k (a gate row of k) *and*
        in component j (column j): neighbouring components overlap there and the regulariser counts such an
        entry once in each, as the paper does. Within one component the entries (row of k, column k) are in
        both its rows and its column but are one entry, counted once.
        """
        rows = gate_rows(self.hidden_size, [unit]).tolist()
        ih, hh, consumer = self.names
        parts = [Part(ih, rows, None), Part(hh, rows, None), Part(hh, None, [unit])]
        return parts + ([Part(consumer, None, [unit])] if consumer is not None else [])

    def per_unit(self, values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``sum of values(w)`` over the entries of each component, all units at once: shape (H,)."""
        H = self.hidden_size
        ih, hh = values(self.weight_ih), values(self.weight_hh)
        rows = gate_rows(H).view(NUM_GATES, H).to(hh.device)  # rows[g, k]: row of unit k in gate block g
        total = (ih.sum(1) + hh.sum(1))[rows].sum(0)                  # (4H,) row sums -> (4, H) -> (H,)
        # column k without the entries (row of k, column k) that the gate rows above already hold
        cols = torch.arange(H, device=hh.device).expand(NUM_GATES, H)
        total = total + hh.index_put((rows, cols), hh.new_zeros(())).sum(0)
        if self.consumer is not None:
            total = total + values(self.consumer).sum(0)
        return total

    @torch.no_grad()
    def zero_(self, units: torch.Tensor) -> None:
        """Zero the whole components of ``units`` (a 1-D index tensor), in place."""
        rows = gate_rows(self.hidden_size, units).to(self.weight_hh.device)
        self.weight_ih[rows] = 0.0
        self.weight_hh[rows] = 0.0
        self.weight_hh[:, units] = 0.0
        if self.consumer is not None:
            self.consumer[:, units] = 0.0

    def squared_norms(self) -> torch.Tensor:
        """``||component_k||^2`` for every unit k, differentiable: shape (H,)."""
        return self.per_unit(torch.square)

    def nonzeros(self) -> torch.Tensor:
        """Number of nonzero entries of each component: shape (H,). A unit is dead when its count is 0."""
        with torch.no_grad():
            return self.per_unit(lambda w: (w != 0).to(w.dtype))


def _stack(model: nn.Module) -> tuple[LSTM, nn.Linear | None, str]:
    """The LSTM, the decoder consuming its top layer (or None) and the LSTM's parameter-name prefix."""
    if isinstance(model, LSTM):
        return model, None, ""
    lstm, decoder = getattr(model, "lstm", None), getattr(model, "decoder", None)
    if isinstance(lstm, LSTM) and isinstance(decoder, nn.Linear):
        return lstm, decoder, "lstm."
    raise TypeError(f"ISS works on a leanlstm.LSTM or a model with .lstm (a leanlstm.LSTM) and .decoder (an "
                    f"nn.Linear), such as WordLM; got {type(model).__name__} (convert a torch.nn.LSTM with "
                    f"leanlstm.LSTM.from_torch)")


def components(model: nn.Module) -> list[LayerComponents]:
    """The ISS components of every layer of a WordLM-like model or a bare ``leanlstm.LSTM``.

    >>> layers = components(LSTM(3, [2, 4]))
    >>> [c.hidden_size for c in layers], layers[0].names[2], layers[1].names[2]
    ([2, 4], 'layers.1.weight_ih.weight', None)
    """
    lstm, decoder, prefix = _stack(model)
    for name, form in lstm.forms():
        if not isinstance(form, Dense):
            raise ValueError(f"ISS needs dense weights, but {prefix}{name} is a {type(form).__name__} form: it "
                             f"removes whole hidden units of dense matrices. Apply ISS before other forms, or "
                             f"convert with lstm.replace_forms('dense')")
    layers = []
    for index, layer in enumerate(lstm.layers):
        top = index == lstm.num_layers - 1
        if top:
            consumer = decoder.weight if decoder is not None else None
            consumer_name = "decoder.weight" if decoder is not None else None
        else:
            consumer = lstm.layers[index + 1].weight_ih.weight
            consumer_name = f"{prefix}layers.{index + 1}.weight_ih.weight"
        names = (f"{prefix}layers.{index}.weight_ih.weight", f"{prefix}layers.{index}.weight_hh.weight",
                 consumer_name)
        layers.append(LayerComponents(index, layer.weight_ih.weight, layer.weight_hh.weight, consumer, names))
    return layers


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Every weight that lies in some component: all LSTM weight matrices and the decoder weight."""
    lstm, decoder, _ = _stack(model)
    weights = [form.weight for _, form in lstm.forms()]
    return weights + ([decoder.weight] if decoder is not None else [])


def group_lasso(model: nn.Module, eps: float = 1e-8) -> torch.Tensor:
    """``sum over layers and units of sqrt(||component||^2 + eps)`` (multiply by the strength yourself)."""
    return sum(torch.sqrt(layer.squared_norms() + eps).sum() for layer in components(model))


def surviving(model: nn.Module) -> list[int]:
    """Number of units per layer whose component still has a nonzero entry."""
    return [int((layer.nonzeros() > 0).sum()) for layer in components(model)]


@torch.no_grad()
def threshold_(model: nn.Module, threshold: float, group_rule: bool = False) -> None:
    """Set component weights with ``|w| <= threshold`` to exactly zero, in place (biases and embedding stay).

    With ``group_rule`` also zero every whole component whose root-mean-square entry is at most ``threshold``.
    """
    if group_rule:
        for group in components(model):
            rms = (group.squared_norms() / group.per_unit(torch.ones_like)).sqrt()
            dead = torch.nonzero(rms <= threshold).flatten()
            if dead.numel():
                group.zero_(dead)
    for weight in _weights(model):
        weight.copy_(nn.functional.hardshrink(weight, threshold))  # 2-3x faster than masked_fill_


@torch.no_grad()
def zero_components_(model: nn.Module, layer: int, units: list[int]) -> nn.Module:
    """Zero the whole components of ``units`` in ``layer``, in place (e.g. to test or to prune by hand)."""
    components(model)[layer].zero_(torch.as_tensor(units, dtype=torch.long))
    return model


# --- removal ------------------------------------------------------------------------------------------------
def shrink(model: nn.Module) -> nn.Module:
    """A smaller dense copy of ``model`` without the units whose whole component is zero.

    Works on a WordLM-like model (the decoder loses the removed top-layer columns; logits are unchanged) and on
    a bare ``leanlstm.LSTM`` (its top layer has no consumer, so the output keeps only the surviving channels).
    States of the surviving units are unchanged. A layer that lost every unit keeps one (all-zero) unit so the
    stack stays valid. ``model`` itself is not modified.

    >>> lstm = zero_components_(LSTM(3, [4, 5]), layer=0, units=[1, 2])
    >>> shrink(lstm).hidden_sizes
    [2, 5]
    """
    lstm, decoder, _ = _stack(model)
    keep = []
    for group in components(model):
        alive = torch.nonzero(group.nonzeros() > 0).flatten()
        if alive.numel() == 0:
            log.warning("ISS: layer %d lost every unit; keeping one all-zero unit so the stack stays valid",
                        group.layer)
            alive = torch.zeros(1, dtype=torch.long, device=alive.device)
        keep.append(alive.cpu())
    small = _sliced_lstm(lstm, keep)
    if decoder is None:
        return small
    out = copy.deepcopy(model)
    out.lstm = small
    out.decoder = _sliced_decoder(decoder, keep[-1])
    if isinstance(getattr(getattr(out, "config", None), "hidden_sizes", None), list):
        out.config.hidden_sizes = list(small.hidden_sizes)  # WordLM's LMConfig
    return out


@torch.no_grad()
def _sliced_lstm(lstm: LSTM, keep: list[torch.Tensor]) -> LSTM:
    reference = lstm.layers[0].weight_ih.weight
    small = LSTM(lstm.input_size, [len(k) for k in keep], bias=lstm.bias, batch_first=lstm.batch_first,
                 dropout=lstm.dropout).to(device=reference.device, dtype=reference.dtype)
    for index, (old, new) in enumerate(zip(lstm.layers, small.layers)):
        rows = gate_rows(old.hidden_size, keep[index])            # the kept units' rows, gate by gate
        inputs = keep[index - 1] if index else torch.arange(old.input_size)
        new.weight_ih.weight.copy_(old.weight_ih.weight[rows][:, inputs])
        new.weight_hh.weight.copy_(old.weight_hh.weight[rows][:, keep[index]])
        if old.bias_ih is not None:
            new.bias_ih.copy_(old.bias_ih[rows])
            new.bias_hh.copy_(old.bias_hh[rows])
    return small


@torch.no_grad()
def _sliced_decoder(decoder: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    small = nn.Linear(len(keep), decoder.out_features, bias=decoder.bias is not None,
                      device=decoder.weight.device, dtype=decoder.weight.dtype)
    small.weight.copy_(decoder.weight[:, keep])
    if decoder.bias is not None:
        small.bias.copy_(decoder.bias)
    return small


# --- training hooks -----------------------------------------------------------------------------------------
class ComponentLog(list):
    """``[{"phase", "epoch", "components": [per layer]}, ...]``: surviving units per layer over training."""

    def record(self, phase: str, epoch: int, model: nn.Module) -> list[int]:
        counts = surviving(model)
        self.append({"phase": phase, "epoch": epoch, "components": counts})
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"components": [dict(entry) for entry in self]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self[:] = [dict(entry) for entry in state.get("components", [])]


class _LogsComponents(Callback):
    """Records surviving components per layer at every epoch end; the log is the callback's whole state."""

    log: ComponentLog

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, Any]) -> None:
        metrics["iss_components"] = self.log.record(trainer.phase, epoch, trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return self.log.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state)


class ISSRegularizer(_LogsComponents):
    """The group-Lasso term plus thresholding after every step; also records surviving units per epoch.

    From your own loop::

        reg = ISSRegularizer(strength=0.002)
        loss = task_loss + reg.penalty(model)
        loss.backward(); optimizer.step()
        reg.threshold_(model)
    """

    def __init__(self, strength: float = 0.00245, threshold: float = 1e-4, eps: float = 1e-8,
                 log: ComponentLog | None = None, group_rule: bool = True, shrink_each_epoch: bool = False) -> None:
        self.strength, self.threshold, self.eps, self.group_rule = strength, threshold, eps, group_rule
        self.shrink_each_epoch = shrink_each_epoch
        self.log = log if log is not None else ComponentLog()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.strength * group_lasso(model, self.eps)

    def threshold_(self, model: nn.Module) -> None:
        threshold_(model, self.threshold, self.group_rule)

    def on_train_begin(self, trainer) -> None:
        if not any(entry["phase"] == trainer.phase for entry in self.log):  # not when resuming
            self.log.record(trainer.phase, 0, trainer.model)
        hover = self.hover_level(trainer.model, trainer.config.lr)
        if self.threshold < hover:
            log.warning("ISS: threshold %.3g is below %.3g, the size at which entries of a collapsing component "
                        "oscillate under lr %.3g and strength %.3g; such components may never reach zero. Raise "
                        "the threshold or lower the strength", self.threshold, hover, trainer.config.lr,
                        self.strength)

    def hover_level(self, model: nn.Module, lr: float) -> float:
        """Typical entry size of a component whose norm oscillates at ``lr * strength`` (smallest components).

        An SGD step shrinks a component's norm by ``lr * strength``; once the norm is about that small the
        step overshoots and the entries oscillate around zero with about this size instead of settling.
        """
        with torch.no_grad():
            entries = min(int(layer.per_unit(torch.ones_like).min()) for layer in components(model))
        return lr * self.strength / math.sqrt(entries)

    def extra_loss(self, trainer) -> torch.Tensor:
        return self.penalty(trainer.model)

    def after_step(self, trainer) -> None:
        self.threshold_(trainer.model)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, Any]) -> None:
        super().on_epoch_end(trainer, epoch, metrics)
        if not self.shrink_each_epoch:
            return
        alive = [max(count, 1) for count in metrics["iss_components"]]      # shrink keeps one unit of a dead layer
        if alive != list(_stack(trainer.model)[0].hidden_sizes):
            trainer.replace_model(shrink(trainer.model))


class FreezeZeros(_LogsComponents):
    """Fine-tuning: weights that are zero when training starts stay exactly zero after every step.

    Its state holds the component log too, so a run resumed while fine-tuning keeps the whole history.
    """

    def __init__(self, log: ComponentLog | None = None) -> None:
        self.log = log if log is not None else ComponentLog()
        self.masks: list[torch.Tensor] = []

    @torch.no_grad()
    def capture(self, model: nn.Module) -> None:
        """Remember where ``model``'s component weights are zero."""
        self.masks = [weight != 0 for weight in _weights(model)]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Put the remembered zeros back (call after every optimiser step)."""
        for weight, mask in zip(_weights(model), self.masks, strict=True):
            weight.mul_(mask)

    def on_train_begin(self, trainer) -> None:
        self.capture(trainer.model)

    def on_model_replaced(self, trainer) -> None:
        self.capture(trainer.model)       # a shrunk model: its zeros are the old ones, sliced

    def after_step(self, trainer) -> None:
        self.apply(trainer.model)



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
class ISS(Method):
    """Group Lasso over ISS components with thresholding; then remove dead units and fine-tune with zeros frozen.

    ``leanlstm compress --method iss --strength 0.002 [--from RUN] --out DIR`` trains with the regulariser
    (from scratch, as published, or from a trained baseline, faster), shrinks to a smaller dense LSTM, fine-tunes,
    and draws ``components.png`` (surviving units per layer per epoch) into the run directory.
    """

    name = "iss"
    Config = ISSConfig

    def __init__(self, config: ISSConfig | None = None) -> None:
        super().__init__(config)
        self.log = ComponentLog()
        c = self.config
        self.regularizer = ISSRegularizer(c.strength, c.threshold, c.eps, self.log, c.group_rule,
                                          c.shrink_each_epoch)
        self.freeze = FreezeZeros(self.log)

    def prepare(self, model: nn.Module) -> nn.Module:
        components(model)  # fails early, with the reason, on anything but dense leanlstm weights
        return model

    def callbacks(self) -> list[Callback]:
        return [self.regularizer]

    def finalize(self, model: nn.Module) -> nn.Module:
        small = shrink(model)
        log.info("ISS: hidden sizes %s -> %s", _stack(model)[0].hidden_sizes, _stack(small)[0].hidden_sizes)
        return small

    def finetune_callbacks(self) -> list[Callback]:
        return [self.freeze]

    def summary(self, model: nn.Module) -> dict[str, Any]:
        sizes = list(_stack(model)[0].hidden_sizes)
        before = self.log[0]["components"] if self.log else sizes
        return {"iss_hidden_sizes": sizes, "iss_units_removed": [b - a for b, a in zip(before, sizes)],
                "iss_components": [dict(entry) for entry in self.log]}

    def on_run_end(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        from ..report import plot_components

        try:
            plot_components(metrics, Path(run_dir) / PLOT)
        except Exception as error:  # the run is finished and saved; a missing plot must not fail it
            log.warning("ISS: could not draw %s (%s); draw it later with "
                        "leanlstm.report.plot_components('%s/metrics.json', ...)", PLOT, error, run_dir)
