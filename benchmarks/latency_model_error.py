"""How far the stack latency model (``runtime.latency_model``) is from measurement, per backend.

    python benchmarks/latency_model_error.py --out results/latency-model-error.json [--profiles profiles/layers]

For each backend, a per-layer profile (``LayerProfile``, measured into ``--profiles/<backend>`` on first use, kept
for reruns on the same machine) predicts the batch-1 latency per step of PTB- and speech-shaped stacks (dense,
ISS-shrunk, pruned, H-LSTM); then every stack is measured directly in one interleaved run and the relative errors
are reported (median and worst). Random weights: latency depends on structure, not values. One thread.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanlstm.nn import LSTM
from leanlstm.runtime.latency import load_now, machine_info
from leanlstm.runtime.latency_model import LatencyModel, prediction_error
from leanlstm.runtime.profile import LayerProfile, LayerSettings


def stacks(backend: str) -> dict[str, LSTM]:
    """The stacks to predict; sparse ones only where the backend runs sparsity (the engine)."""
    torch.manual_seed(0)
    models = {"dense 2x200": LSTM(200, 200, 2), "dense 2x650": LSTM(650, 650, 2),
              "ISS (227, 445)": LSTM(650, [227, 445]), "dense 2x256 (digits)": LSTM(40, 256, 2),
              "H-LSTM 2x128": LSTM(40, 128, 2, cell="hlstm", cell_options={"gate_hidden": 64})}
    if backend.startswith("leanlstm"):
        models["pruned 2x650, 5%"] = LSTM(650, 650, 2).replace_forms("sparse", density=0.05, speed_check=False)
        models["pruned 2x200, 10%"] = LSTM(200, 200, 2).replace_forms("sparse", density=0.1, speed_check=False)
    return {name: model.eval() for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profiles", type=Path, default=Path("profiles/layers"))
    parser.add_argument("--backends", default="leanlstm,onnxruntime")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    report = {"command": "python benchmarks/latency_model_error.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()), "machine": machine_info(), "load_before": load_now(),
        "backends": {}}
    for backend in args.backends.split(","):
        models = stacks(backend)
        profile = LayerProfile(args.profiles / backend, LayerSettings(backend=backend, repeats=args.repeats))
        result = prediction_error(list(models.values()), LatencyModel(profile))
        for name, row in zip(models, result["models"]):
            row["model"] = name
            print(f"{backend:12s} {name:22s} predicted {row['predicted']:8.2f} measured {row['measured']:8.2f} "
                  f"us/step  error {100 * row['error']:5.1f}%")
        print(f"{backend}: median error {100 * result['median']:.1f}%, worst {100 * result['worst']:.1f}%")
        report["backends"][backend] = result
    report["load_after"] = load_now()
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
