"""``FormLinear``: an ``nn.Linear`` whose weight is a weight form (a pruned or factorised head or decoder).

A language model's decoder is most of its weights (PTB `medium-cpu`: 6.5 M of the decoder's against 6.8 M of the
whole 2x650 stack) and, once the stack is compressed, most of its per-step latency. Compressing it takes the same
forms as the LSTM matrices: ``FormLinear`` computes ``x @ W.T + bias`` with ``W`` a ``WeightForm``, trains through
the form's dense ``training_weight()`` like the LSTM does, and the engine and ONNX export multiply through the
form's own structure.

>>> import torch
>>> from torch import nn
>>> linear = nn.Linear(8, 4)
>>> head = FormLinear.from_linear(linear)
>>> torch.allclose(head(torch.ones(2, 8)), linear(torch.ones(2, 8)))
True
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .forms import Dense, WeightForm, build_form


class FormLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` a weight form of shape ``(out_features, in_features)``."""

    def __init__(self, form: WeightForm, bias: bool = True) -> None:
        super().__init__()
        if not isinstance(form, WeightForm):
            raise TypeError(f"FormLinear takes a WeightForm (leanlstm.nn.forms), got {type(form).__name__}")
        self.form = form
        self.in_features, self.out_features = form.in_features, form.out_features
        self.bias = nn.Parameter(torch.zeros(form.out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, form: WeightForm | None = None) -> "FormLinear":
        """``linear`` with its weight as ``form`` (default: ``Dense`` of the same values) and its bias copied, on
        its device and dtype."""
        weight = linear.weight.detach()
        if form is None:
            form = Dense.from_dense(weight.float().cpu())
        if tuple(form.shape) != tuple(weight.shape):
            raise ValueError(f"the form is {tuple(form.shape)} but the nn.Linear's weight is {tuple(weight.shape)}")
        new = cls(form, bias=linear.bias is not None).to(device=weight.device, dtype=weight.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                new.bias.copy_(linear.bias)
        return new.train(linear.training)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FormLinear":
        """An uninitialised ``FormLinear`` of ``config()``'s structure (load the state dict next)."""
        return cls(build_form(config["form"]), bias=config["bias"])

    def config(self) -> dict[str, Any]:
        return {"form": self.form.config(), "bias": self.bias is not None}

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix (``form.materialize()``): for code that reads ``.weight`` as of an ``nn.Linear``."""
        return self.form.materialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.form.forward_weight().to(x.dtype), self.bias)

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` computing the same function (for peers that run dense models)."""
        weight = self.form.materialize().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.train(self.training)

    def nbytes(self) -> int:
        """Bytes stored at inference: the form's (values at their width, indices, scales) plus the float32 bias."""
        return self.form.nbytes() + (4 * self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
