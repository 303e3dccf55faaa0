"""Batch-1 latency of the leanlstm engine against ONNX Runtime and PyTorch, and against the memory limit.

    python benchmarks/runtime_latency.py [--repeats 60] [--out results/runtime.json]

One interleaved measurement (every model and backend takes turns in each repeat, one thread, seq_len 35):
dense 2x650 on every backend; masked-sparse (10%, 5%), Kronecker and low-rank (rank 64) 2x650 and a 2x32
LSTM on the engine. Each target of issue 3 is checked from ratios within this one run.

The memory limit of a model is the time to read its stored weights once per step: for each layer, the
recurrent matrix's bytes plus the input matrix's bytes divided by seq_len (the engine batches the input
products over the sequence), each divided by the bandwidth a dense product (the engine's own dense kernel,
alternating direction as the engine does) reaches on a matrix of the same byte size, so it sits in the
same cache level.

NumPy's BLAS is not used in any timed path (the engine is Numba code), so ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` are left as they are and only recorded. Run on a quiet machine: a background job
sharing the cores or the cache makes every number slower and noisier (the load average is recorded).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from numba import njit

import leanlstm
from leanlstm.runtime import kernels, measure
from leanlstm.runtime.latency import pinned_threads

SEQ_LEN, HIDDEN = 35, 650
FULL = ("leanlstm", "onnxruntime", "torch", "torch-int8")


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = leanlstm.LSTM(HIDDEN, HIDDEN, 2)
    variants = {"sparse-10%": ("sparse", {"density": 0.10}), "sparse-5%": ("sparse", {"density": 0.05}),
                "kronecker": ("kronecker", {}), "lowrank-64": ("lowrank", {"rank": 64})}
    models = {"dense": dense}
    for label, (form, options) in variants.items():
        models[label] = copy.deepcopy(dense).replace_forms(form, **options)
    models["dense-2x32"] = leanlstm.LSTM(32, 32, 2)
    return models


@njit(fastmath=True, error_model="numpy")
def _stream(weight, x, out, count):
    for step in range(count):
        kernels.panel_gemv(weight, x, out, (step & 1) == 1)


def dense_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes per second of the engine's dense product on a matrix of ``nbytes`` (median of repeats)."""
    cols = min(HIDDEN, max(1, nbytes // 4))
    rows = max(1, nbytes // (4 * cols))
    weight = kernels.pack_panels(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32))
    x, out = np.ones(cols, np.float32), np.zeros(rows, np.float32)
    count = max(8, int(4e8 // max(weight.nbytes, 1)) // 100)   # about 4 MB x 100 read per timing
    _stream(weight, x, out, 2)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _stream(weight, x, out, count)
        seconds.append((time.perf_counter() - start) / count)
    return weight.nbytes / float(np.median(seconds))


def memory_limit(lstm: leanlstm.LSTM) -> dict[str, float]:
    """Microseconds per step to read the stored weights (recurrent every step, input once a sequence)."""
    limit, stored = 0.0, 0
    for layer in lstm.layers:
        for form, per_step in ((layer.weight_hh, 1.0), (layer.weight_ih, 1.0 / SEQ_LEN)):
            nbytes = form.nbytes()
            limit += per_step * nbytes / dense_bandwidth(nbytes) * 1e6
            stored += nbytes
    return {"limit_us": limit, "stored_bytes": stored}


def check(results: dict, limits: dict) -> dict[str, dict]:
    """Each target of issue 3: the measured value, what it must reach, and whether it does."""
    engine = {label: m["backends"]["leanlstm"]["median"] for label, m in results["models"].items()}
    dense = results["models"]["dense"]["backends"]
    targets = {
        "dense: leanlstm / onnxruntime <= 1.0": (engine["dense"] / dense["onnxruntime"]["median"], 1.0, "<="),
        "2x32: us per step <= 5": (engine["dense-2x32"], 5.0, "<="),
        "sparse 10%: speed-up over dense >= 3": (engine["dense"] / engine["sparse-10%"], 3.0, ">="),
        "sparse 5%: speed-up over dense >= 5": (engine["dense"] / engine["sparse-5%"], 5.0, ">="),
        "kronecker: speed-up over dense >= 5": (engine["dense"] / engine["kronecker"], 5.0, ">="),
        "lowrank 64: speed-up over dense >= 3": (engine["dense"] / engine["lowrank-64"], 3.0, ">="),
    }
    for label, limit in limits.items():
        targets[f"{label}: engine / memory limit <= 2 (aim)"] = (engine[label] / limit["limit_us"], 2.0, "<=")
    return {name: {"value": value, "target": bound, "met": value <= bound if op == "<=" else value >= bound}
            for name, (value, bound, op) in targets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "runtime.json"))
    args = parser.parse_args()
    models = build_models()
    backends = {label: FULL if label == "dense" else ("leanlstm",) for label in models}
    started = time.time()
    results = measure(models, backends, seq_len=SEQ_LEN, repeats=args.repeats, warmup=3, threads=1)
    with pinned_threads(1):
        limits = {label: memory_limit(model) for label, model in models.items() if label != "dense-2x32"}
    report = {"results": results, "memory_limits": limits, "targets": check(results, limits),
              "seconds": time.time() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_summary(report)
    print(f"wrote {args.out}")


def print_summary(report: dict) -> None:
    results = report["results"]
    print(f"us per step, batch 1, seq_len {results['seq_len']}, {results['threads']} thread, "
          f"load average {results['machine']['load_average']}")
    for label, measured in results["models"].items():
        for name, stats in measured["backends"].items():
            limit = report["memory_limits"].get(label, {}).get("limit_us") if name == "leanlstm" else None
            extra = f"   memory limit {limit:7.1f}" if limit else ""
            print(f"{label:>12} {name:>12} {stats['median']:9.1f}  (IQR {stats['iqr']:6.1f}, min {stats['min']:8.1f})"
                  f"{extra}")
        for name, message in measured["errors"].items():
            print(f"{label:>12} {name:>12} failed: {message}")
    for name, target in report["targets"].items():
        print(f"{'met' if target['met'] else 'MISSED':>6}  {name}: {target['value']:.2f}")


if __name__ == "__main__":
    main()
