"""Inference backends that ``latency`` can time, each a small function registered by name.

A backend builder takes ``(model, inputs, threads)`` and returns a zero-argument callable that runs the
whole sequence ``inputs`` at batch 1 from a zero state. ``model`` is any model ``runtime.compile`` runs, or its
``Pipeline`` (``runtime.pipeline``); ``inputs`` is (T, input) float32, or (T,) int64 token ids for a model that
starts with an embedding. Every backend runs the same whole model (embedding, stacks, heads, last step).
Adding a backend is one decorated function; nothing else changes.

- ``leanlstm``: this package's engine, running every weight form through its own structure;
- ``torch``: the equivalent dense PyTorch model (forms materialised, ``torch.nn.LSTM`` stacks), eager, under
  ``inference_mode``;
- ``torch-int8``: the same after ``torch.ao.quantization.quantize_dynamic`` (int8 weights of LSTMs and heads);
- ``onnxruntime``: the equivalent dense model exported to ONNX (the fused ``LSTM`` operator where it applies);
- ``onnxruntime-forms``: the model exported with its forms' structure (``runtime.onnx``), for comparison;
- ``onnxruntime-int8``: the dense export after ONNX Runtime's ``quantize_dynamic`` (``runtime.onnx_int8``:
  ``DynamicQuantizeLSTM`` with int8 weights, int8 ``MatMul`` heads, activations quantised per step);
- ``leanlstm-int8`` and ``leanlstm-bf16``: the engine with int8 weights (per-row scales, the multiplied vectors
  quantised per step, AVX-512 VNNI; ``runtime.int8``) or bfloat16 weights (AVX-512 BF16; ``runtime.bf16``) for
  every form with an op in that precision, float32 for the others (``compile(model, precision=...)``);
- ``leanlstm-stream``, ``leanlstm-int8-stream``, ``leanlstm-bf16-stream`` and ``onnxruntime-stream``: true
  streaming, one input at a time with the state carried between calls (``Engine.stream()``; one ``T = 1`` ONNX
  Runtime call per step with state inputs), as an application sees inputs that arrive one by one. Nothing is
  batched over time, so these are slower per step than the whole-sequence backends; a bidirectional model cannot
  stream.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn import LSTM, FormLinear
from .engine import compile as compile_engine
from .pipeline import Activation, Affine, Elementwise, LastStep, Pipeline, Recurrent, pipeline_of

Runner = Callable[[], Any]
Builder = Callable[[nn.Module | Pipeline, np.ndarray, int], Runner]
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


def _engine_backends(suffix: str, precision: str) -> None:
    """Register ``leanlstm<suffix>`` (whole sequences) and ``leanlstm<suffix>-stream`` (one input per call) for the
    engine compiled in ``precision``."""
    @backend(f"leanlstm{suffix}")
    def whole(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
        engine = compile_engine(model, precision=precision)
        return lambda: engine.run(inputs)

    @backend(f"leanlstm{suffix}-stream")
    def streamed(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
        stream = compile_engine(model, precision=precision).stream()
        steps = [x for x in inputs] if inputs.dtype != np.int64 else [int(token) for token in inputs]

        def run():
            stream.reset()
            return [stream.step(x) for x in steps]
        return run


# float32; int8 weights with activations quantised per step; bfloat16 weights with inputs rounded per step
for _suffix, _precision in (("", "float32"), ("-int8", "int8"), ("-bf16", "bfloat16")):
    _engine_backends(_suffix, _precision)


# --- PyTorch ---------------------------------------------------------------------------------------------
class DenseTorch(nn.Module):
    """The dense PyTorch equivalent of a model's pipeline, for baselines: embedding, ``torch.nn.LSTM`` stacks
    (forms materialised; one ``nn.LSTM`` per stack of one layer size, a chain of one-layer ones otherwise), heads
    and activations. ``forward(x)`` takes (T, 1, input) floats or (T, 1) token ids (time-major, batch one) and
    returns (T, 1, output), or (1, output) for a model that reads the last step.
    """

    def __init__(self, model: nn.Module | Pipeline) -> None:
        super().__init__()
        pipeline = pipeline_of(model)
        self.embedding = copy.deepcopy(pipeline.embedding)
        self.parts, self._plan = nn.ModuleList(), []   # the plan names modules by index: quantize_dynamic swaps them
        with torch.no_grad():
            for stage in pipeline.stages:
                self._add(stage)
        self.eval()

    def _add(self, stage: Any) -> None:
        if isinstance(stage, Recurrent):
            modules = torch_stack(stage.module)
        elif isinstance(stage, Affine):
            head = stage.module
            modules = [head.to_linear() if isinstance(head, FormLinear) else copy.deepcopy(head)]
        else:
            self._plan.append(("function", _torch_function(stage)))
            return
        for module in modules:
            self._plan.append(("lstm" if isinstance(module, nn.LSTM) else "module", len(self.parts)))
            self.parts.append(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)                                 # (T, 1, E)
        for kind, what in self._plan:
            if kind == "lstm":
                x, _ = self.parts[what](x)
            elif kind == "module":
                x = self.parts[what](x)
            else:
                x = what(x)
        return x


def _torch_function(stage: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(stage, LastStep):
        return lambda x: x[-1]
    if isinstance(stage, Activation):
        return {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "softmax": lambda x: torch.softmax(x, -1),
                "log_softmax": lambda x: torch.log_softmax(x, -1)}[stage.kind]
    if isinstance(stage, Elementwise):
        constant, op = torch.from_numpy(stage.constant), stage.op
        return {"add": lambda x: x + constant, "sub": lambda x: x - constant, "mul": lambda x: x * constant,
                "div": lambda x: x / constant, "rsub": lambda x: constant - x, "rdiv": lambda x: constant / x}[op]
    raise ValueError(f"{stage.name}: no PyTorch equivalent for {type(stage).__name__}")


def torch_stack(lstm: LSTM) -> list[nn.LSTM]:
    """Dense, time-major ``torch.nn.LSTM``s computing ``lstm``: one for one layer size, else one per layer."""
    if lstm.uniform_sizes:
        module = lstm.to_torch()
        module.batch_first = False                                # it is fed (T, 1, ...)
        return [module]
    return [_torch_layer(lstm, index) for index in range(lstm.num_layers)]


def _torch_layer(lstm: LSTM, index: int) -> nn.LSTM:
    directions = [lstm.layer(index, d) for d in range(lstm.num_directions)]
    first = directions[0]
    if first.cell != "lstm":
        raise ValueError(f"torch.nn.LSTM holds LSTM cells only; layer {index} is a {first.cell!r} cell")
    module = nn.LSTM(first.input_size, first.hidden_size, bias=first.bias, bidirectional=lstm.bidirectional,
                     proj_size=first.proj_size)
    for d, layer in enumerate(directions):
        suffix = "_l0" + ("_reverse" if d else "")
        for matrix in layer.matrices:
            getattr(module, f"weight_{matrix}{suffix}").copy_(layer.form(matrix).materialize())
        if layer.bias:
            for name in ("bias_ih", "bias_hh"):
                getattr(module, name + suffix).copy_(getattr(layer, name))
    return module


def _torch_runner(module: nn.Module, inputs: np.ndarray, threads: int) -> Runner:
    x = torch.from_numpy(inputs).unsqueeze(1)                     # batch of one: (T, 1, ...)

    def run():
        with torch.inference_mode():
            return module(x)
    return run


@backend("torch")
def _torch(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    return _torch_runner(DenseTorch(model).cpu(), inputs, threads)


@backend("torch-int8")
def _torch_int8(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    # quantize_dynamic swaps child modules only, so the LSTMs must sit inside a container (DenseTorch).
    if any(stage.module.proj_size for stage in pipeline_of(model).stacks):
        raise ValueError("PyTorch's dynamically quantized LSTM has no projection (proj_size); its packed weights "
                         "fail on one")
    with warnings.catch_warnings():                               # deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(DenseTorch(model).cpu(), {nn.LSTM, nn.Linear},
                                                           dtype=torch.qint8)
    return _torch_runner(quantized, inputs, threads)


# --- ONNX Runtime ----------------------------------------------------------------------------------------
def _ort_session(proto: Any, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_runner(pipeline: Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    from .onnx import to_onnx

    session = _ort_session(to_onnx(pipeline, state_inputs=False), threads)
    feed = {session.get_inputs()[0].name: pipeline.batch_of_one(inputs)}   # batch of one, the model's layout
    return lambda: session.run(None, feed)


@backend("onnxruntime")
def _onnxruntime(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    return _ort_runner(pipeline_of(model).dense(), inputs, threads)


@backend("onnxruntime-forms")
def _onnxruntime_forms(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    return _ort_runner(pipeline_of(model), inputs, threads)


@backend("onnxruntime-stream")
def _onnxruntime_stream(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    from .onnx import to_onnx

    pipeline = pipeline_of(model).dense()
    if pipeline.bidirectional:
        raise ValueError("a bidirectional model cannot stream: its reverse direction starts from the end of the "
                         "sequence")
    session = _ort_session(to_onnx(pipeline, state_inputs=True), threads)
    names = [i.name for i in session.get_inputs()]
    states = [np.zeros([1 if d == "B" else d for d in i.shape], np.float32) for i in session.get_inputs()[1:]]
    steps = [x[None, None] for x in inputs]                                   # T = B = 1 in either layout

    def run():
        state, outputs = states, []
        for x in steps:
            y, *state = session.run(None, dict(zip(names, [x, *state])))    # the state outputs in input order
            outputs.append(y)
        return outputs
    return run


@backend("onnxruntime-int8")
def _onnxruntime_int8(model: nn.Module | Pipeline, inputs: np.ndarray, threads: int) -> Runner:
    # ONNX Runtime's quantize_dynamic of the dense export (runtime.onnx_int8): DynamicQuantizeLSTM, int8 heads
    from .onnx_int8 import to_onnx_int8

    pipeline = pipeline_of(model).dense()
    session = _ort_session(to_onnx_int8(pipeline, state_inputs=False), threads)
    feed = {session.get_inputs()[0].name: pipeline.batch_of_one(inputs)}
    return lambda: session.run(None, feed)
