"""The weight-form interface: one LSTM weight matrix in some stored representation.

A weight form is an ``nn.Module`` standing for an ``(out_features, in_features)`` matrix ``W``. It can
- ``materialize()`` the dense ``W`` differentiably, so training reuses PyTorch's fused LSTM kernel and the
  gradient flows back into the form's own parameters;
- ``matvec(x)`` compute ``x @ W.T`` using its structure (the reference for the fast runtime);
- report what it honestly stores: ``nbytes()`` (values at their width, per-row scales of quantised values, sparse
  index overhead) and ``stored_params()``;
- be built from a dense matrix (``from_dense``) and rebuilt empty from ``options()`` when loading a checkpoint.

Subclasses register themselves by ``name``; adding a form is one new file, never an edit of a switch.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

FORMS: dict[str, type["WeightForm"]] = {}

FLOAT_BYTES = 4  # float32 storage of every value
SCALE_BYTES = 4  # one float32 scale per row of quantised values
VALUE_BITS = (4, 8, 32)   # value widths: float32, int8 or 4 bits with a scale per row (``leanlstm.nn.quant``)


class WeightForm(nn.Module):
    """Base class of all weight forms. ``W`` has shape ``(out_features, in_features)``."""

    name: ClassVar[str]
    # ONNX export: whether x @ W.T for a whole sequence at once (before the recurrence) beats one step at a
    # time; False for products that gain nothing from batching and would hold a large intermediate.
    onnx_batch_over_time: ClassVar[bool] = True
    # Width of the stored values: 32 (float32), or 8 (or 4) once quantised (``leanlstm.nn.quant.quantise_``: the
    # values lie on a per-row grid). ``nbytes()`` counts values at this width plus one float32 scale per row.
    value_bits: int = 32
    # The widths this form's engine ops store: 4 only where an op keeps two values a byte.
    value_bit_choices: ClassVar[tuple[int, ...]] = (8, 32)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in FORMS:
                raise ValueError(f"weight form name {cls.name!r} is already registered by {FORMS[cls.name]}")
            FORMS[cls.name] = cls

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"a weight form needs positive sizes, got {out_features}x{in_features}")
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    # --- what every form implements -------------------------------------------------------------------
    def materialize(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix, differentiable w.r.t. the form's parameters."""
        raise NotImplementedError

    def training_weight(self) -> torch.Tensor:
        """The matrix the LSTM's forward pass multiplies by: ``materialize()`` plus any noise the form adds in
        training mode (a doped form's co-matrix dropout). Conversions and exports use ``materialize()``, which
        stays exact whatever the mode."""
        return self.materialize()

    def forward_weight(self) -> torch.Tensor:
        """The matrix a PyTorch forward pass multiplies by: ``training_weight()``, except in eval mode without
        autograd (evaluation, inference in PyTorch), where it is built once and reused until a parameter or buffer
        of the form changes (in place or replaced) or the mode changes. Rebuilding ``W * mask`` at every call took
        a third of the PTB evaluation time of a pruned 2x650 model with a pruned decoder.

        >>> form = FORMS["sparse"].from_dense(torch.ones(2, 2), density=0.5).eval()
        >>> with torch.no_grad():
        ...     form.forward_weight() is form.forward_weight()
        True
        """
        if self.training or torch.is_grad_enabled():
            return self.training_weight()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_eval_weight")
        if cached is None or cached[0] != key:
            cached = (key, self.training_weight())
            self.__dict__["_eval_weight"] = cached          # a plain attribute: not a buffer, never saved
        return cached[1]

    def train(self, mode: bool = True) -> "WeightForm":
        self.__dict__.pop("_eval_weight", None)               # the cache lives only while evaluating
        return super().train(mode)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in_features)``, computed through the form's structure."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes this form stores at inference time: its values at ``value_bits`` (``values_nbytes``) plus any
        index overhead."""
        raise NotImplementedError

    def value_tensors(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """The stored value tensors of this form itself (not of child forms), each with the mask of its entries
        that are stored (None: all). Quantisation gives each row of a tensor's last dimension its own scale: the
        rows the int8 engine scales (a matrix's output rows, each factor's rows, each block's rows)."""
        return [(p, None) for p in self.parameters(recurse=False) if p.ndim >= 2]

    def values_nbytes(self, tensor: torch.Tensor, count: int | None = None) -> int:
        """Bytes of ``count`` (default: all) stored values of ``tensor`` at this form's value width, plus one
        float32 scale per row of its last dimension when quantised.

        >>> from leanlstm.nn.forms import Dense
        >>> form = Dense(4, 8); form.values_nbytes(form.weight)
        128
        >>> form.set_value_bits(8); form.values_nbytes(form.weight)
        48
        """
        count = tensor.numel() if count is None else count
        if self.value_bits >= 32:
            return count * FLOAT_BYTES
        rows = tensor.numel() // tensor.shape[-1] if tensor.numel() else 0
        return math.ceil(count * self.value_bits / 8) + rows * SCALE_BYTES

    def check_value_bits(self, bits: int) -> None:
        """ValueError unless this form can store values ``bits`` wide (``value_bit_choices``): 4-bit values are
        stored packed, two a byte, only by the forms whose engine op reads them so."""
        if bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {bits}")
        if bits not in self.value_bit_choices:
            raise ValueError(f"{type(self).__name__} stores values of {', '.join(map(str, self.value_bit_choices))} "
                             f"bits, not {bits}: 4-bit values need a block-sparse form (e.g. --set block=16x4)")

    def set_value_bits(self, bits: int) -> None:
        """Record the width of the stored values, for this form and its child forms (a doped form's parts)."""
        for module in self.modules():
            if isinstance(module, WeightForm):
                module.check_value_bits(bits)
        for module in self.modules():
            if isinstance(module, WeightForm):
                module.value_bits = int(bits)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, **options: Any) -> "WeightForm":
        """The form (with ``options``) that best approximates the dense ``weight``."""
        raise NotImplementedError

    def onnx_matvec(self, graph: Any, x: str) -> str:
        """Write ``x @ W.T`` into an ONNX graph through the form's structure; returns the result's name.

        ``x`` names an ``(N, in_features)`` float tensor, the result is ``(N, out_features)``; ``graph`` is a
        ``leanlstm.runtime.onnx.GraphBuilder``. Forms without this method cannot be exported to ONNX.
        """
        raise NotImplementedError

    def runtime_op(self) -> Any:
        """The form's arrays and Numba kernels for ``leanlstm.runtime`` (a ``kernels.RuntimeOp``), or None.

        Forms without one still run: the engine multiplies by ``materialize()`` densely and logs a warning.
        """
        return None

    def options(self) -> dict[str, Any]:
        """Constructor keyword arguments (besides the sizes) that rebuild a form of the same structure."""
        return {}

    def reset_parameters(self, init_range: float) -> None:
        """Initialise so that entries of ``W`` have the spread of ``uniform(-init_range, init_range)``."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------------
    def stored_params(self) -> int:
        """Float32-equivalent parameter count: ``nbytes / 4`` rounded up (index and scale overhead included)."""
        return math.ceil(self.nbytes() / FLOAT_BYTES)

    def compression(self) -> float:
        """Dense float32 size divided by what this form stores."""
        return self.out_features * self.in_features * FLOAT_BYTES / self.nbytes()

    def config(self) -> dict[str, Any]:
        config = {"name": self.name, "out_features": self.out_features, "in_features": self.in_features,
                  "options": self.options()}
        return config | ({"value_bits": self.value_bits} if self.value_bits != 32 else {})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        bits = f", int{self.value_bits}" if self.value_bits != 32 else ""
        return f"{self.out_features}x{self.in_features}" + (f", {opts}" if opts else "") + bits


def form_class(name: str) -> type[WeightForm]:
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(f"unknown weight form {name!r}; known forms: {', '.join(sorted(FORMS))}") from None


def build_form(config: dict[str, Any]) -> WeightForm:
    """Rebuild an (uninitialised) form from ``WeightForm.config()``, e.g. before loading a state dict."""
    cls = form_class(config["name"])
    form = cls(config["out_features"], config["in_features"], **config.get("options", {}))
    if config.get("value_bits", 32) != 32:
        form.set_value_bits(config["value_bits"])
    return form


def uniform_(tensor: torch.Tensor, variance: float) -> torch.Tensor:
    """Fill ``tensor`` from the uniform distribution with the given variance."""
    bound = math.sqrt(3.0 * variance)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)
