"""Post-training int8 quantisation (``leanlstm.Int8``) of trained runs: test metric and LSTM bytes before and after.

    python benchmarks/int8_ptq.py runs/ptb-small runs/digits-medium [more runs...] --out results/int8-ptq.json

Each run's latest model is evaluated by its task in PyTorch (float32), quantised in place with ``compress_(model,
Int8(clip=...))`` (every LSTM matrix and ``nn.Linear`` head on the engine's per-row int8 grid) and evaluated again:
the difference is what the int8 weights cost. The vectors the engine also quantises at every step are not part of
this number (``int8_accuracy.py`` runs the whole engine). Compression is dense float32 LSTM bytes over stored bytes
(indices and row scales counted), against the model's own dense shape.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanlstm.compress import compress_
from leanlstm.methods import Int8
from leanlstm.methods.pruning import weight_compression
from leanlstm.runs import build_task, load_run, lstm_numbers
from leanlstm.runtime.latency import load_now, machine_info


def measure(run_dir: Path, clips: list[str]) -> dict:
    run, model, _ = load_run(run_dir)
    task = build_task(run, run.train_config())
    metric = task.metric
    row = {"run": str(run_dir), "task": run.task, "method": f"{run.method} + int8 PTQ",
           f"test_{metric}_float32": task.evaluate(model, "test")[metric],
           "lstm_params_float32": lstm_numbers(model)["lstm_params"],
           "weight_compression_float32": weight_compression(model)}
    for clip in clips:
        quantised = load_run(run_dir)[1]
        compress_(quantised, Int8(clip=clip))
        row[f"test_{metric}_int8_{clip}"] = task.evaluate(quantised, "test")[metric]
        row[f"lstm_params_int8_{clip}"] = lstm_numbers(quantised)["lstm_params"]
        row[f"weight_compression_int8_{clip}"] = weight_compression(quantised)
        row[f"lstm_compression_int8_{clip}"] = (lstm_numbers(quantised)["dense_lstm_params"]
                                                / lstm_numbers(quantised)["lstm_params"])
    first = clips[0]
    row[f"test_{metric}"] = row[f"test_{metric}_int8_{first}"]
    row[f"baseline_test_{metric}"] = row[f"test_{metric}_float32"]
    row[f"int8_change_{metric}"] = row[f"test_{metric}"] - row[f"baseline_test_{metric}"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--clips", default="max,mse", help="clipping rules to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clips = args.clips.split(",")
    rows = []
    for run_dir in args.runs:
        rows.append(measure(run_dir, clips))
        print(json.dumps(rows[-1]))
    args.out.write_text(json.dumps({"machine": machine_info(), "load": load_now(), "clips": clips, "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
