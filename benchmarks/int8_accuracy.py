"""Test metrics of trained runs through the batch-1 engine in float32, int8 and bfloat16, beside PyTorch's own.

    python benchmarks/int8_accuracy.py runs/ptb-small runs/digits-medium [more runs...] --out results/x.json

PTB: the engine reads the test split as one stream (batch 1, the state carried from window to window), as the
task's own evaluation does, so float32 through the engine gives PyTorch's perplexity and the other precisions
show what quantising every weight (and, in int8, every vector a weight multiplies, per step) costs. Spoken digits:
the whole test set streamed through ``DigitsStream`` (audio in 10 ms pieces, the engine stepping), word error
rate of what it printed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from leanlstm.runs import evaluate_run, load_run
from leanlstm.tasks import ctc, fsdd
from leanlstm.tasks.digits import DigitsStream
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


PRECISIONS = ("float32", "int8", "bfloat16")


def stream_wer(model, precision: str) -> float:
    """WER of the digits the stream prints over the task's fixed test set."""
    recordings = fsdd.load_recordings(fsdd.recordings_dir())
    total, seed = fsdd.EVAL_SETS["test"]
    utterances = fsdd.synthesize(fsdd.split_pool(recordings, "test"), total, seed)
    stream, hop = DigitsStream(model, "leanlstm", precision=precision), model.config.features.sample_rate // 100
    hypotheses = []
    for utterance in utterances:
        stream.reset()
        for at in range(0, len(utterance.audio), hop):
            stream.push(utterance.audio[at:at + hop])
        stream.finish()
        hypotheses.append(" ".join(map(str, stream.digits)))
    references = [" ".join(map(str, u.digits)) for u in utterances]
    return ctc.error_rates(references, hypotheses)["wer"]


def ptb_row(run_dir: Path, run, model, data_dir: str | None) -> dict:
    corpus = load_ptb(DataConfig(data_dir or run.data_dir).directory, verify=False)
    tokens = corpus.test.numpy().astype(np.int64)
    row = {"test_ppl_torch": evaluate_run(run_dir, ["test"])["test"]["ppl"]}
    for precision in PRECISIONS:
        started = time.perf_counter()
        row[f"test_ppl_{precision}"] = engine_perplexity(compile_engine(model, precision=precision), tokens)
        row[f"seconds_{precision}"] = time.perf_counter() - started
    return row


def digits_row(run_dir: Path, model) -> dict:
    row = {"test_wer_torch": evaluate_run(run_dir, ["test"])["test"]["wer"]}
    for precision in PRECISIONS:
        row[f"test_wer_stream_{precision}"] = stream_wer(model, precision)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir")
    options = parser.parse_args()
    rows = []
    for run_dir in options.runs:
        run, model, _ = load_run(run_dir)
        model.eval()
        row = {"run": str(run_dir), "method": run.method, "task": run.task, "preset": run.preset}
        row |= ptb_row(run_dir, run, model, options.data_dir) if run.task == "ptb" else digits_row(run_dir, model)
        print(json.dumps(row), flush=True)
        rows.append(row)
    options.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
