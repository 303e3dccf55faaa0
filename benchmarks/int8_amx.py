"""int8 sequence products on AMX tiles against VNNI and against ONNX Runtime, on a CPU with AMX (``runtime.amx``).

    OPENBLAS_CORETYPE= python benchmarks/int8_amx.py --out results/int8-amx.json

For the PTB ``medium-cpu`` shapes, a 35-step sequence times a matrix (``xs @ W.T``, every step quantised on its own:
the decoder's and every layer's input product in the engine) three ways, taking turns in one process, one thread:
the engine's AMX product (``int8._amx_gemm``), its VNNI product (``int8._vnni_gemm``), both after the same
quantisation, and ONNX Runtime's dynamically quantised product (``DynamicQuantizeLinear``, ``MatMulInteger``, the
rescale: what its ``quantize_dynamic`` makes of an ``nn.Linear``). Medians of ``--repeats`` turns, microseconds per
step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

SHAPES = {                               # (steps, inputs, outputs)
    "decoder 650 -> 10000": (35, 650, 10000),
    "input product 650 -> 2600": (35, 650, 2600),
    "low-rank decoder 12x, factor 199 -> 10000": (35, 199, 10000),
    "low-rank decoder 12x, factor 650 -> 199": (35, 650, 199),
    "ISS layer 2 input product 227 -> 1780": (35, 227, 1780),
    "input product, 12 steps": (12, 650, 2600),
    "input product, 8 steps": (8, 650, 2600),
}


def _ort_product(weight: np.ndarray):
    """An ONNX Runtime session computing ``x @ weight.T`` as its dynamic quantisation does, on one thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    q = np.clip(np.rint(weight.T / (np.abs(weight).max() / 127)), -127, 127).astype(np.int8)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[1]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[0]])
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["yi"]),
             helper.make_node("Cast", ["yi"], ["yf"], to=1),
             helper.make_node("Mul", ["yf", "xs"], ["y"])]
    graph = helper.make_graph(nodes, "product", [x], [y], [numpy_helper.from_array(q, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from leanlstm.runtime import int8
    from leanlstm.runtime.latency import machine_info, pinned_threads
    if not int8.AMX_ON:
        sys.exit("this CPU has no AMX tiles (or Linux refused their state): nothing to compare")

    def product(gemm):
        @njit
        def run(arrays, xs, out):
            panels, scales, corrections = arrays
            xq, step_scales = int8.quantise_steps(xs, panels.shape[1] * int8.QUAD)
            gemm(panels, scales, corrections, xq, step_scales, out)
        return run

    ways = {"amx": product(int8._amx_gemm), "vnni": product(int8._vnni_gemm)}
    rng = np.random.default_rng(0)
    rows = []
    with pinned_threads(1):
        for name, (steps, inputs, outputs) in SHAPES.items():
            weight = rng.standard_normal((outputs, inputs)).astype(np.float32)
            xs = rng.standard_normal((steps, inputs)).astype(np.float32)
            arrays, session = int8.pack_int8(weight), _ort_product(weight)
            out = np.zeros((steps, arrays[0].shape[0] * int8.PANEL), np.float32)
            calls = {way: (lambda run=run: run(arrays, xs, out)) for way, run in ways.items()}
            calls["onnxruntime"] = lambda: session.run(None, {"x": xs})
            samples = {way: [] for way in calls}
            for _ in range(3):
                for call in calls.values():
                    call()
            for _ in range(args.repeats):
                for way, call in calls.items():
                    start = time.perf_counter()
                    call()
                    samples[way].append(time.perf_counter() - start)
            us = {way: float(np.median(values)) * 1e6 / steps for way, values in samples.items()}
            rows.append({"product": name, "steps_inputs_outputs": [steps, inputs, outputs],
                         **{f"{way}_us_per_step": value for way, value in us.items()},
                         "amx_vs_vnni": us["vnni"] / us["amx"], "amx_vs_onnxruntime": us["onnxruntime"] / us["amx"]})
            print(f"{name:45s} AMX {us['amx']:7.2f}  VNNI {us['vnni']:7.2f} ({us['vnni'] / us['amx']:4.2f}x)  "
                  f"ONNX Runtime {us['onnxruntime']:7.2f} ({us['onnxruntime'] / us['amx']:4.2f}x)")
    result = {"command": "python benchmarks/int8_amx.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "unit": "us per step", "threads": 1,
              "repeats": args.repeats, "amx_min_steps": int8.AMX_MIN_STEPS,
              "amx_min_inputs": int8.AMX_MIN_INPUTS, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
