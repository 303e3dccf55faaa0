"""The Kronecker product in int8 against float32, one matrix at a time: the PTB ``medium-cpu`` doped-KP factors.

    OMP_NUM_THREADS=1 python benchmarks/int8_kron_ops.py --out results/int8-kron-ops.json

The two 20x doped-KP structures of BENCHMARKS.md (``doping_share`` 0.75: (182x112) kron (15x6); 0.25: (653x94) kron
(4x7)), each a 2600x650 matrix, random factors. ``matvec`` is one step (the recurrent product), ``matmat`` a
35-step sequence per step (the input product). Medians of repeated timings, microseconds; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.runtime.int8_kron import int8_kron_op  # noqa: E402
from leanlstm.runtime.kernels import kron_op  # noqa: E402

SHAPES = {"doped-kp-20x-share0.75": ((182, 112), (15, 6)), "doped-kp-20x-share0.25": ((653, 94), (4, 7))}
ROWS, COLS, STEPS = 2600, 650, 35


def timed(op, x, out, xs, outs, repeats: int) -> dict[str, float]:
    for _ in range(50):
        op.matvec(op.arrays, x, out, False)
    one, many = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(200):
            op.matvec(op.arrays, x, out, False)
        one.append((time.perf_counter() - started) / 200 * 1e6)
        started = time.perf_counter()
        op.matmat(op.arrays, xs, outs)
        many.append((time.perf_counter() - started) / STEPS * 1e6)
    return {"matvec_us": statistics.median(one), "matmat_us_per_step": statistics.median(many)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = {}
    for name, (a_shape, b_shape) in SHAPES.items():
        a, b = rng.normal(size=a_shape).astype(np.float32), rng.normal(size=b_shape).astype(np.float32)
        x, xs = rng.normal(size=COLS).astype(np.float32), rng.normal(size=(STEPS, COLS)).astype(np.float32)
        ops = {"float32": kron_op(a, b, ROWS, COLS), "int8": int8_kron_op(a, b, ROWS, COLS)}
        rows[name] = {label: timed(op, x, np.zeros(ROWS, np.float32), xs, np.zeros((STEPS, ROWS), np.float32),
                                   args.repeats) | {"stored_bytes": sum(a.nbytes for a in op.arrays)}
                      for label, op in ops.items()}
        print(name, json.dumps(rows[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command_line(), "machine": machine(), "matrices": rows}, indent=1)
                        + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
