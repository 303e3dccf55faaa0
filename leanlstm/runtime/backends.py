"""Inference backends that ``latency`` can time, each a small function registered by name.

A backend builder takes ``(model, inputs, threads)`` and returns a zero-argument callable that runs the
whole sequence ``inputs`` at batch 1 from a zero state. ``inputs`` is (T, input) float32 for an LSTM or
(T,) int64 token ids for a language model. Adding a backend is one decorated function; nothing else changes.

- ``leanlstm``: this package's engine, running every weight form through its own structure;
- ``torch``: the equivalent dense ``torch.nn.LSTM`` (forms materialised), eager, under ``inference_mode``;
- ``torch-int8``: the same after ``torch.ao.quantization.quantize_dynamic`` (int8 weights of LSTM and decoder);
- ``onnxruntime``: the equivalent dense model exported to ONNX (the fused ``LSTM`` operator);
- ``onnxruntime-forms``: the model exported with its forms' structure (``runtime.onnx``), for comparison;
- ``leanlstm-stream`` and ``onnxruntime-stream``: true streaming, one input at a time with the state carried
  between calls (``Engine.stream()``; one ``T = 1`` ONNX Runtime call per step with state inputs), as an
  application sees inputs that arrive one by one. Nothing is batched over time, so these are slower per
  step than the whole-sequence backends.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn import LSTM
from .engine import compile as compile_engine

Runner = Callable[[], Any]
Builder = Callable[[nn.Module, np.ndarray, int], Runner]
BACKENDS: dict[str, Builder] = {}


def backend(name: str) -> Callable[[Builder], Builder]:
    """Register a backend builder under ``name``."""
    def register(builder: Builder) -> Builder:
        BACKENDS[name] = builder
        return builder
    return register


def get_backend(name: str) -> Builder:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}") from None


@backend("leanlstm")
def _leanlstm(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    engine = compile_engine(model)
    return lambda: engine.run(inputs)


@backend("leanlstm-stream")
def _leanlstm_stream(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    stream = compile_engine(model).stream()
    steps = [x for x in inputs] if inputs.dtype != np.int64 else [int(token) for token in inputs]

    def run():
        stream.reset()
        return [stream.step(x) for x in steps]
    return run


# --- PyTorch ---------------------------------------------------------------------------------------------
class DenseTorch(nn.Module):
    """The dense PyTorch equivalent of a leanlstm ``LSTM`` or language model, for baselines.

    Equal layer sizes give one ``torch.nn.LSTM`` (``LSTM.to_torch()``); per-layer sizes a chain of
    one-layer ``nn.LSTM``s. A language model keeps its embedding and decoder. ``forward(x)`` takes
    (T, 1, input) floats or (T, 1) token ids and returns (T, 1, H) outputs or logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        lstm = getattr(model, "lstm", model)
        lstm = lstm if isinstance(lstm, LSTM) else LSTM.from_torch(lstm)
        with torch.no_grad():
            if lstm.uniform_sizes:
                self.lstms = nn.ModuleList([lstm.to_torch()])
                self.lstms[0].batch_first = False                  # it is fed (T, 1, ...)
            else:
                self.lstms = nn.ModuleList(_single_layer_torch(lstm, index) for index in range(lstm.num_layers))
        self.embedding = copy.deepcopy(model.embedding) if hasattr(model, "lstm") else None
        self.decoder = copy.deepcopy(model.decoder) if hasattr(model, "lstm") else None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)                                 # (T, 1, E)
        for lstm in self.lstms:
            x, _ = lstm(x)
        return x if self.decoder is None else self.decoder(x)


def _single_layer_torch(lstm: LSTM, index: int) -> nn.LSTM:
    layer = lstm.layers[index]
    module = nn.LSTM(layer.input_size, layer.hidden_size, bias=layer.bias_ih is not None)
    for matrix in ("ih", "hh"):
        getattr(module, f"weight_{matrix}_l0").copy_(layer.form(matrix).materialize())
        if layer.bias_ih is not None:
            getattr(module, f"bias_{matrix}_l0").copy_(getattr(layer, f"bias_{matrix}"))
    return module


def _torch_runner(module: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    x = torch.from_numpy(inputs).unsqueeze(1)                     # batch of one: (T, 1, ...)

    def run():
        with torch.inference_mode():
            return module(x)
    return run


@backend("torch")
def _torch(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    return _torch_runner(DenseTorch(model).cpu(), inputs, threads)


@backend("torch-int8")
def _torch_int8(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    # quantize_dynamic swaps child modules only, so the LSTMs must sit inside a container (DenseTorch).
    with warnings.catch_warnings():                               # deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(DenseTorch(model).cpu(), {nn.LSTM, nn.Linear},
                                                           dtype=torch.qint8)
    return _torch_runner(quantized, inputs, threads)


# --- ONNX Runtime ----------------------------------------------------------------------------------------
def time_major_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` that reads (T, B, ...): the backends feed one sequence as (T, 1, ...), which a
    ``batch_first`` model would read as T sequences of one step."""
    copied = copy.deepcopy(model).cpu()
    lstm = getattr(copied, "lstm", copied)
    if isinstance(lstm, (LSTM, nn.LSTM)):
        lstm.batch_first = False
    return copied


def dense_copy(model: nn.Module) -> nn.Module:
    """A time-major copy of ``model`` whose LSTM weights are all dense forms (materialised)."""
    dense = time_major_copy(model)
    lstm = getattr(dense, "lstm", dense)
    if isinstance(lstm, LSTM):
        lstm.replace_forms("dense")
    return dense


def _ort_session(proto: Any, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_runner(proto: Any, inputs: np.ndarray, threads: int) -> Runner:
    session = _ort_session(proto, threads)
    name = session.get_inputs()[0].name
    feed = {name: inputs[:, None] if inputs.dtype == np.int64 else inputs[:, None, :]}   # batch of one
    return lambda: session.run(None, feed)


@backend("onnxruntime")
def _onnxruntime(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    from .onnx import to_onnx

    return _ort_runner(to_onnx(dense_copy(model), state_inputs=False), inputs, threads)


@backend("onnxruntime-forms")
def _onnxruntime_forms(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    from .onnx import to_onnx

    return _ort_runner(to_onnx(time_major_copy(model), state_inputs=False), inputs, threads)


@backend("onnxruntime-stream")
def _onnxruntime_stream(model: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    from .onnx import to_onnx

    session = _ort_session(to_onnx(dense_copy(model), state_inputs=True), threads)
    names = [i.name for i in session.get_inputs()]
    states = [np.zeros([1 if d == "B" else d for d in i.shape], np.float32) for i in session.get_inputs()[1:]]
    steps = [x[None, None] if inputs.dtype == np.int64 else x[None, None, :] for x in inputs]   # T = B = 1

    def run():
        state, outputs = states, []
        for x in steps:
            y, *state = session.run(None, dict(zip(names, [x, *state])))
            outputs.append(y)
        return outputs
    return run
