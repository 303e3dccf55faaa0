"""The int8 (and 4-bit) weight grid, shared by post-training quantisation, quantisation-aware training, ADMM and
the engine.

A quantised tensor keeps one float32 scale per row of its last dimension and values ``scale * q`` with integer
``q`` in ``[-127, 127]`` (symmetric, no zero point): the arithmetic of ``leanlstm.runtime.int8``, which re-derives
the same scale (``max |row| / 127``) and the same integers from the snapped values. So a model snapped here runs in
the int8 engine with exactly these weights; PyTorch evaluates the same weights in float32. With ``bits=4`` the grid
is ``q`` in ``[-7, 7]`` (``max |row| / 7``), which the engine stores packed two values a byte in the forms that
have a 4-bit op (``WeightForm.value_bit_choices``) and multiplies on the same VNNI products.

Clipping: ``clip="max"`` takes the scale from the row's largest magnitude; ``clip="mse"`` tries scales down to
``MSE_FLOOR`` of it and keeps, per row, the one with the smallest squared error (large outliers clipped to +-127
steps, every other value on a finer grid). The clipped values sit at +-127, so the engine recovers the scale.

Quantisation-aware training keeps float *latent* weights (``Latent``): the model always holds the snapped values
(forward and backward see int8 weights), and after each optimiser step the step's change is added to the latent
weights, which are snapped again: the straight-through estimator, with no change to any forward pass.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..graph import head_forms, lstm_forms
from .forms.base import WeightForm

BITS = 8
QUANT_BITS = (4, 8)                         # the integer value widths a grid can have


def levels(bits: int = BITS) -> int:
    """The largest integer of the symmetric ``bits``-wide grid: 127 for int8, 7 for 4 bits.

    >>> levels(8), levels(4)
    (127, 7)
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"quantisation bits must be one of {QUANT_BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


LEVELS = levels(BITS)                       # 127: q in [-127, 127]
CLIPS = ("max", "mse")
MSE_FLOOR = 0.5                             # the smallest clipping tried: half the row's largest magnitude
MSE_STEPS = 26                              # clipping candidates between MSE_FLOOR and 1


def row_scales(values: torch.Tensor, mask: torch.Tensor | None = None, clip: str = "max", bits: int = BITS
               ) -> torch.Tensor:
    """One scale per row of the last dimension (shape ``values.shape[:-1] + (1,)``): ``max |row| / 127`` (``/ 7``
    at 4 bits), or the squared-error-minimising clipped scale (``clip="mse"``). An all-zero row gets scale 1.

    >>> row_scales(torch.tensor([[0.5, -1.27], [0.0, 0.0]])).flatten().tolist()
    [0.009999999776482582, 1.0]
    """
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    values = values.detach()
    if mask is not None:
        values = values * mask
    largest = values.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(largest > 0, largest / levels(bits), torch.ones_like(largest))
    if clip == "max":
        return scales
    best, best_error = scales, None
    for fraction in torch.linspace(MSE_FLOOR, 1.0, MSE_STEPS).tolist():
        candidate = scales * fraction
        error = (snap(values, candidate, bits) - values).square()
        error = (error if mask is None else error * mask).sum(dim=-1, keepdim=True)
        if best_error is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def snap(values: torch.Tensor, scales: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    """``values`` on the grid ``scales * q``, ``q`` an integer in ``[-127, 127]`` (``[-7, 7]`` at 4 bits; round half
    to even, as ``numpy.rint`` in the engine)."""
    top = levels(bits)
    return torch.clamp(torch.round(values / scales), -top, top) * scales


def quantise_tensor(values: torch.Tensor, mask: torch.Tensor | None = None, clip: str = "max", bits: int = BITS
                    ) -> torch.Tensor:
    """``values`` snapped to their per-row grid of ``bits`` (masked-out entries: 0).

    >>> quantise_tensor(torch.tensor([[0.3, -1.27, 0.004]])).tolist()
    [[0.29999998211860657, -1.2699999809265137, 0.0]]
    >>> quantise_tensor(torch.tensor([[0.3, -1.4, 0.25]]), bits=4).tolist()      # steps of 0.2
    [[0.4000000059604645, -1.399999976158142, 0.20000000298023224]]
    """
    snapped = snap(values.detach(), row_scales(values, mask, clip, bits), bits)
    return snapped if mask is None else snapped * mask


def leaf_forms(form: WeightForm) -> Iterator[WeightForm]:
    """The form and its child forms (a doped form's parts) that hold values."""
    for module in form.modules():
        if isinstance(module, WeightForm):
            yield module


def quantised_parameters(module: nn.Module, heads: bool = True,
                         forms: Iterable[tuple[str, WeightForm]] | None = None, embeddings: bool = False
                         ) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """``(name, parameter, mask)`` of every value tensor of every LSTM matrix in ``module`` (or of ``forms``, e.g. a
    compression handle's), with ``heads`` of every ``nn.Linear`` and ``FormLinear`` head, and with ``embeddings``
    of every ``nn.Embedding`` table (a scale per token's row): what the int8 engine stores in int8.

    >>> from leanlstm.nn import LSTM
    >>> [name for name, _, _ in quantised_parameters(nn.Sequential(LSTM(4, 8), nn.Linear(8, 2)))]
    ['0.layers.0.weight_ih:weight', '0.layers.0.weight_hh:weight', '1.weight']
    """
    found = []
    for name, form in (lstm_forms(module) if forms is None else forms):
        for leaf in leaf_forms(form):
            for parameter, mask in leaf.value_tensors():
                found.append((f"{name}:{_param_name(form, parameter)}", parameter, mask))
    if heads:
        found += [(f"{name}.weight", child.weight, None) for name, child in module.named_modules()
                  if isinstance(child, nn.Linear)]
        found += [(f"{name}:{_param_name(form, parameter)}", parameter, mask) for name, form in head_forms(module)
                  for leaf in leaf_forms(form) for parameter, mask in leaf.value_tensors()]
    if embeddings:
        found += [(f"{name}.weight", child.weight, None) for name, child in module.named_modules()
                  if isinstance(child, nn.Embedding)]
    return found


def _param_name(form: nn.Module, parameter: nn.Parameter) -> str:
    return next(name for name, p in form.named_parameters() if p is parameter)


def lstm_bits(forms: Iterable[tuple[str, WeightForm]], bits: int) -> dict[str, int]:
    """``{name: bits}`` for the value tensors of ``forms`` (named as ``quantised_parameters`` names them), after
    checking that every form can store values of that width: the widths ``Latent`` snaps them to (every other
    tensor, heads and embedding tables, stays int8)."""
    forms = list(forms)
    levels(bits)
    for name, form in forms:
        for leaf in leaf_forms(form):
            leaf.check_value_bits(bits)
    return {name: bits for name, _, _ in quantised_parameters(nn.Module(), False, forms)}


@torch.no_grad()
def quantise_(module: nn.Module, clip: str = "max", heads: bool = True,
              forms: Iterable[tuple[str, WeightForm]] | None = None, embeddings: bool = False, bits: int = BITS
              ) -> int:
    """Snap every LSTM matrix of ``module`` (or ``forms``) to its grid of ``bits`` (4 only for forms with a 4-bit
    op), with ``heads`` every ``nn.Linear`` and with ``embeddings`` every ``nn.Embedding`` table to its int8 grid, in
    place, and record the value widths on the forms; returns the number of tensors snapped.

    >>> from leanlstm.nn import LSTM
    >>> lstm = LSTM(4, 8); quantise_(lstm), lstm.layers[0].weight_ih.value_bits
    (2, 8)
    """
    forms = list(lstm_forms(module) if forms is None else forms)
    widths = lstm_bits(forms, bits)
    found = quantised_parameters(module, heads, forms, embeddings)
    for name, parameter, mask in found:
        parameter.copy_(quantise_tensor(parameter, mask, clip, widths.get(name, BITS)).to(parameter.dtype))
    for _, form in forms:
        form.set_value_bits(bits)
    for _, form in (head_forms(module) if heads else []):
        form.set_value_bits(BITS)
    return len(found)


class Latent:
    """Float latent weights for quantisation-aware training (straight-through): the model holds the snapped values,
    ``update()`` after each optimiser step moves the latent weights by the step's change and snaps again.

    >>> w = nn.Parameter(torch.tensor([[1.27, 0.1]])); latent = Latent([("w", w, None)])   # grid step 0.01
    >>> for _ in range(2):                       # two optimiser steps of +0.003: each alone stays on 0.10
    ...     with torch.no_grad(): _ = w.add_(torch.tensor([[0.0, 0.003]]))
    ...     latent.update(); print(round(w[0, 1].item(), 4), round(latent.values["w"][0, 1].item(), 4))
    0.1 0.103
    0.11 0.106
    """

    def __init__(self, parameters: list[tuple[str, nn.Parameter, torch.Tensor | None]], clip: str = "max",
                 bits: dict[str, int] | None = None) -> None:
        self.parameters = parameters
        self.clip = clip
        self.bits = bits or {}                  # a tensor's width by name (``lstm_bits``); int8 when absent
        self.values: dict[str, torch.Tensor] = {name: p.detach().clone() for name, p, _ in parameters}
        self.snapped: dict[str, torch.Tensor] = {}
        self.snap_all()

    @torch.no_grad()
    def snap_all(self) -> None:
        for name, parameter, mask in self.parameters:
            snapped = quantise_tensor(self.values[name], mask, self.clip, self.bits.get(name, BITS))
            snapped = snapped.to(parameter.dtype)
            parameter.copy_(snapped)
            self.snapped[name] = snapped.clone()

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter, mask in self.parameters:
            latent = self.values[name]
            latent.add_(parameter.detach() - self.snapped[name].to(parameter.device))
            if mask is not None:
                latent.mul_(mask)
        self.snap_all()

    def state_dict(self) -> dict[str, Any]:
        return {"values": {name: value.cpu() for name, value in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.values) - set(state["values"])
        if missing:
            raise ValueError(f"the saved latent weights lack {', '.join(sorted(missing))}")
        for name, parameter, _ in self.parameters:
            self.values[name] = state["values"][name].to(parameter.device).clone()
        self.snap_all()
