"""The latency of a whole LSTM stack, predicted from a per-layer table (``runtime.profile.LayerTable``).

A stack runs its layers one after another, so its latency per step is about the sum of its layers'. Every row of
the table times one layer as a stack of its own, which also pays the fixed cost of a run (the backend's call,
setting up the state, copying the output, amortised over the sequence): a stack pays it once, not once per layer.
That ``overhead`` is twice the smallest layer's latency less that of two such layers stacked (``OVERHEAD_KEYS``,
LSTM 1 -> 1): what the first layer costs beyond what a second one adds. A sparse matrix saves what the table says
making it alone sparse saves (``LayerTable.saving``: measured against its dense layer in the same interleaved run,
so the machine's drift between runs cancels); the savings of a layer's matrices add up (each is its own product)::

    stack = overhead + sum over layers l (each direction) of [ dense(l) - overhead
                                                               - sum over its sparse matrices m of saving(m) ]

Measured here (leanlstm engine, 35-step sequences, one thread, a loaded 2-core machine): the overhead is small,
about 0.06 us per step against 0.19 us for the 1 -> 1 layer itself (subtracting the whole small layer per extra
layer under-predicted a 3-layer stack of small layers by 31%). On seven stacks from 2 x 128 to 2 x 650, pruned
and H-LSTM included, measured on a quiet machine, the median error was 6% and the worst 12% on the engine, 10% and
15% on ONNX Runtime, every dense stack under-predicted (BENCHMARKS.md; ``prediction_error`` checks any list of
stacks against direct measurement).

With a ``LayerProfile`` as its source, the model measures every key it needs exactly once (rows written to the
profile's folder); with a fixed ``LayerTable`` it interpolates between profiled keys (``LayerTable.estimate``) and
refuses to extrapolate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..nn import LSTM
from .latency import measure
from .profile import LayerKey, LayerProfile, LayerTable, ProfileError, cell_name, layer_cell, layer_key

# the smallest layer, alone and twice stacked: a run's fixed cost is what one costs more than the second adds
ONE, TWO = LayerKey("lstm", 1, 1), LayerKey(cell_name("lstm", {"layers": 2}), 1, 1)
OVERHEAD_KEYS = (ONE, TWO)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of one direction of a stack, as the latency model sees it.

    >>> LayerSpec("lstm", 8, 16, (("hh", 0.2),)).keys()
    [LayerKey(cell='lstm', input_size=8, hidden_size=16, matrices='all', density=1.0), \
LayerKey(cell='lstm', input_size=8, hidden_size=16, matrices='hh', density=0.2)]
    """

    cell: str                                        # a LayerKey cell: name (and shaping options)
    input_size: int
    hidden_size: int
    sparse: tuple[tuple[str, float], ...] = ()       # (matrix, density) of each sparse matrix

    def keys(self) -> list[LayerKey]:
        """The dense layer's key, then one key per sparse matrix (only that matrix sparse)."""
        return [layer_key(self.cell, self.input_size, self.hidden_size)] + [
            layer_key(self.cell, self.input_size, self.hidden_size, matrix, density) for matrix, density in self.sparse]


def stack_specs(lstm: nn.Module) -> list[LayerSpec]:
    """A ``LayerSpec`` per layer and direction of a ``leanlstm.LSTM`` (or ``torch.nn.LSTM``); a pruned matrix
    counts at its density. Forms other than dense and pruned are refused by name.

    >>> [spec.hidden_size for spec in stack_specs(LSTM(8, [16, 12]))]
    [16, 12]
    """
    if isinstance(lstm, nn.LSTM):
        lstm = LSTM.from_torch(lstm)
    if not isinstance(lstm, LSTM):
        raise TypeError(f"the latency model predicts LSTM stacks (leanlstm.LSTM or torch.nn.LSTM), not a "
                        f"{type(lstm).__name__}; predict each stack of a model on its own")
    specs = []
    for index, layer in enumerate(lstm.layers):
        sparse = []
        for matrix, form in layer.forms():
            if form.name == "sparse":
                sparse.append((matrix, round(form.density(), 4)))
            elif form.name != "dense":
                raise ValueError(f"the latency model covers dense and pruned matrices; layers.{index}.weight_{matrix} "
                                 f"is a {form.name} form")
        specs.append(LayerSpec(layer_cell(layer), layer.input_size, layer.hidden_size, tuple(sparse)))
    return specs


class LatencyModel:
    """Per-step latency (us, batch 1) of LSTM stacks from a layer table, on the table's backend.

    >>> rows = [{"cell": c, "input_size": i, "hidden_size": h, "median": m}
    ...         for c, i, h, m in ((ONE.cell, 1, 1, 0.5), (TWO.cell, 1, 1, 0.75), ("lstm", 8, 16, 1.25),
    ...                            ("lstm", 16, 16, 1.5))]
    >>> model = LatencyModel(LayerTable.from_rows(rows))
    >>> model.overhead_us(), model.predict(LSTM(8, [16, 16])), model.predict(LSTM(12, 16))  # input 12: interpolated
    (0.25, 2.5, 1.375)
    """

    def __init__(self, source: LayerTable | LayerProfile) -> None:
        self.source = source

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.table([]).settings)

    def table(self, keys: list[LayerKey]) -> LayerTable:
        """The table holding ``keys``: a fixed table as it is (estimates interpolate), a profile (or any source
        with ``ensure``) measures those it lacks."""
        if isinstance(self.source, LayerTable):
            return self.source
        return self.source.ensure(keys)

    def stack_us(self, specs: Sequence[LayerSpec]) -> float:
        """The predicted latency of one stack of ``specs`` (one per layer and direction)."""
        table = self.table(list(OVERHEAD_KEYS) + [key for spec in specs for key in spec.keys()])
        layers = [self._layer_us(table, spec) for spec in specs]
        # a run's fixed cost cannot exceed what any layer costs as a stack of its own: rows profiled while the
        # machine was busier can say otherwise, and the sum would then fall below the slowest layer, or below 0
        overhead = min(self._overhead(table), *layers)
        return overhead + sum(us - overhead for us in layers)

    def overhead_us(self) -> float:
        """A run's fixed cost per step: twice the smallest layer's latency less that of two such layers stacked
        (a layer's own per-step costs, its loop and gate nonlinearities, stay with the layer), from their fastest
        samples; never below 0."""
        return self._overhead(self.table(list(OVERHEAD_KEYS)))

    @staticmethod
    def _overhead(table: LayerTable) -> float:
        # from the fastest samples: noise only ever adds, and a difference of two noisy medians is noisier still
        one, two = (table.rows[key].get("min", table.rows[key]["median"]) if key in table.rows else table.estimate(key)
                    for key in OVERHEAD_KEYS)
        return max(0.0, 2 * one - two)

    def layer_us(self, spec: LayerSpec) -> float:
        """One layer's latency as its own stack (overhead included)."""
        return self._layer_us(self.table(spec.keys()), spec)

    @staticmethod
    def _layer_us(table: LayerTable, spec: LayerSpec) -> float:
        dense_key, *sparse_keys = spec.keys()
        return max(0.0, table.estimate(dense_key) - sum(table.saving(key) for key in sparse_keys))

    def predict(self, lstm: nn.Module) -> float:
        """The predicted latency of one ``leanlstm.LSTM`` or ``torch.nn.LSTM`` stack."""
        return self.stack_us(stack_specs(lstm))


def prediction_error(models: Sequence[nn.Module], model: LatencyModel, repeats: int | None = None
                     ) -> dict[str, Any]:
    """Predicted against measured latency of each LSTM stack in ``models``, all measured now in one interleaved
    run on the table's backend with its sequence length, threads and seed (``repeats``: the table's unless given).

    Returns ``{"median": ..., "worst": ..., "backend": ..., "models": [{"predicted", "measured", "error"}, ...]}``,
    each error relative to the measured latency (0.1: 10% off).
    """
    if not models:
        raise ValueError("prediction_error needs at least one model")
    settings = model.settings
    backend = settings.get("backend", "leanlstm")
    predicted = [model.predict(m) for m in models]           # first: a profile measures what it lacks now
    labels = {str(i): m for i, m in enumerate(models)}
    result = measure(labels, backends=(backend,), seq_len=settings.get("seq_len", 35),
                     repeats=repeats or settings.get("repeats", 7), threads=settings.get("threads", 1),
                     seed=settings.get("seed", 0))
    rows = []
    for (label, _), guess in zip(labels.items(), predicted):
        measured = result["models"][label]
        if backend not in measured["backends"]:
            raise ProfileError(f"backend {backend} cannot run model {label}: {measured['errors'].get(backend)}")
        actual = measured["backends"][backend]["median"]
        rows.append({"predicted": guess, "measured": actual, "error": abs(guess - actual) / actual})
    errors = [row["error"] for row in rows]
    return {"median": float(np.median(errors)), "worst": float(max(errors)), "backend": backend, "models": rows}
