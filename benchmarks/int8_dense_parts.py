"""Where a step of the dense int8 2x650 stack goes: its products timed alone beside the whole stack and ONNX Runtime.

    OPENBLAS_CORETYPE= python benchmarks/int8_dense_parts.py --out results/int8-dense-parts.json

The PTB ``medium-cpu`` stack (two layers of 650, 35-step sequences, batch 1, one thread), random weights (time does
not depend on the values), the engine's own kernels and order of work (``kernels.layer_run``):

- ``recurrent``: each layer's 35 recurrent products (2600x650, ``int8_gemv``), one layer after the other, the panels
  walked in alternate directions from step to step as the engine walks them;
- ``recurrent_in_l2``: the same 35 recurrent products on a 1024x650 matrix (0.67 MB), which stays in a 1 MB L2: the
  rate at which the core brings int8 weights into L1 at all, for comparison with the 1.69 MB matrices' rate;
- ``input``: each layer's input product over the 35 steps (``int8_gemm``: every 64-row panel loaded once and kept
  in cache while it multiplies all the steps, four at a time);
- ``stack``: the engine's whole int8 stack (``leanlstm-int8``) and the same stack on ONNX Runtime int8 (the best
  dense peer), through ``runtime.latency.measure``.

Rounds alternate the parts and the whole stacks; the median over rounds of each round's median of ``--repeats``
samples, microseconds per step. From the medians: the rates at which the recurrent products read their matrices
(GB/s), the rate of the input products' ``vpdpbusd`` instructions (one per 64 multiply-adds), and what is left for
the gates, the input quantisation and the pipeline's calls. With VNNI off (a CPU without it) the portable kernels
are timed and the rates mean little.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

STEPS, HIDDEN, LAYERS = 35, 650, 2
ROWS = 4 * HIDDEN
L2_ROWS = 1024                          # 0.67 MB of int8 weights


@njit(nogil=True)
def _recurrent(gemv, panels, scales, corrections, hs, gates):
    for k in range(hs.shape[0]):
        gemv(panels, scales, corrections, hs[k], gates[k], (k & 1) == 1)


def _matrices(rng: np.random.Generator, rows: int = ROWS, count: int = LAYERS):
    from leanlstm.runtime.int8 import pack_int8

    bound = 1 / np.sqrt(HIDDEN)           # torch.nn.LSTM's initialisation range
    return [pack_int8(rng.uniform(-bound, bound, (rows, HIDDEN)).astype(np.float32)) for _ in range(count)]


def _time(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e6 / STEPS


def parts(repeats: int, rng: np.random.Generator) -> dict[str, list[float]]:
    """``repeats`` samples of each part, taking turns, us per step."""
    from leanlstm.runtime.int8 import int8_gemm, int8_gemv

    recurrent, inputs, (small,) = _matrices(rng), _matrices(rng), _matrices(rng, L2_ROWS, 1)
    hs = np.tanh(rng.standard_normal((STEPS, HIDDEN))).astype(np.float32)    # h lies in (-1, 1)
    xs = rng.standard_normal((STEPS, HIDDEN)).astype(np.float32)
    gates, small_gates = np.zeros((STEPS, ROWS), np.float32), np.zeros((STEPS, L2_ROWS), np.float32)

    def run_recurrent():
        for panels, scales, corrections in recurrent:
            _recurrent(int8_gemv, panels, scales, corrections, hs, gates)

    def run_in_l2():
        _recurrent(int8_gemv, *small, hs, small_gates)

    def run_input():
        for panels, scales, corrections in inputs:
            int8_gemm(panels, scales, corrections, xs, gates)

    runs = {"recurrent": run_recurrent, "recurrent_in_l2": run_in_l2, "input": run_input}
    for _ in range(3):                                                 # compile and warm
        for run in runs.values():
            run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(_time(run))
    return samples


def stacks(stack, repeats: int) -> dict[str, float]:
    """The median of ``repeats`` samples of the whole dense ``stack`` on leanlstm int8 and on ONNX Runtime int8,
    taking turns, us per step."""
    from leanlstm.runtime.latency import measure

    result = measure({"dense": stack}, ["leanlstm-int8", "onnxruntime-int8"], seq_len=STEPS, repeats=repeats)
    measured = result["models"]["dense"]
    if measured["errors"]:
        raise SystemExit(f"a backend failed: {measured['errors']}")
    return {name: stats["median"] for name, stats in measured["backends"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20, help="samples of each a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from int8_latency import model          # the dense PTB medium-cpu word model the structures table times
    from leanlstm.runtime.int8 import VNNI_ON
    from leanlstm.runtime.latency import machine_info
    from leanlstm.runtime.pipeline import pipeline_of

    rng = np.random.default_rng(0)
    stack = pipeline_of(model(None)).recurrent_only()
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        medians = {name: statistics.median(values) for name, values in parts(args.repeats, rng).items()}
        for name, value in (medians | stacks(stack, args.repeats)).items():
            rounds.setdefault(name, []).append(value)
    us = {name: statistics.median(values) for name, values in rounds.items()}
    matrix_bytes = ROWS * HIDDEN                                       # int8 values; row scales are 0.6% more
    instructions = LAYERS * ROWS * HIDDEN / 64                         # vpdpbusd a step, both input products
    derived = {
        "recurrent_gb_per_s": LAYERS * matrix_bytes / us["recurrent"] / 1e3,
        "recurrent_in_l2_gb_per_s": L2_ROWS * HIDDEN / us["recurrent_in_l2"] / 1e3,
        "input_vpdpbusd_per_ns": instructions / us["input"] / 1e3,
        "rest_us": us["leanlstm-int8"] - us["recurrent"] - us["input"],
        "stack_vs_onnxruntime_int8": us["onnxruntime-int8"] / us["leanlstm-int8"],
        "onnxruntime_int8_over_1.4": us["onnxruntime-int8"] / 1.4,
    }
    result = {"command": "python benchmarks/int8_dense_parts.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "vnni": VNNI_ON, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "steps": STEPS,
              "hidden": HIDDEN, "layers": LAYERS, "unit": "us per time step", "repeats": args.repeats,
              "rounds": args.rounds, "median_us": us, "derived": derived, "round_medians_us": rounds}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in us.items():
        print(f"{name:18s} {value:7.2f} us")
    for name, value in derived.items():
        print(f"{name:26s} {value:7.2f}")


if __name__ == "__main__":
    main()
