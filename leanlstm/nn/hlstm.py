"""H-LSTM (Dai, Yin & Jha, *Grow and Prune Compact, Fast, and Accurate LSTMs*, arXiv 1805.11797): every control
gate, and the cell input, computed by a small network with one hidden layer instead of one affine map:

    z_k   = dropout(ReLU(W1_k [x_t; h_{t-1}] + b1_k))            k in (i, f, g, o), z_k of width w_k
    k_t   = act_k(W2_k z_k + b2_k)                               sigmoid for i, f, o; tanh for g
    c_t   = f_t * c_{t-1} + i_t * g_t;    h_t = o_t * tanh(c_t)

Stored as weight forms, so masks (grow-and-prune), doping and factorised forms apply to each:
``weight_ih`` ((w_i + w_f + w_g + w_o) x input) and ``weight_hh`` (... x H) are the four first-layer maps stacked
gate by gate (``[i|f|g|o]`` as in an LSTM), split into the input and the recurrent half so that the input half
runs for the whole sequence in one product; ``weight_i2``, ``weight_f2``, ``weight_g2``, ``weight_o2`` (H x w_k)
are the second layers. ``bias_1`` (sum of widths) and ``bias_2`` (4H) are the biases.

Training runs the recurrence in PyTorch step by step: the first layer's input half for all steps at once, the
four second layers as one batched product when their widths are equal. Dropout (``gate_dropout``) acts on the
gates' hidden activations in training only, as the paper's ``H*`` (ReLU with dropout).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from .cells import IndexFn, RecurrentLayer, UnitGroup, _same
from .forms import Dense, WeightForm
from .gates import GATES

SECOND = tuple(f"{gate}2" for gate in GATES)          # the second-layer matrices: i2, f2, g2, o2


def _widths(gate_hidden: int | Sequence[int]) -> tuple[int, ...]:
    widths = (gate_hidden,) * len(GATES) if isinstance(gate_hidden, int) else tuple(gate_hidden)
    if len(widths) != len(GATES) or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"gate_hidden must be a positive int or four positive ints (i, f, g, o), got {gate_hidden!r}")
    return widths


class HLSTMLayer(RecurrentLayer):
    """One direction of one H-LSTM layer (``cell="hlstm"``).

    >>> layer = HLSTMLayer(3, 4, gate_hidden=5)
    >>> layer.matrices, tuple(layer.weight_ih.shape), tuple(layer.weight_f2.shape)
    (('ih', 'hh', 'i2', 'f2', 'g2', 'o2'), (20, 3), (4, 5))
    >>> out, h, c = layer(torch.zeros(6, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    >>> tuple(out.shape)
    (6, 2, 4)
    """

    cell = "hlstm"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, reverse: bool = False,
                 gate_hidden: int | Sequence[int] = 64, gate_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= gate_dropout < 1.0:
            raise ValueError(f"gate_dropout must lie in [0, 1), got {gate_dropout}")
        self.input_size, self.hidden_size, self.reverse = int(input_size), int(hidden_size), bool(reverse)
        self.widths, self.gate_dropout = _widths(gate_hidden), float(gate_dropout)
        first = sum(self.widths)
        self.weight_ih: WeightForm = Dense(first, input_size)
        self.weight_hh: WeightForm = Dense(first, hidden_size)
        for name, width in zip(SECOND, self.widths):
            setattr(self, f"weight_{name}", Dense(hidden_size, width))
        self.bias_1 = nn.Parameter(torch.empty(first)) if bias else None
        self.bias_2 = nn.Parameter(torch.empty(len(GATES) * hidden_size)) if bias else None
        self.reset_parameters(self.hidden_size ** -0.5)                 # PyTorch's default

    @property
    def matrices(self) -> tuple[str, ...]:
        return ("ih", "hh") + SECOND

    @property
    def bias(self) -> bool:
        return self.bias_1 is not None

    def state_sizes(self) -> tuple[int, int]:
        return self.hidden_size, self.hidden_size

    def arguments(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "bias": self.bias,
                "reverse": self.reverse, "gate_hidden": list(self.widths), "gate_dropout": self.gate_dropout}

    # --- the recurrence ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, B, input); h0, c0: (1, B, H) -> output (T, B, H), h_n, c_n (1, B, H)."""
        if self.reverse:
            x = x.flip(0)
        first_in = self.weight_ih.forward_weight()
        first_h = self.weight_hh.forward_weight()
        second = self._second_layers()
        inputs = x @ first_in.T                                          # (T, B, sum w): all steps at once
        if self.bias_1 is not None:
            inputs = inputs + self.bias_1
        h, c, outputs = h0[0], c0[0], []
        for step in range(x.shape[0]):
            hidden = functional.relu(inputs[step] + h @ first_h.T)       # (B, sum w)
            if self.gate_dropout and self.training:
                hidden = functional.dropout(hidden, self.gate_dropout, training=True)
            h, c = self._cell(hidden, second, c)
            outputs.append(h)
        output = torch.stack(outputs)
        return (output.flip(0) if self.reverse else output), h.unsqueeze(0), c.unsqueeze(0)

    def _second_layers(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        """The four second layers and their bias as the steps use them, built once per sequence: with equal
        widths one (4, w, H) stack and a (4, 1, H) bias for a batched product (stacking them at every step cost
        a fifth of a 650-unit layer's forward + backward time: 278 -> 216 ms, 35 steps x 20, one thread)."""
        weights = [self.form(name).forward_weight() for name in SECOND]
        equal = len(set(self.widths)) == 1
        if self.bias_2 is None:
            bias = None
        else:
            bias = self.bias_2.view(len(GATES), 1, -1) if equal else self.bias_2.chunk(len(GATES))
        return (torch.stack(weights).transpose(1, 2) if equal else weights), bias

    def _cell(self, hidden: torch.Tensor, second: tuple, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, bias = second
        if isinstance(weights, torch.Tensor):                            # one batched product for all four
            parts = hidden.view(hidden.shape[0], len(GATES), -1).transpose(0, 1)        # (4, B, w)
            gates = torch.bmm(parts, weights) if bias is None else torch.baddbmm(bias, parts, weights)   # (4, B, H)
            i, f, g, o = gates.unbind(0)
        else:
            parts = hidden.split(self.widths, dim=-1)
            biases = bias if bias is not None else (0.0,) * len(GATES)
            i, f, g, o = (part @ weight.T + b for part, weight, b in zip(parts, weights, biases))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    # --- units, for structured removal ---------------------------------------------------------------------
    def groups(self) -> list[UnitGroup]:
        """Hidden units (rows of every second layer, column of ``weight_hh``; the layer's output) and, per gate,
        the neurons of its hidden layer (rows of the first layer, columns of that gate's second layer)."""
        hidden_parts = tuple((name, 0, _same) for name in SECOND) + (("hh", 1, _same),)
        groups = [UnitGroup("hidden", self.hidden_size, hidden_parts, output=True)]
        for index, (gate, width) in enumerate(zip(GATES, self.widths)):
            rows = self._first_rows(index)
            groups.append(UnitGroup(f"gate_{gate}", width, (("ih", 0, rows), ("hh", 0, rows), (SECOND[index], 1, _same)),
                                    output=False))
        return groups

    def _first_rows(self, gate: int) -> IndexFn:
        offset = sum(self.widths[:gate])
        return lambda units: units + offset

    @torch.no_grad()
    def select(self, keep: dict[str, torch.Tensor], inputs: torch.Tensor | None = None) -> "HLSTMLayer":
        """A dense layer keeping hidden units ``keep["hidden"]``, gate neurons ``keep["gate_i"]`` ..., inputs."""
        hidden = keep["hidden"].cpu()
        per_gate = [keep.get(f"gate_{gate}", torch.arange(width)).cpu() for gate, width in zip(GATES, self.widths)]
        inputs = torch.arange(self.input_size) if inputs is None else inputs.cpu()
        rows = torch.cat([self._first_rows(index)(units) for index, units in enumerate(per_gate)])
        small = HLSTMLayer(len(inputs), len(hidden), self.bias, self.reverse, [len(u) for u in per_gate],
                           self.gate_dropout)
        reference = self.weight_ih.materialize()
        small = small.to(device=reference.device, dtype=reference.dtype)
        small.weight_ih.weight.copy_(reference[rows][:, inputs])
        small.weight_hh.weight.copy_(self.weight_hh.materialize()[rows][:, hidden])
        for name, units in zip(SECOND, per_gate):
            small.form(name).weight.copy_(self.form(name).materialize()[hidden][:, units])
        if self.bias:
            small.bias_1.copy_(self.bias_1[rows])
            small.bias_2.copy_(self.bias_2.view(len(GATES), -1)[:, hidden].reshape(-1))
        return small

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, gate_hidden={list(self.widths)}, bias={self.bias}"
                + (f", gate_dropout={self.gate_dropout}" if self.gate_dropout else "") + (", reverse" if self.reverse else ""))
