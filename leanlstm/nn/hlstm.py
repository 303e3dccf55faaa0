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

Training runs the first layer's input half for all steps at once. With equal gate widths the recurrence is
``hlstm_recurrence``: explicit loops forward and backward, the four second layers as one batched product, each
weight gradient one product over all steps (1.3x autograd's step-by-step graph on PTB medium shapes); unequal
widths run step by step through autograd. Dropout (``gate_dropout``) acts on the gates' hidden activations in
training only, as the paper's ``H*`` (ReLU with dropout).
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
        second = [self.form(name).forward_weight() for name in SECOND]
        inputs = x @ first_in.T                                          # (T, B, sum w): all steps at once
        if self.bias_1 is not None:
            inputs = inputs + self.bias_1
        dropout = self.gate_dropout if self.training else 0.0
        if len(set(self.widths)) == 1:                                   # equal widths: the explicit recurrence
            # the second layers stacked once per sequence: stacking them at every step costs a fifth of a 650-unit
            # layer's forward + backward (278 -> 216 ms, 35 steps x 20, one thread)
            stacked = torch.stack(second).transpose(1, 2)                               # (4, w, H)
            bias = None if self.bias_2 is None else self.bias_2.view(len(GATES), 1, -1)
            output, h, c = hlstm_recurrence(inputs, h0[0], c0[0], first_h, stacked, bias, dropout)
            return (output.flip(0) if self.reverse else output), h.unsqueeze(0), c.unsqueeze(0)
        biases = self.bias_2.chunk(len(GATES)) if self.bias_2 is not None else (0.0,) * len(GATES)
        h, c, outputs = h0[0], c0[0], []
        for step in range(x.shape[0]):
            hidden = functional.relu(inputs[step] + h @ first_h.T)       # (B, sum w)
            if dropout:
                hidden = functional.dropout(hidden, dropout, training=True)
            i, f, g, o = (part @ weight.T + bias
                          for part, weight, bias in zip(hidden.split(self.widths, dim=-1), second, biases))
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        output = torch.stack(outputs)
        return (output.flip(0) if self.reverse else output), h.unsqueeze(0), c.unsqueeze(0)

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


# --- the recurrence with equal gate widths: explicit loops, weight gradients in one product each -------------------
class _Recurrence(torch.autograd.Function):
    """``pre_t = inputs_t + h_{t-1} @ W1h.T``, ``z_t = relu(pre_t) * keep_t``, gates ``z_t``'s four blocks times
    ``W2`` (4, w, H) plus ``b2``, then the LSTM state update. Forward and backward are loops over the steps with no
    autograd graph per step; the weight gradients are one product each over all T x B rows after the loop (autograd
    took one product of B rows per step and added it into the gradient: 35 of them a window on PTB)."""

    @staticmethod
    def forward(ctx, inputs, h0, c0, w1h, w2, b2, keep):
        T, B, H, gates_count = inputs.shape[0], h0.shape[0], h0.shape[-1], w2.shape[0]
        dtype, mm = h0.dtype, w1h.dtype                          # state arithmetic, products
        hs, cs = h0.new_empty(T + 1, B, H), h0.new_empty(T + 1, B, H)
        zs = inputs.new_empty(T, B, inputs.shape[-1], dtype=mm)  # the second layers' inputs
        acts = h0.new_empty(T, gates_count, B, H)                # activated gates
        active = torch.empty(T, B, inputs.shape[-1], dtype=torch.bool, device=inputs.device)     # relu > 0
        hs[0], cs[0] = h0, c0
        w1h_t = w1h.t()
        for t in range(T):
            pre = inputs[t].to(dtype) + (hs[t].to(mm) @ w1h_t).to(dtype)
            torch.gt(pre, 0, out=active[t])
            z = pre.clamp_min_(0) if keep is None else pre.clamp_min_(0) * keep[t]
            zs[t] = z
            parts = zs[t].view(B, gates_count, -1).transpose(0, 1)                  # (4, B, w)
            gates = (torch.bmm(parts, w2) if b2 is None else torch.baddbmm(b2, parts, w2)).to(dtype)
            a = acts[t]
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[2], out=a[2])
            i, f, g, o = a.unbind(0)
            torch.addcmul(f * cs[t], i, g, out=cs[t + 1])
            torch.mul(o, torch.tanh(cs[t + 1]), out=hs[t + 1])
        ctx.save_for_backward(hs, cs, zs, acts, active, w1h, w2, keep)
        ctx.inputs_dtype, ctx.b2_dtype = inputs.dtype, None if b2 is None else b2.dtype
        return hs[1:].clone(), hs[T].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        hs, cs, zs, acts, active, w1h, w2, keep = ctx.saved_tensors
        T, gates_count, B, H = acts.shape
        dtype, mm = hs.dtype, w1h.dtype
        dh = d_hn.to(dtype).clone() if d_hn is not None else torch.zeros_like(hs[0])
        dc = d_cn.to(dtype).clone() if d_cn is not None else torch.zeros_like(cs[0])
        d_gates = torch.empty_like(acts)                         # (T, 4, B, H)
        d_pre = zs.new_empty(T, B, zs.shape[-1], dtype=dtype)
        w2_t, width = w2.transpose(1, 2), zs.shape[-1] // gates_count
        for t in reversed(range(T)):
            if d_out is not None:
                dh += d_out[t]
            i, f, g, o = acts[t].unbind(0)
            tc = torch.tanh(cs[t + 1])
            dc += dh * o * (1 - tc * tc)
            di, df, dg, do = d_gates[t].unbind(0)
            torch.mul(dc * g, i * (1 - i), out=di)
            torch.mul(dc * cs[t], f * (1 - f), out=df)
            torch.mul(dc * i, 1 - g * g, out=dg)
            torch.mul(dh * tc, o * (1 - o), out=do)
            dc = dc * f
            dz = torch.bmm(d_gates[t].to(mm), w2_t).transpose(0, 1).reshape(B, -1).to(dtype)   # (B, 4w)
            if keep is not None:
                dz = dz * keep[t]
            torch.mul(dz, active[t], out=d_pre[t])
            dh = (d_pre[t].to(mm) @ w1h).to(dtype)
        need = ctx.needs_input_grad
        d_w1h = d_pre.reshape(-1, d_pre.shape[-1]).t().to(mm) @ hs[:T].reshape(-1, H).to(mm) if need[3] else None
        d_w2 = d_b2 = None
        if need[4] or need[5]:
            flat = d_gates.transpose(0, 1).reshape(gates_count, T * B, H)          # (4, T*B, H)
            if need[4]:
                parts = zs.view(T * B, gates_count, width).transpose(0, 1)            # (4, T*B, w)
                d_w2 = torch.bmm(parts.transpose(1, 2), flat.to(mm))
            if need[5]:
                d_b2 = flat.sum(1, keepdim=True).to(ctx.b2_dtype)
        return d_pre.to(ctx.inputs_dtype), dh, dc, d_w1h, d_w2, d_b2, None


def hlstm_recurrence(inputs: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w1h: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor | None, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An H-LSTM layer with equal gate widths from its first layer's input half ``inputs`` (T, B, 4w; with
    ``b1``), state ``h0``, ``c0`` (B, H), ``w1h`` (4w, H), the second layers stacked ``w2`` (4, w, H) and ``b2``
    (4, 1, H) or None; ``dropout`` on the gates' hidden activations. -> output (T, B, H), h_n, c_n. Under autocast
    the products run in its dtype and the state in ``h0``'s.

    >>> out, h, c = hlstm_recurrence(torch.zeros(3, 2, 8), torch.zeros(2, 4), torch.zeros(2, 4),
    ...                              torch.zeros(8, 4), torch.zeros(4, 2, 4), None)
    >>> tuple(out.shape), float(c.sum())
    ((3, 2, 4), 0.0)
    """
    keep = None
    if dropout:
        keep = (torch.rand(inputs.shape, device=inputs.device) >= dropout).to(h0.dtype) / (1.0 - dropout)
    device = inputs.device.type
    if torch.is_autocast_enabled(device):
        mm = torch.get_autocast_dtype(device)
        w1h, w2 = w1h.to(mm), w2.to(mm)
        b2 = None if b2 is None else b2.to(mm)
    with torch.autocast(device, enabled=False):
        return _Recurrence.apply(inputs, h0, c0, w1h, w2, b2, keep)
