"""Test perplexity of trained PTB runs through the batch-1 engine in float32 and in int8, beside PyTorch's own.

    python benchmarks/int8_accuracy.py runs/ptb-small [more runs...] --out results/int8-accuracy-ptb.json

The engine reads the test split as one stream (batch 1, the state carried from window to window), as the task's
own evaluation does, so float32 through the engine must give PyTorch's perplexity (checked) and int8 shows what
quantising every weight and, per step, every vector a weight multiplies costs in accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from leanlstm.runs import evaluate_run, load_run
from leanlstm.runtime.engine import compile as compile_engine
from leanlstm.runtime.latency import machine_info
from leanlstm.tasks import DataConfig
from leanlstm.tasks.ptb import load_ptb

WINDOW = 35


def engine_perplexity(engine, tokens: np.ndarray) -> float:
    """exp of the mean next-token cross-entropy over ``tokens``, run window by window with the state carried."""
    state, total, count = None, 0.0, 0
    for start in range(0, len(tokens) - 1, WINDOW):
        inputs = tokens[start:start + WINDOW]
        targets = tokens[start + 1:start + 1 + WINDOW]
        inputs = inputs[:len(targets)]
        logits, state = engine.run(inputs, state)                   # (T, vocab)
        logits = logits.astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir")
    options = parser.parse_args()
    rows = []
    for run_dir in options.runs:
        run, model, _ = load_run(run_dir)
        corpus = load_ptb(DataConfig(options.data_dir or run.data_dir).directory, verify=False)
        tokens = corpus.test.numpy().astype(np.int64)
        torch_ppl = evaluate_run(run_dir, ["test"])["test"]["ppl"]
        row = {"run": str(run_dir), "method": run.method, "task": run.task, "preset": run.preset,
               "test_ppl_torch": torch_ppl}
        for precision in ("float32", "int8"):
            started = time.perf_counter()
            row[f"test_ppl_{precision}"] = engine_perplexity(compile_engine(model, precision=precision), tokens)
            row[f"seconds_{precision}"] = time.perf_counter() - started
        row["int8_ppl_change"] = row["test_ppl_int8"] - row["test_ppl_float32"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    options.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
