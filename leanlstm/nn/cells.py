"""Recurrent cell layers: one direction of one layer of a stack, each cell type registered by name.

A cell layer lists its own weight matrices (``matrices``), each a weight form; the stack (``leanlstm.LSTM``)
never assumes which. A new cell is one file: subclass ``RecurrentLayer`` with a ``cell`` name, implement
``forward``, ``state_sizes``, ``arguments``, ``groups`` and ``select``, and give the runtime and the ONNX
exporter its step.

Structured methods (ISS) remove whole units. ``groups()`` tells them what a unit of the cell is: which rows and
columns of which matrices belong to unit ``k``. ``select()`` returns the smaller layer that keeps some units.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import _VF, nn

from .forms import Dense, WeightForm, build_form
from .gates import NUM_GATES, gate_rows

CELLS: dict[str, type["RecurrentLayer"]] = {}

IndexFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UnitGroup:
    """Units of one kind in a layer (hidden units, projection units), as rows and columns of its matrices.

    ``parts`` holds ``(matrix, dim, index_fn)``: unit set ``u`` owns the indices ``index_fn(u)`` along ``dim`` of
    that matrix. ``output``: unit ``k`` of this group is channel ``k`` of the layer's output, which consumers
    (the next layer, a head) read as column ``k``.
    """

    name: str
    size: int
    parts: tuple[tuple[str, int, IndexFn], ...]
    output: bool


def _same(units: torch.Tensor) -> torch.Tensor:
    return units


class RecurrentLayer(nn.Module):
    """Base of every cell layer: unidirectional (``reverse`` runs over time backwards), weights as forms."""

    cell: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "cell" in cls.__dict__:
            if cls.cell in CELLS:
                raise ValueError(f"cell name {cls.cell!r} is already registered by {CELLS[cls.cell]}")
            CELLS[cls.cell] = cls

    input_size: int
    hidden_size: int
    reverse: bool

    @property
    def matrices(self) -> tuple[str, ...]:
        """Names of the layer's weight matrices; ``form(name)`` is the form of ``weight_<name>``."""
        raise NotImplementedError

    @property
    def output_size(self) -> int:
        """Width of the layer's output (and of the state the next step reads)."""
        return self.hidden_size

    def state_sizes(self) -> tuple[int, ...]:
        raise NotImplementedError

    def arguments(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild a layer of this shape (with dense forms)."""
        raise NotImplementedError

    def groups(self) -> list[UnitGroup]:
        raise NotImplementedError

    def select(self, keep: dict[str, torch.Tensor], inputs: torch.Tensor | None = None) -> "RecurrentLayer":
        raise NotImplementedError

    # --- forms ---------------------------------------------------------------------------------------------
    def form(self, matrix: str) -> WeightForm:
        if matrix not in self.matrices:
            raise ValueError(f"a {self.cell} layer has matrices {self.matrices}, not {matrix!r}")
        return getattr(self, f"weight_{matrix}")

    def forms(self) -> Iterator[tuple[str, WeightForm]]:
        for matrix in self.matrices:
            yield matrix, self.form(matrix)

    def set_form(self, matrix: str, form: WeightForm) -> None:
        old = self.form(matrix)
        if form.shape != old.shape:
            raise ValueError(f"weight_{matrix} must stay {tuple(old.shape)}, got a form of {tuple(form.shape)}")
        reference = next(old.parameters(), None)
        if reference is None:
            reference = next(self.parameters())
        setattr(self, f"weight_{matrix}", form.to(device=reference.device, dtype=reference.dtype))

    def dense_params(self) -> int:
        """Parameters of this layer with every matrix dense."""
        return (sum(form.out_features * form.in_features for _, form in self.forms())
                + sum(p.numel() for _, p in self.named_parameters(recurse=False)))

    def bias_device(self) -> torch.device:
        return next(self.parameters()).device

    def reset_parameters(self, init_range: float) -> None:
        """``uniform(-r, r)`` for every weight and bias."""
        for _, form in self.forms():
            form.reset_parameters(init_range)
        for name, parameter in self.named_parameters(recurse=False):
            nn.init.uniform_(parameter, -init_range, init_range)

    # --- growing ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def widened(self, hidden_size: int | None = None, input_size: int | None = None,
                inputs: torch.Tensor | None = None) -> "RecurrentLayer":
        """A dense layer with more hidden units and/or inputs that computes the same function of the old inputs.

        Unit ``k`` stays unit ``k`` (new units come after the old ones); ``inputs`` says where the old inputs sit
        among the ``input_size`` new ones (default: first). Every old weight keeps its value; every old row reads
        the new inputs and the new units with zeros, so the old units and the layer's old outputs are unchanged;
        the new units' own rows (and biases) are drawn from ``uniform(-r, r)`` with the spread of the layer's
        weights (``r = sqrt(3) * std``), so they compute something and learn. Works for any cell from its
        ``arguments`` and ``select``: ``select`` on a copy whose entries hold their own indices says where each
        old entry goes.

        >>> layer = LSTMLayer(3, 4)
        >>> x, h0, c0 = torch.randn(5, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
        >>> big = layer.widened(hidden_size=6)
        >>> torch.allclose(big(x, torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))[0][..., :4], layer(x, h0, c0)[0])
        True
        """
        hidden = hidden_size or self.hidden_size
        width = input_size or self.input_size
        if hidden < self.hidden_size or width < self.input_size:
            raise ValueError(f"widened() only grows a layer ({self.input_size} inputs, {self.hidden_size} units); "
                             f"got {width} inputs, {hidden} units: use select() to keep fewer")
        inputs = torch.arange(self.input_size) if inputs is None else inputs.cpu()
        everything = {group.name: torch.arange(group.size) for group in self.groups()}
        old = self.select(everything)                                   # dense, the same values
        spread = torch.cat([form.materialize().detach().reshape(-1) for _, form in old.forms()]).double().std()
        big = type(self)(**(self.arguments() | {"hidden_size": hidden, "input_size": width})).double()
        big.reset_parameters(float(spread) * 3 ** 0.5 if spread > 0 else 0.1)
        labels = type(self)(**(self.arguments() | {"hidden_size": hidden, "input_size": width})).double()
        for parameter in labels.parameters():
            parameter.copy_(torch.arange(parameter.numel(), dtype=torch.float64).view_as(parameter))
        places = labels.select(everything, inputs)                      # shaped like self: big's flat indices
        for name, place in places.named_parameters():
            target, index = big.get_parameter(name), place.detach().reshape(-1).long()
            target.view(-1)[index] = old.get_parameter(name).detach().reshape(-1).double()
            if target.ndim == 2:                                        # old rows read zeros from what is new
                mapped = torch.zeros(target.numel(), dtype=torch.bool)
                mapped[index] = True
                mapped = mapped.view_as(target)
                target[mapped.any(dim=1, keepdim=True) & ~mapped] = 0.0
        reference = next(self.parameters())
        return big.to(device=reference.device, dtype=reference.dtype).train(self.training)

    # --- configuration -------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"cell": self.cell, **self.arguments(),
                "forms": {matrix: form.config() for matrix, form in self.forms()}}


def layer_from_config(config: dict[str, Any]) -> RecurrentLayer:
    """An (uninitialised) layer with the cell, sizes and forms of ``RecurrentLayer.config()``."""
    cell = config.get("cell", "lstm")
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; known cells: {', '.join(sorted(CELLS))}")
    arguments = {k: v for k, v in config.items() if k not in ("cell", "forms")}
    layer = CELLS[cell](**arguments)
    for matrix, form_config in config.get("forms", {}).items():
        layer.set_form(matrix, build_form(form_config))
    return layer


class LSTMLayer(RecurrentLayer):
    """One direction of one LSTM layer, as ``torch.nn.LSTM`` computes it:

        gates = W_ih x_t + W_hh h_{t-1} + b_ih + b_hh        (4H, packed [i|f|g|o])
        c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t);    with ``proj_size`` P:  h_t = W_hr (o * tanh(c_t))

    ``weight_ih`` (4H x input), ``weight_hh`` (4H x output_size), ``weight_hr`` (P x H) are weight forms.

    >>> layer = LSTMLayer(3, 4, proj_size=2)
    >>> layer.matrices, layer.output_size, tuple(layer.weight_hh.shape)
    (('ih', 'hh', 'hr'), 2, (16, 2))
    """

    cell = "lstm"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, proj_size: int = 0,
                 reverse: bool = False) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.proj_size = int(input_size), int(hidden_size), int(proj_size)
        self.reverse = bool(reverse)
        gates = NUM_GATES * hidden_size
        self.weight_ih: WeightForm = Dense(gates, input_size)
        self.weight_hh: WeightForm = Dense(gates, self.output_size)
        if proj_size:
            self.weight_hr: WeightForm = Dense(proj_size, hidden_size)
        self.bias_ih = nn.Parameter(torch.empty(gates)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(gates)) if bias else None
        self.reset_parameters(self.hidden_size ** -0.5)                 # PyTorch's default

    @property
    def matrices(self) -> tuple[str, ...]:
        return ("ih", "hh", "hr") if self.proj_size else ("ih", "hh")

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    @property
    def bias(self) -> bool:
        return self.bias_ih is not None

    def state_sizes(self) -> tuple[int, int]:
        return self.output_size, self.hidden_size

    def arguments(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "bias": self.bias,
                "proj_size": self.proj_size, "reverse": self.reverse}

    def flat_weights(self) -> list[torch.Tensor]:
        """In ``torch.nn.LSTM``'s order: w_ih, w_hh, [b_ih, b_hh], [w_hr]."""
        weights = [self.weight_ih.forward_weight(), self.weight_hh.forward_weight()]
        if self.bias_ih is not None:
            weights += [self.bias_ih, self.bias_hh]
        if self.proj_size:
            weights.append(self.weight_hr.forward_weight())
        return weights

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, B, input); h0: (1, B, output_size), c0: (1, B, H) -> output (T, B, output_size), h_n, c_n."""
        if self.reverse:
            x = x.flip(0)
        output, h_n, c_n = _VF.lstm(x, (h0, c0), self.flat_weights(), self.bias, 1, 0.0, self.training, False,
                                    False)
        return (output.flip(0) if self.reverse else output), h_n, c_n

    @staticmethod
    def forward_pair(forward: "LSTMLayer", backward: "LSTMLayer", x: torch.Tensor, h0: torch.Tensor,
                     c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both directions of a bidirectional layer in one call of PyTorch's fused kernel (no flipped copies).

        h0: (2, B, output_size), c0: (2, B, H) -> output (T, B, 2 * output_size), h_n, c_n (2, B, ...).
        """
        weights = forward.flat_weights() + backward.flat_weights()
        return _VF.lstm(x, (h0, c0), weights, forward.bias, 1, 0.0, forward.training, True, False)

    # --- units, for structured removal -------------------------------------------------------------------------
    def groups(self) -> list[UnitGroup]:
        H = self.hidden_size
        rows: IndexFn = lambda units: gate_rows(H, units)  # noqa: E731 - the four gate rows of each unit
        hidden = [("ih", 0, rows), ("hh", 0, rows)]
        if not self.proj_size:
            return [UnitGroup("hidden", H, tuple(hidden + [("hh", 1, _same)]), output=True)]
        return [UnitGroup("hidden", H, tuple(hidden + [("hr", 1, _same)]), output=False),
                UnitGroup("proj", self.proj_size, (("hr", 0, _same), ("hh", 1, _same)), output=True)]

    @torch.no_grad()
    def select(self, keep: dict[str, torch.Tensor], inputs: torch.Tensor | None = None) -> "LSTMLayer":
        """A dense layer keeping units ``keep["hidden"]`` (and ``keep["proj"]``) and input columns ``inputs``."""
        hidden = keep["hidden"].cpu()
        proj = keep["proj"].cpu() if self.proj_size else hidden
        inputs = torch.arange(self.input_size) if inputs is None else inputs.cpu()
        rows = gate_rows(self.hidden_size, hidden)
        small = LSTMLayer(len(inputs), len(hidden), self.bias, len(proj) if self.proj_size else 0, self.reverse)
        reference = self.weight_ih.materialize()
        small = small.to(device=reference.device, dtype=reference.dtype)
        small.weight_ih.weight.copy_(reference[rows][:, inputs])
        small.weight_hh.weight.copy_(self.weight_hh.materialize()[rows][:, proj])
        if self.proj_size:
            small.weight_hr.weight.copy_(self.weight_hr.materialize()[proj][:, hidden])
        if self.bias:
            small.bias_ih.copy_(self.bias_ih[rows])
            small.bias_hh.copy_(self.bias_hh[rows])
        return small

    def extra_repr(self) -> str:
        extra = (f", proj_size={self.proj_size}" if self.proj_size else "") + (", reverse" if self.reverse else "")
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}{extra}"
