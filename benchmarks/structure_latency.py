"""Batch-1 LSTM-stack latency of each compression method's final structure, beside the dense stack, in one run.

    python benchmarks/structure_latency.py --preset medium-cpu --compression 20 \
        --methods doped-kp,kp,lmf,hmd,circulant,prune --out results/structure-latency-medium-cpu-20x.json

Two ways of running each stack, both batch 1 and per time step: ``sequence`` (a 35-step sequence in one call,
input products batched over time; the dense reference is ONNX Runtime's fused LSTM operator) and
``stream`` (one input per call with the state carried, as inputs that arrive one at a time; the dense
reference is one ONNX Runtime call per step).

Latency depends on the structure (shapes, factor sizes, number of sparse entries), not on trained values, so
this times each method's final form at a preset's exact shapes without training it: the dense model gets
random weights, every method converts it (``prepare``) and applies its final step (``finalize``: the sparse
parts pruned to the final density by magnitude). One difference from trained models remains: random weights
spread the kept entries evenly over the rows, trained ones may not. All (model, backend) pairs are
interleaved (one thread, sequence 35), so the ratios to the dense ONNX Runtime stack compare like with like.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.methods import get_method  # noqa: E402
from leanlstm.nn import LSTM  # noqa: E402
from leanlstm.presets import get_preset  # noqa: E402
from leanlstm.runtime.latency import measure, medians  # noqa: E402


def structures(preset: str, compression: float, methods: list[str]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = get_preset(preset).lm
    dense = LSTM(config.embed_size, config.hidden_sizes)
    models = {"dense": dense}
    for name in methods:
        method_class = get_method(name)
        method = method_class(method_class.Config.from_strings({"compression": str(compression)}))
        model = method.prepare(copy.deepcopy(dense))
        models[name] = method.finalize(model).eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--compression", type=float, default=20.0)
    parser.add_argument("--methods", default="doped-kp,kp,lmf,hmd,circulant,prune")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    models = structures(options.preset, options.compression, options.methods.split(","))
    ours = ["leanlstm", "leanlstm-stream"]
    backends = {label: ours + (["onnxruntime", "onnxruntime-stream"] if label == "dense" else []) for label in models}
    result = measure(models, backends, seq_len=35, repeats=options.repeats, threads=1)
    dense = medians(result["models"]["dense"]["backends"])
    reference = {"sequence": dense["onnxruntime"], "stream": dense["onnxruntime-stream"]}
    rows = {}
    for label, measured in result["models"].items():
        latency = medians(measured["backends"])
        speedup = {"sequence": reference["sequence"] / latency["leanlstm"],
                   "stream": reference["stream"] / latency["leanlstm-stream"]}
        rows[label] = {"latency_us_per_step": latency, "stored_params": models[label].stored_params(),
                       "speedup_vs_dense_onnxruntime": speedup, "errors": measured["errors"]}
        print(f"{label:>10}  {models[label].stored_params():>9} params  sequence {latency['leanlstm']:7.2f} us "
              f"{speedup['sequence']:5.2f}x   stream {latency['leanlstm-stream']:7.2f} us {speedup['stream']:5.2f}x  "
              f"(vs dense ORT {reference['sequence']:.2f} / {reference['stream']:.2f} us)")
    if options.out:
        report = {"preset": options.preset, "compression": options.compression, "command": command_line(),
                  "settings": {k: result[k] for k in ("seq_len", "repeats", "threads")}, "machine": machine(),
                  "stacks": rows}
        options.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
