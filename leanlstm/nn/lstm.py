"""``leanlstm.LSTM``: a drop-in for ``torch.nn.LSTM`` whose weight matrices are pluggable weight forms.

Training speed comes from PyTorch's fused LSTM kernel: each forward materialises every form once and hands
the dense matrices to the kernel, so gradients flow through the materialisation into the forms.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import _VF, nn

from .forms import Dense, WeightForm, build_form, form_class
from .gates import NUM_GATES

MATRICES = ("ih", "hh")  # input-to-hidden, hidden-to-hidden

State = tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]


class LSTMLayer(nn.Module):
    """One unidirectional LSTM layer: ``weight_ih`` (4H x input), ``weight_hh`` (4H x H) and biases."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih: WeightForm = Dense(NUM_GATES * hidden_size, input_size)
        self.weight_hh: WeightForm = Dense(NUM_GATES * hidden_size, hidden_size)
        self.bias_ih = nn.Parameter(torch.empty(NUM_GATES * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(NUM_GATES * hidden_size)) if bias else None

    def form(self, matrix: str) -> WeightForm:
        return getattr(self, f"weight_{matrix}")

    def set_form(self, matrix: str, form: WeightForm) -> None:
        old = self.form(matrix)
        if form.shape != old.shape:
            raise ValueError(f"weight_{matrix} must stay {tuple(old.shape)}, got a form of {tuple(form.shape)}")
        setattr(self, f"weight_{matrix}", form.to(device=self.bias_device(), dtype=torch.float32))

    def bias_device(self) -> torch.device:
        return next(self.parameters()).device

    def flat_weights(self) -> list[torch.Tensor]:
        weights = [self.weight_ih.training_weight(), self.weight_hh.training_weight()]
        if self.bias_ih is not None:
            weights += [self.bias_ih, self.bias_hh]
        return weights

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, B, input); h0, c0: (1, B, H) -> output (T, B, H), h_n, c_n (1, B, H)."""
        output, h_n, c_n = _VF.lstm(x, (h0, c0), self.flat_weights(), self.bias_ih is not None,
                                    1, 0.0, self.training, False, False)
        return output, h_n, c_n

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}"


def _as_sizes(hidden_size: int | Sequence[int], num_layers: int | None) -> list[int]:
    if isinstance(hidden_size, int):
        if num_layers is None:
            num_layers = 1
        sizes = [hidden_size] * num_layers
    else:
        sizes = [int(s) for s in hidden_size]
        if num_layers is not None and num_layers != len(sizes):
            raise ValueError(f"num_layers={num_layers} but hidden_size lists {len(sizes)} layer sizes {sizes}")
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"hidden sizes must be positive and at least one layer is needed, got {sizes}")
    return sizes


def dense_lstm_params(input_size: int, hidden_sizes: Sequence[int], bias: bool = True) -> int:
    """Parameters of a dense LSTM stack: ``4H(in + H)`` weights and ``8H`` biases per layer."""
    inputs = [input_size] + list(hidden_sizes[:-1])
    return sum(NUM_GATES * h * (i + h) + (2 * NUM_GATES * h if bias else 0) for i, h in zip(inputs, hidden_sizes))


class LSTM(nn.Module):
    """Stacked LSTM with the constructor and ``forward`` contract of ``torch.nn.LSTM``.

    ``hidden_size`` may be a list of per-layer sizes. With equal sizes the state is ``(h, c)`` with tensors of
    shape ``(num_layers, B, H)`` exactly as in PyTorch; with unequal sizes ``h`` and ``c`` are lists of
    per-layer ``(1, B, H_l)`` tensors (``(1, H_l)`` unbatched).

    >>> lstm = LSTM(8, [6, 4], num_layers=2)
    >>> out, (h, c) = lstm(torch.zeros(5, 3, 8))
    >>> tuple(out.shape), [tuple(t.shape) for t in h]
    ((5, 3, 4), [(1, 3, 6), (1, 3, 4)])
    """

    def __init__(self, input_size: int, hidden_size: int | Sequence[int], num_layers: int | None = None,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.hidden_sizes = _as_sizes(hidden_size, num_layers)
        self.input_size, self.bias, self.batch_first, self.dropout = input_size, bias, batch_first, dropout
        inputs = [input_size] + self.hidden_sizes[:-1]
        self.layers = nn.ModuleList(LSTMLayer(i, h, bias) for i, h in zip(inputs, self.hidden_sizes))
        self.reset_parameters()

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def hidden_size(self) -> int | list[int]:
        sizes = set(self.hidden_sizes)
        return self.hidden_sizes[0] if len(sizes) == 1 else list(self.hidden_sizes)

    @property
    def uniform_sizes(self) -> bool:
        return len(set(self.hidden_sizes)) == 1

    def reset_parameters(self, init_range: float | None = None) -> None:
        """``uniform(-r, r)`` for every weight and bias; ``r = 1/sqrt(H)`` by default, as in PyTorch."""
        for layer in self.layers:
            r = init_range if init_range is not None else layer.hidden_size ** -0.5
            for matrix in MATRICES:
                layer.form(matrix).reset_parameters(r)
            if layer.bias_ih is not None:
                nn.init.uniform_(layer.bias_ih, -r, r)
                nn.init.uniform_(layer.bias_hh, -r, r)

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, hx: State | None = None) -> tuple[torch.Tensor, State]:
        self._check_input(x)
        unbatched = x.dim() == 2
        x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)  # (T, B, in)
        h0, c0 = self._initial_state(hx, x, unbatched)
        h_n, c_n = [], []
        for index, layer in enumerate(self.layers):
            if index and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            x, h, c = layer(x, h0[index], c0[index])
            h_n.append(h)
            c_n.append(c)
        if unbatched:
            x, h_n, c_n = x.squeeze(1), [h.squeeze(1) for h in h_n], [c.squeeze(1) for c in c_n]
        elif self.batch_first:
            x = x.transpose(0, 1)
        if self.uniform_sizes:
            return x, (torch.cat(h_n, 0), torch.cat(c_n, 0))
        return x, (h_n, c_n)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LSTM input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"LSTM input must be floating point, got {x.dtype}; convert with x.float()")
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            layout = "(batch, seq, input)" if self.batch_first else "(seq, batch, input)"
            raise ValueError(f"LSTM expects input of shape {layout} or (seq, input) with input="
                             f"{self.input_size}, got {tuple(x.shape)}")

    def _initial_state(self, hx: State | None, x: torch.Tensor, unbatched: bool
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batch = x.shape[1]
        if hx is None:
            zeros = [x.new_zeros(1, batch, size) for size in self.hidden_sizes]
            return zeros, [z.clone() for z in zeros]
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("hx must be a pair (h0, c0)")
        return tuple(self._split_state(part, name, batch, unbatched, x) for part, name in zip(hx, "hc"))

    def _split_state(self, state: Any, name: str, batch: int, unbatched: bool, x: torch.Tensor
                     ) -> list[torch.Tensor]:
        per_layer = list(state.unbind(0)) if isinstance(state, torch.Tensor) else list(state)
        if isinstance(state, torch.Tensor) and not self.uniform_sizes:
            raise ValueError(f"{name}0 must be a list of per-layer tensors for per-layer sizes {self.hidden_sizes}")
        if len(per_layer) != self.num_layers:
            raise ValueError(f"{name}0 holds {len(per_layer)} layers, the LSTM has {self.num_layers}")
        out = []
        for index, (tensor, size) in enumerate(zip(per_layer, self.hidden_sizes)):
            tensor = tensor.reshape(tensor.shape[-1:]) if unbatched and tensor.dim() == 2 else tensor
            expected = (size,) if unbatched else (batch, size)
            if tensor.dim() == len(expected) + 1 and tensor.shape[0] == 1:
                tensor = tensor[0]  # accept the per-layer (1, B, H) layout that forward returns
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name}0 of layer {index} must have shape {expected}, got {tuple(tensor.shape)}")
            if tensor.dtype != x.dtype:
                raise TypeError(f"{name}0 has dtype {tensor.dtype} but the input has {x.dtype}")
            out.append(tensor.reshape(1, 1 if unbatched else batch, size))
        return out

    # --- weight forms --------------------------------------------------------------------------------
    def forms(self) -> Iterator[tuple[str, WeightForm]]:
        """``("layers.0.weight_ih", form), ...`` for every weight matrix."""
        for index, layer in enumerate(self.layers):
            for matrix in MATRICES:
                yield f"layers.{index}.weight_{matrix}", layer.form(matrix)

    def replace_forms(self, form: str | type[WeightForm] | Callable[[torch.Tensor], WeightForm], *,
                      layers: Sequence[int] | None = None, matrices: Sequence[str] = MATRICES,
                      **options: Any) -> "LSTM":
        """Swap weight forms in one call, fitting each new form to the current (trained) matrix.

        >>> lstm = LSTM(16, 32, 2).replace_forms("lowrank", rank=4)
        >>> type(lstm.layers[1].weight_hh).__name__
        'LowRank'
        """
        if isinstance(form, str):
            form = form_class(form)
        build = form.from_dense if isinstance(form, type) else form
        for index in range(self.num_layers) if layers is None else layers:
            layer = self.layers[index]
            for matrix in matrices:
                if matrix not in MATRICES:
                    raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
                dense = layer.form(matrix).materialize().detach().cpu().float()
                layer.set_form(matrix, build(dense, **options))
        return self

    def stored_params(self) -> int:
        """Float32-equivalent parameters stored by the forms (index overhead included) plus biases."""
        biases = sum(b.numel() for layer in self.layers for b in (layer.bias_ih, layer.bias_hh) if b is not None)
        return sum(form.stored_params() for _, form in self.forms()) + biases

    def dense_params(self) -> int:
        """Parameters of the dense ``torch.nn.LSTM`` with the same sizes."""
        return dense_lstm_params(self.input_size, self.hidden_sizes, self.bias)

    # --- configuration and conversion ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": list(self.hidden_sizes), "bias": self.bias,
                "batch_first": self.batch_first, "dropout": self.dropout,
                "forms": {name: form.config() for name, form in self.forms()}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LSTM":
        """An LSTM with the structure in ``config`` (weights uninitialised until a state dict is loaded)."""
        lstm = cls(config["input_size"], config["hidden_size"], bias=config["bias"],
                   batch_first=config["batch_first"], dropout=config["dropout"])
        for name, form_config in config.get("forms", {}).items():
            _, index, matrix = name.split(".")
            lstm.layers[int(index)].set_form(matrix.removeprefix("weight_"), build_form(form_config))
        return lstm

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """Copy a ``torch.nn.LSTM`` into a ``leanlstm.LSTM`` with dense forms."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        if module.bidirectional or module.proj_size:
            raise ValueError("bidirectional LSTMs and proj_size are not supported by leanlstm.LSTM")
        lstm = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                   batch_first=module.batch_first, dropout=module.dropout)
        with torch.no_grad():
            for index, layer in enumerate(lstm.layers):
                for matrix in MATRICES:
                    layer.form(matrix).weight.copy_(getattr(module, f"weight_{matrix}_l{index}"))
                    if module.bias:
                        getattr(layer, f"bias_{matrix}").copy_(getattr(module, f"bias_{matrix}_l{index}"))
        return lstm.to(next(module.parameters()).device)

    def to_torch(self) -> nn.LSTM:
        """A dense ``torch.nn.LSTM`` computing the same function (forms are materialised)."""
        if not self.uniform_sizes:
            raise ValueError(f"torch.nn.LSTM needs equal layer sizes; this LSTM has {self.hidden_sizes}")
        module = nn.LSTM(self.input_size, self.hidden_sizes[0], self.num_layers, bias=self.bias,
                         batch_first=self.batch_first, dropout=self.dropout)
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                for matrix in MATRICES:
                    getattr(module, f"weight_{matrix}_l{index}").copy_(layer.form(matrix).materialize())
                    if self.bias:
                        getattr(module, f"bias_{matrix}_l{index}").copy_(getattr(layer, f"bias_{matrix}"))
        return module.to(self.layers[0].bias_device())


def lstm_of(model: nn.Module) -> LSTM:
    """The ``leanlstm.LSTM`` of a model (``model.lstm``) or the model itself; methods transform through it."""
    lstm = getattr(model, "lstm", model)
    if not isinstance(lstm, LSTM):
        raise TypeError(f"this method compresses a leanlstm.LSTM (or a model with one as .lstm), got "
                        f"{type(lstm).__name__}")
    return lstm
