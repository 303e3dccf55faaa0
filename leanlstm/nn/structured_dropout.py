"""Structured dropout: masks shared by the batch, drawn afresh at every time step, and products that skip the
dropped units (Sarma et al., NeurIPS 2021, "Structured in Space, Randomized in Time: Leveraging Dropout in RNNs
for Efficient Training", arXiv 2106.12089).

Standard (Zaremba) dropout zeroes a different set of units for every sequence of the batch, so the products that
read the dropped activations still run dense. Here one mask ``m_t`` (``(in,)``, kept with probability ``1 - p``)
is shared by every sequence at step ``t`` and a new one is drawn at every step, so a product that reads the
dropped activations needs only the kept columns:

    y_t = (x_t * m_t / (1-p)) @ W.T = x_t[:, k_t] @ W[:, k_t].T / (1-p)          k_t: kept units at step t

computed on gathered operands in all three products of training (``structured_linear``):

    forward          y_t            = x_t[:, k_t] @ W[:, k_t].T / (1-p)
    input gradient   dx_t[:, k_t]   = dy_t @ W[:, k_t] / (1-p)          (dropped columns of dx_t are zero)
    weight gradient  dW[:, k_t]    += dy_t.T @ x_t[:, k_t] / (1-p)       (only kept columns are touched)

Sites (the non-recurrent ones of a Zaremba LSTM LM, where ``WordLM`` applies dropout): the embedding output
(compacted in layer 0's input product ``W_ih``), between layers (layer ``l``'s ``W_ih``) and before the decoder
(the decoder's weight). The recurrent products ``h_{t-1} @ W_hh.T`` carry no dropout and stay dense; the LSTM
then runs layer by layer with the input gates precomputed (``lstm_with_input_gates``), since PyTorch's fused
kernel computes its own input product.

Where this implementation chose (the paper's text beyond its abstract could not be read here):

- masks are drawn from torch's global CPU generator (``torch.rand``), which the Trainer checkpoints, so a
  resumed run draws the same masks;
- ``steps_per_mask`` (default 1: the paper's "randomized in time") lets ``g`` consecutive steps share one mask,
  so one gather serves ``g * B`` rows. On a CPU, per-step products of ``B = 20`` rows re-read the whole weight
  at every step and lose to one dense GEMM over all ``T * B`` rows (see ``results/structured-dropout-throughput
  .json``); grouping trades randomness in time for GEMM size. With one mask for the whole window
  (``steps_per_mask >= T``; mode ``structured-window``) a layer runs PyTorch's fused LSTM kernel on its kept
  inputs (``_window_layer``), so the recurrence runs fused as well, and the head takes ``window_linear``. Groups
  of 1, 5 or 7 steps each through the fused kernel measured 0.38-1.11x standard dropout's throughput on PTB
  medium-cpu, the per-step path here 0.52-1.04x (8 windows each, one and two threads): no clear gain, so only the
  whole window takes that path;
- the weight gradient is compacted only when a mask covers at least ``DENSE_WEIGHT_GRAD_ROWS`` rows (steps x
  batch); below that it is one dense GEMM over the masked input, which measured about twice as fast on this
  CPU (the per-step product reduces over only ``B`` rows). The forward and input-gradient products are always
  compacted;
- with one mask per window, each product (a layer's fused kernel, the head) runs on the gathered kept columns
  or on the whole input multiplied by the mask, whichever ran one forward + backward faster when its shape was
  first seen (``_window_way``): on an Intel Xeon with AMX, bfloat16 products are cheap enough that gathering and
  scattering the decoder's columns costs more than the half of the product it saves (PTB medium-cpu decoder at
  dropout 0.5, forward + backward, two threads: masked 30 ms, compacted 61, standard dropout 42), while in float32
  the compacted product wins (45 ms against 75 masked, 77 standard);
- ``structured-hybrid`` keeps the window's one mask at the stack's inputs (the fused kernel) and redraws the
  head's every ``steps_per_mask`` steps (``grouped_linear``): the head's site is where one mask per window costs
  the accuracy. After one epoch of PTB medium-cpu (dropout 0.5, bfloat16, Intel Xeon) validation perplexity was
  224.8 with standard dropout, 305.9 with one mask per window, 236.2 with the head's mask redrawn every 7 steps;
- a compacted window operand is padded to an even width with a zero column: oneDNN's bfloat16 LSTM kernel takes
  a slow path for an odd input width (forward of a 650-unit layer, T=35, B=20: 20.4 ms at width 325, 7.0 at 326);
- the dropped count is Bernoulli per unit (not a fixed count), as standard dropout; a step that drops every
  unit outputs zeros.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import _VF

from .cells import LSTMLayer

# Below this many rows per mask (steps_per_mask * batch), the weight gradient is one GEMM over the masked input
# (T*B rows, dropped columns multiplied as zeros) instead of one compacted GEMM per mask: a per-step dW product has
# only B rows to reduce over and writes a (kept x out) block per step, which on a CPU costs about twice the dense
# product for PTB medium's decoder (650 -> 10000, B = 20: 306 ms against 143 ms on one core). Set it to 0 to
# compact every product, as the paper does.
DENSE_WEIGHT_GRAD_ROWS = 256

# Dropout modes a model config may name: per-sequence masks (PyTorch's), the paper's per-step masks shared by the
# batch, one mask per training window shared by the batch (``steps_per_mask >= T``; PyTorch's fused kernel), and
# the window's masks at the stack's inputs with the head's mask redrawn every ``steps_per_mask`` steps.
DROPOUT_MODES = ("standard", "structured", "structured-window", "structured-hybrid")

# How a window-mode product runs: None picks per shape by timing (``_window_way``); "compact" or "masked" forces one.
WINDOW_PRODUCT: str | None = None
_WINDOW_WAYS: dict[tuple, str] = {}        # timed choices, per product kind, shapes, dtypes, threads and rate

__all__ = ["DROPOUT_MODES", "check_dropout_config", "structured_forward", "draw_masks", "structured_linear",
           "window_linear", "grouped_linear", "lstm_with_input_gates", "structured_lstm", "parse_dropout_mode"]


def draw_masks(steps: int, features: int, p: float, steps_per_mask: int = 1,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Keep-masks ``(ceil(steps / steps_per_mask), features)`` (bool), one per group of steps, from torch's global
    CPU generator (checkpointed by the Trainer; the same draw on any device). ``structured_linear`` takes them on
    the host, so finding the kept units never waits for a GPU.

    >>> draw_masks(3, 4, 0.5).shape
    torch.Size([3, 4])
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"structured dropout needs p in [0, 1), got {p}")
    if steps_per_mask < 1:
        raise ValueError(f"steps_per_mask must be at least 1, got {steps_per_mask}")
    groups = -(-steps // steps_per_mask)
    return (torch.rand(groups, features) >= p).to(device)


class _StructuredLinear(torch.autograd.Function):
    """``(x * m / (1-p)) @ W.T`` on gathered kept columns; x (T, B, in), W (out, in), masks (G, in).

    The weight is transposed once per call (``W.T``, (in, out), row-major) so that every gather and every
    weight-gradient scatter moves whole contiguous rows: gathering columns of ``W`` and scattering into columns of
    ``dW`` are strided and cost as much as the products they save."""

    @staticmethod
    def forward(ctx, x, weight, masks, scale, steps_per_mask):
        groups = _groups(masks, x.shape[0], steps_per_mask, x.device)
        w_t = weight.t().contiguous()                                     # (in, out)
        y = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])          # (T, B, out)
        for steps, kept in groups:
            rows = x[steps].reshape(-1, x.shape[-1])                      # (g*B, in)
            out = y[steps].view(-1, weight.shape[0])                      # (g*B, out)
            if kept.numel() == 0:
                out.zero_()
                continue
            torch.mm(rows.index_select(1, kept) * scale, w_t.index_select(0, kept), out=out)
        ctx.save_for_backward(x, w_t)
        ctx.groups, ctx.scale = groups, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_t = ctx.saved_tensors
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw_t = torch.zeros_like(w_t) if ctx.needs_input_grad[1] else None   # (in, out)
        dy = dy.to(w_t.dtype)
        rows_per_group = ctx.groups[0][0].stop * x.shape[1]
        dense_dw = dw_t is not None and rows_per_group < DENSE_WEIGHT_GRAD_ROWS
        for steps, kept in ctx.groups:
            if kept.numel() == 0:
                continue
            grad = dy[steps].reshape(-1, dy.shape[-1])                      # (g*B, out)
            if dx is not None:
                dx[steps].view(-1, x.shape[-1]).index_copy_(1, kept, grad @ (w_t.index_select(0, kept) * ctx.scale).t())
            if dw_t is not None and not dense_dw:
                rows = x[steps].reshape(-1, x.shape[-1]).index_select(1, kept)  # (g*B, k)
                dw_t.index_add_(0, kept, rows.t() @ grad, alpha=ctx.scale)
        if dense_dw:    # one GEMM over all T*B rows of the masked input: see DENSE_WEIGHT_GRAD_ROWS
            masked = x * _expand(ctx.groups, x).mul_(ctx.scale)                 # (T, B, in)
            torch.mm(masked.reshape(-1, x.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]), out=dw_t)
        return dx, (None if dw_t is None else dw_t.t()), None, None, None


def _expand(groups: list[tuple[slice, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of every step, (T, 1, in), in ``x``'s dtype."""
    mask = x.new_zeros(x.shape[0], 1, x.shape[-1])
    for steps, kept in groups:
        mask[steps, :, kept] = 1
    return mask


def _groups(masks: torch.Tensor, steps: int, steps_per_mask: int, device: torch.device
            ) -> list[tuple[slice, torch.Tensor]]:
    """``(slice of steps, kept indices on device)`` per mask; the indices are found on the host (one copy)."""
    kept = [row.nonzero().squeeze(1).to(device) for row in masks.cpu()]
    return [(slice(g * steps_per_mask, min(steps, (g + 1) * steps_per_mask)), k) for g, k in enumerate(kept)]


def structured_linear(x: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, p: float,
                      steps_per_mask: int = 1) -> torch.Tensor:
    """``(x_t * m_t / (1-p)) @ weight.T`` for every step of ``x`` (T, B, in), mask ``m_t = masks[t //
    steps_per_mask]`` shared by the batch, without materialising the zeros (module docstring). Under autocast the
    products run in its dtype, as ``F.linear`` would.

    >>> x, w = torch.ones(2, 3, 4), torch.ones(5, 4)
    >>> structured_linear(x, w, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool), 0.5)[:, 0, 0]
    tensor([4., 0.])
    """
    if x.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (T, B, {weight.shape[1]}), got {tuple(x.shape)}")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    elif weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    with torch.autocast(device, enabled=False):
        return _StructuredLinear.apply(x, weight, masks, 1.0 / (1.0 - p), steps_per_mask)


class _Recurrence(torch.autograd.Function):
    """An LSTM layer's recurrence with the input product precomputed: ``gates_t = xg_t + h_{t-1} @ W_hh.T``, then
    PyTorch's gate order [i|f|g|o]. Forward and backward are explicit loops: no autograd graph per step."""

    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh):
        T, H = xg.shape[0], h0.shape[-1]
        dtype = h0.dtype                                            # state and gate arithmetic
        w_t = w_hh.t()
        hs = h0.new_empty(T + 1, *h0.shape)                         # h_{-1..T-1}: (T+1, B, H)
        cs = h0.new_empty(T + 1, *h0.shape)
        acts = h0.new_empty(T, h0.shape[0], 4 * H)                  # activated gates
        hs[0], cs[0] = h0, c0
        for t in range(T):
            gates = xg[t].to(dtype) + (hs[t].to(w_hh.dtype) @ w_t).to(dtype)    # (B, 4H)
            a = acts[t]
            torch.sigmoid(gates, out=a)
            a[:, 2 * H:3 * H].copy_(torch.tanh(gates[:, 2 * H:3 * H]))
            i, f, g, o = a.chunk(4, 1)
            torch.addcmul(f * cs[t], i, g, out=cs[t + 1])
            torch.mul(o, torch.tanh(cs[t + 1]), out=hs[t + 1])
        ctx.save_for_backward(hs, cs, acts, w_hh)
        ctx.xg_dtype = xg.dtype
        return hs[1:].clone(), hs[T].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        hs, cs, acts, w_hh = ctx.saved_tensors
        T, H = acts.shape[0], hs.shape[-1]
        dtype = hs.dtype
        dh = d_hn.to(dtype).clone() if d_hn is not None else torch.zeros_like(hs[0])
        dc = d_cn.to(dtype).clone() if d_cn is not None else torch.zeros_like(cs[0])
        dgates = torch.empty_like(acts)
        for t in reversed(range(T)):
            if d_out is not None:
                dh += d_out[t]
            i, f, g, o = acts[t].chunk(4, 1)
            tc = torch.tanh(cs[t + 1])
            dc += dh * o * (1 - tc * tc)
            di, df, dg, do = dgates[t].chunk(4, 1)
            torch.mul(dc * g, i * (1 - i), out=di)
            torch.mul(dc * cs[t], f * (1 - f), out=df)
            torch.mul(dc * i, 1 - g * g, out=dg)
            torch.mul(dh * tc, o * (1 - o), out=do)
            dc = dc * f
            dh = (dgates[t].to(w_hh.dtype) @ w_hh).to(dtype)
        flat = dgates.reshape(-1, 4 * H).to(w_hh.dtype)
        d_w = flat.t() @ hs[:T].reshape(-1, H).to(w_hh.dtype) if ctx.needs_input_grad[3] else None
        return dgates.to(ctx.xg_dtype), dh, dc, d_w


def lstm_with_input_gates(xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unidirectional LSTM layer from precomputed input gates ``xg`` (T, B, 4H) (input product and both
    biases), state ``h0``, ``c0`` (B, H): output (T, B, H), h_n, c_n (B, H). The state keeps ``h0``'s dtype; the
    recurrent product runs in ``w_hh``'s (cast it for autocast).

    >>> out, h, c = lstm_with_input_gates(torch.zeros(3, 2, 8), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(8, 2))
    >>> tuple(out.shape), float(c.sum())
    ((3, 2, 2), 0.0)
    """
    return _Recurrence.apply(xg, h0, c0, w_hh)


def check_dropout_config(mode: str, steps_per_mask: int = 1) -> None:
    """A model config's dropout mode and steps per mask, refused with the valid values when wrong.

    >>> check_dropout_config("blocky", 1)
    Traceback (most recent call last):
    ValueError: dropout_mode must be one of standard, structured, structured-window, structured-hybrid, got 'blocky'
    """
    if mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {mode!r}")
    if steps_per_mask < 1:
        raise ValueError(f"dropout_steps_per_mask must be at least 1, got {steps_per_mask}")


def parse_dropout_mode(text: str) -> tuple[str, int | None]:
    """A dropout mode as the command line names it, ``MODE`` or ``MODE/N`` (``N`` consecutive steps share a mask:
    the per-step mode's steps, the hybrid mode's head's) -> ``(mode, N or None)``, refused when wrong.

    >>> parse_dropout_mode("structured-hybrid/12")
    ('structured-hybrid', 12)
    >>> parse_dropout_mode("structured-window/3")
    Traceback (most recent call last):
    ValueError: dropout mode 'structured-window/3': only structured and structured-hybrid take /N (steps per mask)
    """
    mode, slash, steps = text.partition("/")
    if not slash:
        check_dropout_config(mode)
        return mode, None
    if mode not in ("structured", "structured-hybrid"):
        check_dropout_config(mode)
        raise ValueError(f"dropout mode {text!r}: only structured and structured-hybrid take /N (steps per mask)")
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"dropout mode {text!r}: N in {mode}/N (steps per mask) must be a whole number >= 1")
    return mode, int(steps)


def check_structured(lstm, mode: str = "structured") -> None:
    """Refuse a stack that ``structured_lstm`` cannot run in a structured ``mode``, naming what it has (any stack
    runs ``standard`` dropout)."""
    if mode == "standard":
        return
    layers = getattr(lstm, "layers", None)        # a leanlstm.LSTM (torch.nn.LSTM has no cell layers to run)
    if layers is None or lstm.bidirectional or lstm.proj_size or not all(type(one) is LSTMLayer for one in layers):
        raise ValueError("structured dropout runs leanlstm.LSTM unidirectional stacks of LSTM cells without "
                         f"proj_size; this stack: {type(lstm).__name__}, cell={getattr(lstm, 'cell', 'lstm')!r}, "
                         f"bidirectional={lstm.bidirectional}, proj_size={lstm.proj_size}")


def structured_lstm(lstm, x: torch.Tensor, h0: list[torch.Tensor], c0: list[torch.Tensor], p: float,
                    steps_per_mask: int = 1, drop_input: bool = True
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run a ``leanlstm.LSTM`` stack of unidirectional LSTM cells (no projection) with structured dropout on every
    layer's input (layer 0: the model's input, e.g. the embedding output, unless ``drop_input`` is False; the
    others: between layers), compacted in each ``W_ih`` product. x (T, B, in); h0, c0: per-layer (1, B, H) ->
    output (T, B, H_last), per-layer h_n, c_n (1, B, H). Weight forms enter through ``training_weight()``, as in
    the fused path.
    """
    check_structured(lstm)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    h_n, c_n = [], []
    for index, (layer, h, c) in enumerate(zip(lstm.layers, h0, c0)):
        if index == 0 and not drop_input:       # no dropout site before the first layer: its plain fused kernel
            x, h, c = layer(x, h, c)
            h_n.append(h)
            c_n.append(c)
            continue
        masks = draw_masks(x.shape[0], x.shape[-1], p, steps_per_mask)
        if masks.shape[0] == 1:     # one mask for the whole window: PyTorch's fused kernel on the kept inputs
            x, h, c = _window_layer(layer, x, h, c, masks[0], p)
            h_n.append(h)
            c_n.append(c)
            continue
        w_ih, w_hh = layer.weight_ih.training_weight(), layer.weight_hh.training_weight()
        xg = structured_linear(x, w_ih, masks, p, steps_per_mask)                   # (T, B, 4H)
        if layer.bias:
            xg = xg + (layer.bias_ih + layer.bias_hh).to(xg.dtype)
        state_dtype = h.dtype
        x, h, c = lstm_with_input_gates(xg, h[0], c[0].to(state_dtype), w_hh if dtype is None else w_hh.to(dtype))
        h_n.append(h.unsqueeze(0))
        c_n.append(c.unsqueeze(0))
    return x, h_n, c_n


def _window_layer(layer: LSTMLayer, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, mask: torch.Tensor,
                  p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer whose input keeps the same units at every step (``steps_per_mask >= T``): PyTorch's fused LSTM
    kernel, on the kept input columns and the matching columns of ``W_ih`` or on the masked input (``_window_way``).
    The per-step path runs the recurrence step by step in Python (``_Recurrence``), 1.8x-2.2x the fused kernel's
    time for a 650-unit layer on an AMD EPYC (forward + backward, batch 20, 35 steps, two threads: 73.6 ms against
    about 40, the fused layer's 80.6 less its input product's 40.5); with one mask nothing differs between steps,
    so the fused kernel keeps both savings."""
    kept = mask.nonzero().squeeze(1).to(x.device)
    weights, scale = layer.flat_weights(), 1.0 / (1.0 - p)

    def run(way: str, x: torch.Tensor, weights: list[torch.Tensor]):
        weights = list(weights)
        if way == "compact":
            weights[0], inputs = _compact(weights[0], kept), _compact(x, kept) * scale
        else:       # an all-dropped window takes this way too: the gates see only the biases
            inputs = x * (mask.to(x.device, x.dtype) * scale)
        return _VF.lstm(inputs, (h0, c0), weights, layer.bias, 1, 0.0, True, False, False)

    way = _window_way("lstm", run, x, weights, p) if kept.numel() else "masked"
    return run(way, x, weights)


def window_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``(x_t * m / (1-p)) @ weight.T`` with one keep-mask ``m`` (in,) for every step and sequence of ``x`` (T, B,
    in) (``structured-window``), on the kept columns or on the masked input, whichever is faster here
    (``_window_way``). Under autocast the product runs in its dtype.

    >>> window_linear(torch.ones(2, 3, 4), torch.ones(5, 4), torch.tensor([True, True, False, False]), 0.5)[0, 0]
    tensor([4., 4., 4., 4., 4.])
    """
    if x.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (T, B, {weight.shape[1]}), got {tuple(x.shape)}")
    kept = mask.nonzero().squeeze(1).to(x.device)
    scale = 1.0 / (1.0 - p)

    def run(way: str, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        if way == "compact":
            return F.linear(_compact(x, kept) * scale, _compact(weights[0], kept))
        return F.linear(x * (mask.to(x.device, x.dtype) * scale), weights[0])

    return run(_window_way("linear", run, x, [weight], p) if kept.numel() else "masked", x, [weight])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, p: float, steps_per_mask: int
                   ) -> torch.Tensor:
    """``structured_linear``'s product (a mask per group of ``steps_per_mask`` steps, shared by the batch) on the
    kept columns or as one product over the masked input, whichever ran faster when its shape was first seen
    (``_window_way``; the head of ``structured-hybrid``). With per-step masks a compacted product has only the
    batch's rows (module docstring), so the masked way can win; its dropout pattern is the same either way.

    >>> masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    >>> grouped_linear(torch.ones(2, 3, 4), torch.ones(5, 4), masks, 0.5, 1)[:, 0, 0]
    tensor([4., 0.])
    """
    if x.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (T, B, {weight.shape[1]}), got {tuple(x.shape)}")
    scale = 1.0 / (1.0 - p)

    def run(way: str, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        if way == "compact":        # window_linear's product per group: one gather of the weight's columns each
            return torch.cat([F.linear(_compact(x[steps], kept) * scale, _compact(weights[0], kept))
                              for steps, kept in _groups(masks, x.shape[0], steps_per_mask, x.device)])
        keep = masks.to(x.device).repeat_interleave(steps_per_mask, 0)[:x.shape[0], None]       # (T, 1, in)
        return F.linear(x * (keep.to(x.dtype) * scale), weights[0])

    return run(_window_way(f"grouped/{steps_per_mask}", run, x, [weight], p), x, [weight])


def _compact(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The kept columns (last dimension) of ``t``, padded with a zero column to an even width (module docstring:
    an odd width sends oneDNN's bfloat16 kernels down a slow path)."""
    t = t.index_select(-1, kept)
    return F.pad(t, (0, 1)) if kept.numel() % 2 else t


def _window_way(kind: str, run: Callable, x: torch.Tensor, weights: list[torch.Tensor], p: float) -> str:
    """"compact" or "masked", for ``run(way, x, weights)``: forced by ``WINDOW_PRODUCT``, else the one whose forward
    + backward took less time on constant operands of these shapes and dtypes, timed once per key (rows rounded
    down to a power of two, features, dtypes, autocast, threads, rate, device; best of three each, about a second
    for PTB medium-cpu's products; constants, so no random numbers are drawn and a resumed run's masks stay the
    same). The two ways differ only in rounding."""
    if WINDOW_PRODUCT is not None:
        return WINDOW_PRODUCT
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    rows = x.shape[:-1].numel()         # rounded down to a power of two: utterance batches vary in length
    key = (kind, 1 << max(rows, 1).bit_length() - 1, x.shape[-1], x.dtype,
           tuple((tuple(w.shape), w.dtype) for w in weights), autocast, torch.get_num_threads(), round(p, 3), device)
    if key not in _WINDOW_WAYS:
        _WINDOW_WAYS[key] = min(("compact", "masked"), key=lambda way: _seconds(run, way, x, weights))
    return _WINDOW_WAYS[key]


def _seconds(run: Callable, way: str, x: torch.Tensor, weights: list[torch.Tensor], repeats: int = 3) -> float:
    """Best time of ``repeats`` forward + backward passes of ``run(way, ...)`` on constant stand-ins (after one
    untimed pass)."""
    def stand_in(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, 0.01, requires_grad=t.is_floating_point())

    x, weights = stand_in(x), [stand_in(w) for w in weights]
    best = float("inf")
    with torch.enable_grad():
        for index in range(repeats + 1):
            started = time.perf_counter()
            out = run(way, x, weights)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.float().sum(), [x, *weights], allow_unused=True)
            if x.is_cuda:
                torch.cuda.synchronize()
            if index:
                best = min(best, time.perf_counter() - started)
    return best


def structured_forward(lstm, head: torch.nn.Module, x: torch.Tensor, hx, p: float, mode: str = "structured",
                       steps_per_mask: int = 1, drop_input: bool = True) -> tuple[torch.Tensor, Any]:
    """The training forward of a recurrent model with structured dropout: the stack (``structured_lstm``), then
    the linear ``head`` (an ``nn.Linear`` or ``FormLinear``: its ``weight`` and ``bias``) on the masked last
    output, compacted. ``hx`` and the state returned are in the stack's own format (``lstm(x, hx)``'s: None for
    zeros, stacked tensors or per-layer lists; checked as the stack checks them). ``mode`` ``structured`` draws a
    mask every ``steps_per_mask`` steps, ``structured-window`` one for the window, ``structured-hybrid`` one for the
    window at the stack's inputs and one every ``steps_per_mask`` steps at the head's. -> logits (T, B, out), state.

    >>> from leanlstm.nn import LSTM
    >>> logits, (h, c) = structured_forward(LSTM(4, [3]), torch.nn.Linear(3, 5), torch.zeros(6, 2, 4), None, 0.5,
    ...                                     "structured-window")
    >>> tuple(logits.shape), tuple(h.shape)
    ((6, 2, 5), (1, 2, 3))
    """
    if mode not in DROPOUT_MODES[1:]:
        raise ValueError(f"structured_forward needs one of {', '.join(DROPOUT_MODES[1:])}, got {mode!r}")
    head_steps = steps_per_mask
    if mode != "structured":
        steps_per_mask = x.shape[0]
    if mode == "structured-window":
        head_steps = x.shape[0]
    h0, c0 = lstm._initial_state(hx, x, False)
    output, h_n, c_n = structured_lstm(lstm, x, h0, c0, p, steps_per_mask, drop_input)      # (T, B, H)
    masks = draw_masks(output.shape[0], output.shape[-1], p, head_steps)
    if masks.shape[0] == 1:
        logits = window_linear(output, head.weight, masks[0], p)                              # (T, B, out)
    elif mode == "structured-hybrid":
        logits = grouped_linear(output, head.weight, masks, p, head_steps)
    else:
        logits = structured_linear(output, head.weight, masks, p, steps_per_mask)
    if head.bias is not None:
        logits = logits + head.bias.to(logits.dtype)
    return logits, ((torch.cat(h_n), torch.cat(c_n)) if lstm.uniform_sizes else (h_n, c_n))
