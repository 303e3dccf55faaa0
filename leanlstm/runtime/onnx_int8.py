"""int8 ONNX: ONNX Runtime's own dynamic quantisation of a model's dense ONNX export.

``to_onnx_int8(model)`` writes the model as ``runtime.onnx.to_onnx`` does, every matrix dense by default (so each
LSTM layer without a projection is the fused ``LSTM`` operator), and passes it through
``onnxruntime.quantization.quantize_dynamic``. What that makes of each node:

- ``LSTM`` -> ``com.microsoft`` ``DynamicQuantizeLSTM``: ``W`` and ``R`` int8, one scale per gate row (per
  output channel, always, whatever ``weight_type``), the input and hidden vectors quantised to u8 at every step
  inside the operator; cell state, gates and nonlinearities stay float32. This is the same scheme as the engine's
  ``precision="int8"`` (``runtime.int8``: per-row symmetric int8 weights, per-step dynamic u8 activations);
- ``MatMul`` with a constant weight (the ``nn.Linear`` heads, the input products of a ``Scan`` layer) ->
  ``DynamicQuantizeLinear`` + ``MatMulInteger`` + scale ``Mul``s, which ONNX Runtime fuses into one
  ``DynamicQuantizeMatMul`` when it loads the model; weights as ``weight_type``, one scale per tensor unless
  ``per_channel``;
- ``Gather`` of a constant table (the embedding) -> the table stored int8 and a ``DequantizeLinear`` of the rows
  looked up.

A layer written as a ``Scan`` (a projection, which the ``LSTM`` operator lacks, or a cell other than the LSTM) gets
its batched input products int8; the products inside the loop read weights from the outer graph, which
``quantize_dynamic`` does not quantise, and stay float32.

``weight_type`` ("qint8" or "quint8") applies to the ``MatMul`` heads and the embedding only: ONNX Runtime's
``LSTM`` quantiser always writes int8 weights. Measured on this machine's kind (2-core AMD EPYC with AVX-512 VNNI,
ONNX Runtime 1.32, one thread, batch 1, interleaved): on a bare 2x650 LSTM the two give the same graph
(~80-87 us per step, float32 ~265-400); on a 2x650 word LM with a 10k-word head qint8 ran 122 us per step against
quint8's 166 (float32 405), and 192 against 283 in a second, busier run, so **qint8 is the default**
(``DEFAULT_WEIGHT_TYPE``). ``per_channel`` heads cost about nothing in time and changed the error little.

The file is about a quarter of the float32 one (every weight one byte instead of four, plus a scale per row).
The int8 model's outputs are close to the float32 model's, not equal: ``compare`` runs both in ONNX Runtime on
one random sequence and reports the largest difference, which ``export_onnx_int8`` logs.

Structured forms: ``structure="never"`` (the default here) writes every matrix dense, since int8 is the
fused-operator path; ``"always"`` quantises whatever ``MatMul``s the forms' own products contain (a low-rank
form's two thin products, say) and leaves the rest (a sparse form's gathers) float32. ``"auto"`` is float32
timing and is taken as ``"never"``.
"""
from __future__ import annotations

import collections
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from ..files import atomic_write
from .cells import ExportError
from .onnx import DEFAULT_OPSET, to_onnx
from .pipeline import Pipeline, pipeline_of

__all__ = ["DEFAULT_WEIGHT_TYPE", "INT8_OPS", "Int8Export", "WEIGHT_TYPES", "compare", "export_onnx_int8",
           "int8_ops", "quantize", "to_onnx_int8", "write_onnx_int8"]
log = logging.getLogger(__name__)

WEIGHT_TYPES = ("qint8", "quint8")
DEFAULT_WEIGHT_TYPE = "qint8"
INT8_OPS = ("DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear",
            "DequantizeLinear")
PRECISIONS = ("float32", "int8")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Hide what ``quantize_dynamic`` logs on the root logger at every call: its advice to run its pre-processing
    (shape inference and graph optimisation ONNX Runtime does on load anyway) and a line per float tensor it leaves
    float ("Quantization parameters for tensor ... not specified": dozens per LSTM export)."""
    def drop(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "pre-processing" not in message and "Quantization parameters for tensor" not in message

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize(proto: onnx.ModelProto, *, weight_type: str = DEFAULT_WEIGHT_TYPE, per_channel: bool = False,
             reduce_range: bool = False) -> onnx.ModelProto:
    """``proto`` after ONNX Runtime's ``quantize_dynamic`` (``proto`` itself is left as it is).

    ``per_channel``: one scale per output column of the ``MatMul`` heads too (the LSTM operator's weights are
    always per row). ``reduce_range``: 7-bit weights, which ONNX Runtime advises on x86 CPUs without VNNI
    (their u8 x s8 instruction saturates in 16 bits); not needed with AVX-512 VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    kind = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    with tempfile.TemporaryDirectory(prefix="leanlstm-int8-") as folder, _quiet_quantizer():
        out = Path(folder) / "int8.onnx"
        quantize_dynamic(proto, out, weight_type=kind, per_channel=per_channel, reduce_range=reduce_range)
        quantized = onnx.load(out)
    quantized.producer_name = proto.producer_name or quantized.producer_name
    return quantized


def to_onnx_int8(model: nn.Module | Pipeline, *, opset: int = DEFAULT_OPSET, state_inputs: bool = True,
                 recurrence: str = "auto", structure: str = "never", weight_type: str = DEFAULT_WEIGHT_TYPE,
                 per_channel: bool = False) -> onnx.ModelProto:
    """The int8 ONNX model of ``model`` (anything ``runtime.compile`` runs); inputs and outputs as in
    ``runtime.onnx.to_onnx``.

    >>> from leanlstm import LSTM
    >>> sorted(int8_ops(to_onnx_int8(LSTM(8, 16, 2))))
    ['DynamicQuantizeLSTM']
    """
    return quantize(_float_proto(model, opset, state_inputs, recurrence, structure), weight_type=weight_type,
                    per_channel=per_channel)


def _float_proto(model: nn.Module | Pipeline, opset: int, state_inputs: bool, recurrence: str, structure: str
                 ) -> onnx.ModelProto:
    structure = "never" if structure == "auto" else structure          # "auto" times float32 variants
    return to_onnx(pipeline_of(model, ExportError), opset=opset, state_inputs=state_inputs, recurrence=recurrence,
                   structure=structure)


def int8_ops(proto: onnx.ModelProto) -> collections.Counter:
    """How many nodes of each quantised kind (``INT8_OPS``) the graph holds, loop bodies included."""
    def walk(graph: onnx.GraphProto) -> Iterator[str]:
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
    return collections.Counter(op for op in walk(proto.graph) if op in INT8_OPS)


def _session(proto: onnx.ModelProto, threads: int = 1):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(session, pipeline: Pipeline, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    from .latency import example_inputs

    inputs = session.get_inputs()
    feeds = {inputs[0].name: pipeline.batch_of_one(example_inputs(pipeline, seq_len, seed))}
    rng = np.random.default_rng(seed + 1)
    for state in inputs[1:]:                                            # h0/c0 (., B, size): small random states
        shape = [1 if isinstance(d, str) or d is None else d for d in state.shape]
        feeds[state.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def compare(model: nn.Module | Pipeline, float_proto: onnx.ModelProto, int8_proto: onnx.ModelProto,
            seq_len: int = 35, seed: int = 0) -> dict[str, float]:
    """Both models run in ONNX Runtime on one random sequence at batch 1 (random states too, if they take
    them): per output, the largest absolute difference, and for the main output also that over its largest
    absolute value (``"relative"``)."""
    pipeline = pipeline_of(model, ExportError)
    sessions = [_session(float_proto), _session(int8_proto)]
    feeds = _feeds(sessions[0], pipeline, seq_len, seed)
    names = [o.name for o in sessions[0].get_outputs()]
    want, got = (dict(zip(names, s.run(names, feeds))) for s in sessions)
    report = {name: float(np.max(np.abs(want[name] - got[name]))) for name in names}
    scale = float(np.max(np.abs(want[names[0]])))
    report["relative"] = report[names[0]] / scale if scale > 0 else report[names[0]]
    return report


@dataclass(frozen=True)
class Int8Export:
    """What ``write_onnx_int8`` wrote: the file, its size and the float32 model's, the int8 nodes, and the
    largest differences from the float32 model in ONNX Runtime (``compare``; empty if not checked)."""

    path: Path
    int8_bytes: int
    float_bytes: int
    ops: dict[str, int]
    errors: dict[str, float]

    @property
    def ratio(self) -> float:
        """float32 bytes over int8 bytes (about 4)."""
        return self.float_bytes / self.int8_bytes


def write_onnx_int8(model: nn.Module | Pipeline, path: str | Path, *, opset: int = DEFAULT_OPSET,
                    state_inputs: bool = True, recurrence: str = "auto", structure: str = "never",
                    weight_type: str = DEFAULT_WEIGHT_TYPE, per_channel: bool = False, overwrite: bool = True,
                    check: bool = True) -> Int8Export:
    """``export_onnx_int8``, returning what was written (sizes, int8 nodes, differences from float32)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; not overwriting it (pass overwrite=True, or --force)")
    float_proto = _float_proto(model, opset, state_inputs, recurrence, structure)
    int8_proto = quantize(float_proto, weight_type=weight_type, per_channel=per_channel)
    ops = dict(int8_ops(int8_proto))
    if not ops:
        log.warning("int8 ONNX export: ONNX Runtime quantised nothing in this model; the file is float32")
    errors = compare(model, float_proto, int8_proto) if check else {}
    data = int8_proto.SerializeToString()
    atomic_write(path, lambda file: file.write(data))
    result = Int8Export(path, len(data), float_proto.ByteSize(), ops, errors)
    log.info("int8 ONNX export: %s, %d bytes (float32 %d, %.2fx smaller), nodes %s%s", path, result.int8_bytes,
             result.float_bytes, result.ratio, ops,
             f", largest difference from float32 {errors['relative']:.2%} of the output's range" if errors else "")
    return result


def export_onnx_int8(model: nn.Module | Pipeline, path: str | Path, *, opset: int = DEFAULT_OPSET,
                     state_inputs: bool = True, recurrence: str = "auto", structure: str = "never",
                     weight_type: str = DEFAULT_WEIGHT_TYPE, per_channel: bool = False, overwrite: bool = True,
                     check: bool = True) -> Path:
    """Write ``model`` as an int8 ONNX model ONNX Runtime runs (see the module doc), atomically; returns the path.

    With ``check`` the int8 and float32 models are both run in ONNX Runtime on a random sequence and the largest
    difference is logged (``compare``). ``overwrite=False`` refuses to replace an existing file.

    >>> import onnxruntime, tempfile, numpy as np
    >>> from leanlstm import LSTM
    >>> path = export_onnx_int8(LSTM(8, 16, 2), Path(tempfile.mkdtemp()) / "lstm.onnx", state_inputs=False)
    >>> y, h_n, c_n = onnxruntime.InferenceSession(path).run(None, {"x": np.zeros((5, 1, 8), np.float32)})
    >>> y.shape, h_n.shape
    ((5, 1, 16), (2, 1, 16))
    """
    return write_onnx_int8(model, path, opset=opset, state_inputs=state_inputs, recurrence=recurrence,
                           structure=structure, weight_type=weight_type, per_channel=per_channel,
                           overwrite=overwrite, check=check).path
