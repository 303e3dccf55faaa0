"""Where a run's LSTM-stack time goes: each weight product on its own, batch 1, one thread.

    OMP_NUM_THREADS=1 python benchmarks/op_breakdown.py runs/ptb-small-iss-scratch-0.004

Per layer and matrix (and per part of a doped matrix): the one-step product (``matvec``, as the recurrent
product runs) and the whole-sequence product per step (``matmat`` over 35 steps, as the input product runs in
``Engine.run``), then the gate update.
Medians of 7 samples; us per call. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit

from leanlstm.runs import load_run
from leanlstm.runtime import kernels
from leanlstm.runtime.engine import form_op
from leanlstm.runtime.structured_ops import child_op

SEQ_LEN = 35


@njit
def _matvecs(matvec, arrays, x, out, count):
    for i in range(count):
        matvec(arrays, x, out, (i & 1) == 1)


@njit
def _cells(gates, h, c, count):
    for _ in range(count):
        kernels.lstm_cell(gates, h, c)


def median_us(run, count: int) -> float:
    run(10)
    samples = []
    for _ in range(7):
        started = time.perf_counter()
        run(count)
        samples.append((time.perf_counter() - started) / count * 1e6)
    return float(np.median(samples))


def timings(op, form, rng) -> str:
    """The one-step product and the whole-sequence product per step of ``op``, as text."""
    x, out = rng.random(form.in_features, np.float32), np.zeros(form.out_features, np.float32)
    xs = rng.random((SEQ_LEN, form.in_features), np.float32)
    outs = np.zeros((SEQ_LEN, form.out_features), np.float32)
    one = median_us(lambda n: _matvecs(op.matvec, op.arrays, x, out, n), 20000)
    matmat = op.matmat or (lambda arrays, xs, out: [op.matvec(arrays, a, b, False) for a, b in zip(xs, out)])
    whole = median_us(lambda n: [matmat(op.arrays, xs, outs) for _ in range(n)], 500) / SEQ_LEN
    return f"matvec {one:.2f} us, matmat {whole:.2f} us per step"


def parts(form) -> list:
    """The separately timed parts of a composite form (a doped form's ``structured`` and ``sparse``)."""
    return [getattr(form, name) for name in ("structured", "sparse") if hasattr(form, name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    options = parser.parse_args()
    _, model, _ = load_run(options.run_dir)
    rng = np.random.default_rng(0)
    for index, layer in enumerate(model.lstm.layers):
        for name in ("ih", "hh"):
            form = layer.form(name)
            print(f"layer {index} {name} {type(form).__name__} {form.out_features}x{form.in_features}: "
                  f"{timings(form_op(form), form, rng)}")
            for part in parts(form):    # a doped form: its structured and sparse matrices on their own
                print(f"    {type(part).__name__}: {timings(child_op(part), part, rng)}")
        size = layer.hidden_size
        gates = rng.random(4 * size, np.float32)
        cell = median_us(lambda n: _cells(gates, np.zeros(size, np.float32), np.zeros(size, np.float32), n), 20000)
        print(f"layer {index} gates ({size} units): {cell:.2f} us")


if __name__ == "__main__":
    main()
