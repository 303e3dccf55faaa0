"""AntMan's "super-linear" claim on this machine: measured speed-up over the dense model divided by the reduction
of multiply-adds, for the PTB ``medium-cpu`` stack (or a trained run's, ``--from``) at several reductions.

    OPENBLAS_CORETYPE= python benchmarks/antman_latency.py --out results/antman-latency.json
    OPENBLAS_CORETYPE= python benchmarks/antman_latency.py --from runs/digits-medium --reductions 10 20 \
        --out results/antman-latency-digits.json        # the spoken-digit model's 2x256 stack (input 120)

Models: the dense 2x650 stack (input 650) and the same stack converted by ``leanlstm.AntMan(reduction=r)``
(group low-rank with the shuffle, sized per matrix; random weights: latency depends on the structure only). Each
runs on the leanlstm engine in float32 and int8 (the dense stack in int8 is the strongest dense reference) and on ONNX
Runtime: the dense model as ONNX Runtime's LSTM operator (``onnxruntime``), the AntMan models through their real
structure (``onnxruntime-forms``: a Scan over the group products). One interleaved run, batch 1, one thread,
35-step sequences, medians. ``super-linear`` is ``speed-up / MAC reduction`` on the same backend: above 1, the
structure runs faster than its arithmetic alone predicts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

import leanlstm
from leanlstm.graph import find_lstms
from leanlstm.methods.antman import AntMan, macs_reduction
from leanlstm.methods.base import named_forms
from leanlstm.runs import load_run
from leanlstm.runtime.latency import measure

sys.path.insert(0, str(Path(__file__).parent))
from record_run import command_line  # noqa: E402

REDUCTIONS = (10, 20, 50)


def stack(reduction: float | None, dense: leanlstm.LSTM | None = None) -> leanlstm.LSTM:
    """``dense`` (default: a random 2x650 stack, input 650), or a copy of it in AntMan's structure at ``reduction``."""
    torch.manual_seed(0)
    lstm = copy.deepcopy(dense).eval() if dense is not None else leanlstm.LSTM(650, [650, 650]).eval()
    if reduction is not None:
        leanlstm.compress_(lstm, AntMan(reduction=reduction, speed_check=False))
    return lstm


def run_stack(run: Path) -> leanlstm.LSTM:
    """The one LSTM stack of a trained run's model (``leanlstm.graph.find_lstms``), as a ``leanlstm.LSTM``."""
    stacks = find_lstms(load_run(run)[1])
    if len(stacks) != 1 or not isinstance(stacks[0][1], leanlstm.LSTM):
        raise SystemExit(f"{run}: expected one leanlstm.LSTM stack, found {[name for name, _ in stacks]}")
    return stacks[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--from", dest="source", type=Path, help="a trained run whose LSTM stack to time "
                        "(default: a random 2x650 stack, PTB medium-cpu's shapes)")
    parser.add_argument("--reductions", type=float, nargs="+", default=REDUCTIONS)
    options = parser.parse_args()
    dense = run_stack(options.source) if options.source else None
    models = {"dense": stack(None, dense)} | {f"antman-{r:g}x": stack(r, dense) for r in options.reductions}
    backends = {"dense": ("leanlstm", "leanlstm-int8", "onnxruntime")}
    backends |= {label: ("leanlstm", "leanlstm-int8", "onnxruntime-forms") for label in models if label != "dense"}
    result = measure(models, backends, seq_len=35, repeats=options.repeats)
    medians = {label: {name: stats["median"] for name, stats in m["backends"].items()}
               for label, m in result["models"].items()}
    dense = medians["dense"]
    rows = []
    for label, model in models.items():
        if label == "dense":
            continue
        reduction = macs_reduction(named_forms(model))
        ours = dense["leanlstm"] / medians[label]["leanlstm"]
        row = {"model": label, "lstm_macs_reduction": reduction, "leanlstm_us": medians[label]["leanlstm"],
               "speedup_leanlstm": ours, "superlinear_leanlstm": ours / reduction,
               "vs_dense_int8": dense["leanlstm-int8"] / medians[label]["leanlstm"],
               "leanlstm_int8_us": medians[label]["leanlstm-int8"],
               "int8_vs_dense_int8": dense["leanlstm-int8"] / medians[label]["leanlstm-int8"],
               "structure": {name: form.options() for name, form in named_forms(model)}}
        if "onnxruntime-forms" in medians[label]:
            theirs = dense["onnxruntime"] / medians[label]["onnxruntime-forms"]
            row |= {"onnxruntime_forms_us": medians[label]["onnxruntime-forms"], "speedup_onnxruntime": theirs,
                    "superlinear_onnxruntime": theirs / reduction}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "structure"}))
    report = {"command": command_line(), "source": str(options.source) if options.source else None,
              "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
              **{k: v for k, v in result.items() if k != "models"}, "medians": medians, "rows": rows,
              "errors": {label: m["errors"] for label, m in result["models"].items() if m["errors"]}}
    options.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
