"""``leanlstm.LSTM``: a drop-in for ``torch.nn.LSTM`` whose weight matrices are pluggable weight forms.

The whole ``torch.nn.LSTM`` contract holds: ``bidirectional``, ``proj_size``, ``batch_first``, unbatched input,
the state layout ``(L * D, B, size)``, and PyTorch's argument checks. Training speed comes from PyTorch's fused
LSTM kernel: each forward materialises every form once and hands the dense matrices to the kernel, so gradients
flow through the materialisation into the forms.

``layers`` holds one cell layer per layer and direction, in PyTorch's order (index ``l * D + d``, ``d = 1`` the
reverse direction); each lists its own weight matrices (``leanlstm.nn.cells``), so the stack assumes no cell.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import _VF, nn

from .cells import CELLS, LSTMLayer, RecurrentLayer, layer_from_config
from .forms import WeightForm, build_form, form_class
from .gates import NUM_GATES

State = tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]


# --- argument checks, worded as PyTorch's ---------------------------------------------------------------------
def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


def _check_positive(name: str, value: int) -> None:
    _check_type(name, value, int)
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero")


def _as_sizes(hidden_size: int | Sequence[int], num_layers: int | None) -> list[int]:
    if isinstance(hidden_size, Sequence) and not isinstance(hidden_size, str):
        sizes = list(hidden_size)
        if not sizes:
            raise ValueError("hidden_size lists no layer sizes; give at least one")
        for size in sizes:
            _check_positive("hidden_size", size)
        if num_layers is not None:
            _check_positive("num_layers", num_layers)
            if num_layers != len(sizes):
                raise ValueError(f"num_layers={num_layers} but hidden_size lists {len(sizes)} layer sizes {sizes}")
        return sizes
    _check_positive("hidden_size", hidden_size)
    num_layers = 1 if num_layers is None else num_layers
    _check_positive("num_layers", num_layers)
    return [hidden_size] * num_layers


def _check_dropout(dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element "
                         f"being zeroed, got {dropout!r}")


def dense_lstm_params(input_size: int, hidden_sizes: Sequence[int], bias: bool = True, *,
                      proj_size: int = 0, bidirectional: bool = False) -> int:
    """Parameters of a dense LSTM stack: ``4H(in + out) (+ P H)`` weights and ``8H`` biases per layer and direction.

    >>> dense_lstm_params(10, [20])
    2560
    """
    directions = 2 if bidirectional else 1
    total, inputs = 0, input_size
    for hidden in hidden_sizes:
        output = proj_size or hidden
        per_direction = NUM_GATES * hidden * (inputs + output) + proj_size * hidden
        total += directions * (per_direction + (2 * NUM_GATES * hidden if bias else 0))
        inputs = directions * output
    return total


class LSTM(nn.Module):
    """Stacked LSTM with the constructor and ``forward`` contract of ``torch.nn.LSTM``.

    ``hidden_size`` may be a list of per-layer sizes. With equal sizes the state is ``(h, c)`` with tensors of
    shape ``(num_layers * D, B, H)`` exactly as in PyTorch; with unequal sizes ``h`` and ``c`` are lists of
    per-(layer, direction) ``(1, B, H_l)`` tensors (``(1, H_l)`` unbatched), in the same order.

    >>> lstm = LSTM(8, [6, 4], num_layers=2)
    >>> out, (h, c) = lstm(torch.zeros(5, 3, 8))
    >>> tuple(out.shape), [tuple(t.shape) for t in h]
    ((5, 3, 4), [(1, 3, 6), (1, 3, 4)])
    >>> out, (h, c) = LSTM(8, 6, 2, bidirectional=True, proj_size=3)(torch.zeros(5, 3, 8))
    >>> tuple(out.shape), tuple(h.shape), tuple(c.shape)
    ((5, 3, 6), (4, 3, 3), (4, 3, 6))
    """

    def __init__(self, input_size: int, hidden_size: int | Sequence[int], num_layers: int | None = None,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, cell: str | Sequence[str] = "lstm",
                 cell_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__()
        _check_positive("input_size", input_size)
        for name, flag in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            _check_type(name, flag, bool)
        _check_dropout(dropout)
        self.hidden_sizes = _as_sizes(hidden_size, num_layers)
        _check_type("proj_size", proj_size, int)
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size and proj_size >= min(self.hidden_sizes):
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size, self.bias, self.batch_first, self.dropout = input_size, bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.cell, self.cell_options = cell if isinstance(cell, str) else list(cell), cell_options
        # each layer draws its own initial weights (PyTorch's uniform(-1/sqrt(H), 1/sqrt(H))), in the order the
        # stack always drew them, so a seed gives the same model as before the cell seam
        self.layers = nn.ModuleList(self._build_layers(*self._per_layer_cells(cell, cell_options)))
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _per_layer_cells(self, cell: str | Sequence[str], options: Any) -> tuple[list[str], list[dict[str, Any]]]:
        """Cell name and options of every layer: one for all, or a list with one per layer (a mixed stack)."""
        cells = [cell] * self.num_layers if isinstance(cell, str) else list(cell)
        options = [options or {}] * self.num_layers if options is None or isinstance(options, dict) else list(options)
        if len(cells) != self.num_layers or len(options) != self.num_layers:
            raise ValueError(f"give one cell (and cell_options) for all layers or one per layer; the stack has "
                             f"{self.num_layers} layers, got cell={cell!r}, cell_options={options!r}")
        unknown = sorted(set(cells) - set(CELLS))
        if unknown:
            raise ValueError(f"unknown cell {unknown[0]!r}; known cells: {', '.join(sorted(CELLS))}")
        if self.proj_size and set(cells) != {"lstm"}:
            raise ValueError(f"proj_size applies to LSTM cells only; this stack's cells are {cells}")
        return cells, [dict(o) for o in options]

    def _build_layers(self, cells: list[str], options: list[dict[str, Any]]) -> list[RecurrentLayer]:
        layers, inputs = [], self.input_size
        for hidden, cell, extra in zip(self.hidden_sizes, cells, options):
            for direction in range(self.num_directions):
                arguments = {"input_size": inputs, "hidden_size": hidden, "bias": self.bias,
                             "reverse": bool(direction)} | ({"proj_size": self.proj_size} if self.proj_size else {})
                layers.append(CELLS[cell](**arguments, **extra))
            inputs = self.num_directions * layers[-1].output_size
        return layers

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def hidden_size(self) -> int | list[int]:
        sizes = set(self.hidden_sizes)
        return self.hidden_sizes[0] if len(sizes) == 1 else list(self.hidden_sizes)

    @property
    def uniform_sizes(self) -> bool:
        return len(set(self.hidden_sizes)) == 1

    @property
    def output_size(self) -> int:
        """Width of the stack's output at each time step: ``D * (proj_size or hidden_sizes[-1])``."""
        return self.num_directions * self.layers[-1].output_size

    def layer(self, index: int, direction: int = 0) -> RecurrentLayer:
        """The cell layer of layer ``index`` and ``direction`` (1: reverse)."""
        return self.layers[index * self.num_directions + direction]

    def reset_parameters(self, init_range: float | None = None) -> None:
        """``uniform(-r, r)`` for every weight and bias; ``r = 1/sqrt(H)`` by default, as in PyTorch."""
        for layer in self.layers:
            layer.reset_parameters(init_range if init_range is not None else layer.hidden_size ** -0.5)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, hx: State | None = None) -> tuple[torch.Tensor, State]:
        self._check_input(x)
        unbatched = x.dim() == 2
        x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)  # (T, B, in)
        h0, c0 = self._initial_state(hx, x, unbatched)
        if self._fused():
            x, h_n, c_n = self._run_fused(x, h0, c0)
        else:
            x, h_n, c_n = self._run_layers(x, h0, c0)
        if unbatched:
            x, h_n, c_n = x.squeeze(1), [h.squeeze(1) for h in h_n], [c.squeeze(1) for c in c_n]
        elif self.batch_first:
            x = x.transpose(0, 1)
        if self.uniform_sizes:
            return x, (torch.cat(h_n, 0), torch.cat(c_n, 0))
        return x, (h_n, c_n)

    def _fused(self) -> bool:
        """Whether PyTorch's fused kernel can run the whole stack in one call: LSTM cells of one size. Per-layer
        calls cost up to 6% of the training throughput of the PTB ``small`` stack (2x200)."""
        return self.uniform_sizes and all(type(layer) is LSTMLayer for layer in self.layers)

    def _run_fused(self, x: torch.Tensor, h0: list[torch.Tensor], c0: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Every layer and direction in one call, with dropout between layers, exactly as torch.nn.LSTM runs."""
        weights = [w for layer in self.layers for w in layer.flat_weights()]
        out, h, c = _VF.lstm(x, (torch.cat(h0), torch.cat(c0)), weights, self.bias, self.num_layers, self.dropout,
                             self.training, self.bidirectional, False)
        return out, list(h.split(1)), list(c.split(1))

    def _run_layers(self, x: torch.Tensor, h0: list[torch.Tensor], c0: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Layer by layer (per-layer sizes, other cells), with dropout between layers."""
        h_n, c_n, D = [], [], self.num_directions
        for index in range(self.num_layers):
            if index and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            flat = slice(index * D, (index + 1) * D)
            x, h, c = self._run_layer(self.layers[flat], x, h0[flat], c0[flat])
            h_n += h
            c_n += c
        return x, h_n, c_n

    @staticmethod
    def _run_layer(directions: Sequence[RecurrentLayer], x: torch.Tensor, h0: list[torch.Tensor],
                   c0: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One layer, all its directions; outputs concatenated ``[forward | reverse]`` along features."""
        if len(directions) == 2 and all(type(d) is LSTMLayer for d in directions):
            out, h, c = LSTMLayer.forward_pair(*directions, x, torch.cat(h0), torch.cat(c0))
            return out, list(h.split(1)), list(c.split(1))
        outputs, h_n, c_n = [], [], []
        for layer, h, c in zip(directions, h0, c0):
            out, h, c = layer(x, h, c)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)), h_n, c_n

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LSTM input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"LSTM input must be floating point, got {x.dtype}; convert with x.float()")
        weight = next(self.layers[0].parameters())
        if x.dtype != weight.dtype:
            raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). Convert "
                             f"input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            layout = "(batch, seq, input)" if self.batch_first else "(seq, batch, input)"
            raise ValueError(f"LSTM expects input of shape {layout} or (seq, input) with input="
                             f"{self.input_size}, got {tuple(x.shape)}")

    def _initial_state(self, hx: State | None, x: torch.Tensor, unbatched: bool
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batch = x.shape[1]
        if hx is None:
            return ([x.new_zeros(1, batch, layer.state_sizes()[0]) for layer in self.layers],
                    [x.new_zeros(1, batch, layer.state_sizes()[1]) for layer in self.layers])
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("hx must be a pair (h0, c0) of tensors (or of per-layer lists); pass None for zeros")
        return tuple(self._split_state(part, name, which, batch, unbatched, x)
                     for which, (part, name) in enumerate(zip(hx, "hc")))

    def _split_state(self, state: Any, name: str, which: int, batch: int, unbatched: bool, x: torch.Tensor
                     ) -> list[torch.Tensor]:
        if isinstance(state, torch.Tensor):
            if not self.uniform_sizes:
                raise ValueError(f"{name}0 must be a list of per-layer tensors for per-layer sizes "
                                 f"{self.hidden_sizes}")
            per_layer = list(state.unbind(0))
        elif isinstance(state, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in state):
            per_layer = list(state)
        else:
            raise TypeError(f"{name}0 must be a tensor (or a list of per-layer tensors), got "
                            f"{type(state).__name__}")
        if len(per_layer) != len(self.layers):
            raise ValueError(f"{name}0 holds {len(per_layer)} layers, the LSTM has {len(self.layers)} "
                             f"(num_layers * num_directions)")
        out = []
        for index, (tensor, layer) in enumerate(zip(per_layer, self.layers)):
            size = layer.state_sizes()[which]
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

    # --- weight forms --------------------------------------------------------------------------------------
    def forms(self) -> Iterator[tuple[str, WeightForm]]:
        """``("layers.0.weight_ih", form), ...`` for every weight matrix of every layer and direction."""
        for index, layer in enumerate(self.layers):
            for matrix, form in layer.forms():
                yield f"layers.{index}.weight_{matrix}", form

    def replace_forms(self, form: str | type[WeightForm] | Callable[[torch.Tensor], WeightForm], *,
                      layers: Sequence[int] | None = None, matrices: Sequence[str] | None = None,
                      speed_check: bool = True, **options: Any) -> "LSTM":
        """Swap weight forms in one call, fitting each new form to the current (trained) matrix. ``layers`` are
        flat indices into ``self.layers`` (``l * D + d``); ``matrices`` default to all of each layer's. Atomic:
        if any matrix fails to convert, no matrix is changed. ``speed_check`` times every new form against a dense
        matrix of its shape on the engine and logs a warning for each that runs slower (``runtime.speed_check``).

        >>> lstm = LSTM(16, 32, 2).replace_forms("lowrank", rank=4)
        >>> type(lstm.layers[1].weight_hh).__name__
        'LowRank'
        """
        if isinstance(form, str):
            form = form_class(form)
        build = form.from_dense if isinstance(form, type) else form
        indices = range(len(self.layers)) if layers is None else layers
        for index in indices:
            if not 0 <= index < len(self.layers):
                raise IndexError(f"layer index {index} is outside [0, {len(self.layers)})")
            unknown = set(matrices or ()) - set(self.layers[index].matrices)
            if unknown:
                raise ValueError(f"layer {index} has matrices {self.layers[index].matrices}, not "
                                 f"{', '.join(sorted(unknown))}")
        converted = []
        for index in indices:
            layer = self.layers[index]
            for matrix in matrices or layer.matrices:
                dense = layer.form(matrix).materialize().detach().cpu().float()
                converted.append((layer, matrix, build(dense, **options)))
        for layer, matrix, new in converted:
            layer.set_form(matrix, new)
        if speed_check:
            from ..runtime.speed_check import check_forms   # the runtime imports nn: import here
            names = {id(f): n for n, f in self.forms()}
            check_forms([(names[id(new)], new) for _, _, new in converted])
        return self

    def stored_params(self) -> int:
        """Float32-equivalent parameters stored by the forms (index overhead included) plus biases."""
        biases = sum(b.numel() for layer in self.layers for _, b in layer.named_parameters(recurse=False))
        return sum(form.stored_params() for _, form in self.forms()) + biases

    def dense_params(self) -> int:
        """Parameters of the same stack with every matrix dense (for LSTM cells: the ``torch.nn.LSTM``'s)."""
        return sum(layer.dense_params() for layer in self.layers)

    # --- configuration and conversion ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"cell": self.cell, "input_size": self.input_size, "hidden_size": list(self.hidden_sizes),
                "bias": self.bias, "batch_first": self.batch_first, "dropout": self.dropout,
                "bidirectional": self.bidirectional, "proj_size": self.proj_size, "cell_options": self.cell_options,
                "layers": [layer.config() for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LSTM":
        """An LSTM with the structure in ``config`` (weights uninitialised until a state dict is loaded)."""
        lstm = cls(config["input_size"], config["hidden_size"], bias=config["bias"],
                   batch_first=config["batch_first"], dropout=config["dropout"],
                   bidirectional=config.get("bidirectional", False), proj_size=config.get("proj_size", 0),
                   cell=config.get("cell", "lstm"), cell_options=config.get("cell_options"))
        if "layers" in config:
            if len(config["layers"]) != len(lstm.layers):
                raise ValueError(f"the config lists {len(config['layers'])} layers for {len(lstm.layers)}")
            with torch.random.fork_rng():      # weights come from a state dict: drawing them must not move the seed
                lstm.layers = nn.ModuleList(layer_from_config(layer) for layer in config["layers"])
        for name, form_config in config.get("forms", {}).items():   # the format before per-layer configs
            layer_name, _, attribute = name.rpartition(".")
            lstm.get_submodule(layer_name).set_form(attribute.removeprefix("weight_"), build_form(form_config))
        return lstm

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """Copy a ``torch.nn.LSTM`` into a ``leanlstm.LSTM`` with dense forms (same mode, device and dtype)."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        reference = next(module.parameters())
        lstm = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                   batch_first=module.batch_first, dropout=float(module.dropout),
                   bidirectional=module.bidirectional, proj_size=module.proj_size)
        lstm = lstm.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for index, layer in enumerate(lstm.layers):
                for name, tensor in _torch_weights(module, index, lstm.num_directions).items():
                    _dense_slot(layer, name).copy_(tensor)
        return lstm.train(module.training)

    def to_torch(self) -> "nn.LSTM | TorchLSTMChain":
        """Dense PyTorch modules computing the same function (forms are materialised): one ``torch.nn.LSTM``
        when every layer has the same size, else a ``TorchLSTMChain`` of one ``torch.nn.LSTM`` per layer (per-layer
        sizes, as ISS leaves them), which takes and returns state as this stack does.

        >>> lstm, x = LSTM(8, [12, 5]), torch.ones(3, 8)
        >>> chain = lstm.to_torch()
        >>> [type(m).__name__ for m in chain.layers], torch.allclose(chain(x)[0], lstm(x)[0])
        (['LSTM', 'LSTM'], True)
        """
        if self.cell != "lstm":
            raise ValueError(f"torch.nn.LSTM holds LSTM cells only; this stack's cell is {self.cell!r}")
        reference = self.layers[0].weight_ih.materialize()
        if not self.uniform_sizes:
            chain = TorchLSTMChain([self._torch_layer(index, reference) for index in range(self.num_layers)],
                                   self.dropout, self.batch_first)
            return chain.train(self.training)
        module = nn.LSTM(self.input_size, self.hidden_sizes[0], self.num_layers, bias=self.bias,
                         batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                         proj_size=self.proj_size, device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                for name, tensor in _torch_weights(module, index, self.num_directions).items():
                    tensor.copy_(_dense_value(layer, name))
        return module.train(self.training)

    def _torch_layer(self, index: int, reference: torch.Tensor) -> nn.LSTM:
        """Layer ``index`` (every direction) as a one-layer ``torch.nn.LSTM``."""
        directions = [self.layer(index, d) for d in range(self.num_directions)]
        first = directions[0]
        module = nn.LSTM(first.input_size, first.hidden_size, bias=self.bias, batch_first=self.batch_first,
                         bidirectional=self.bidirectional, proj_size=first.proj_size, device=reference.device,
                         dtype=reference.dtype)
        with torch.no_grad():
            for d, layer in enumerate(directions):
                for name, tensor in _torch_weights(module, d, self.num_directions).items():
                    tensor.copy_(_dense_value(layer, name))
        return module


class TorchLSTMChain(nn.Module):
    """One ``torch.nn.LSTM`` per layer, run as one stack (``LSTM.to_torch()`` for per-layer sizes): dropout between
    layers in training mode, and state as ``leanlstm.LSTM`` keeps it for unequal sizes, ``(h, c)`` lists with one
    ``(1, B, size)`` tensor per layer and direction (``(1, size)`` for unbatched input)."""

    def __init__(self, layers: Sequence[nn.LSTM], dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout, self.batch_first = dropout, batch_first
        self.num_directions = 2 if layers[0].bidirectional else 1

    @property
    def hidden_sizes(self) -> list[int]:
        return [layer.hidden_size for layer in self.layers]

    def forward(self, x: torch.Tensor, hx: State | None = None) -> tuple[torch.Tensor, State]:
        D, h_n, c_n = self.num_directions, [], []
        for index, layer in enumerate(self.layers):
            if index and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            flat = slice(index * D, (index + 1) * D)
            state = None if hx is None else (torch.cat(list(hx[0][flat])), torch.cat(list(hx[1][flat])))
            x, (h, c) = layer(x, state)
            h_n += list(h.split(1))
            c_n += list(c.split(1))
        return x, (h_n, c_n)


def _torch_weights(module: nn.LSTM, index: int, directions: int) -> dict[str, torch.Tensor]:
    """``{"weight_ih": tensor, ...}`` of the flat layer ``index`` of a ``torch.nn.LSTM``."""
    suffix = f"_l{index // directions}" + ("_reverse" if index % directions else "")
    return {name: getattr(module, name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                              "weight_hr") if hasattr(module, name + suffix)}


def _dense_slot(layer: RecurrentLayer, name: str) -> torch.Tensor:
    """The tensor that holds ``name`` in a freshly built (dense) layer."""
    return getattr(layer, name) if name.startswith("bias") else layer.form(name.removeprefix("weight_")).weight


def _dense_value(layer: RecurrentLayer, name: str) -> torch.Tensor:
    return getattr(layer, name) if name.startswith("bias") else layer.form(name.removeprefix("weight_")).materialize()

