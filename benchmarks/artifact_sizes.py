"""File sizes of a 2x650 LSTM stack (PTB medium) against the bytes its weight forms store.

    python benchmarks/artifact_sizes.py --out results/artifact-sizes.json

One-shot conversions of a randomly initialised stack (file sizes do not depend on training): dense, magnitude
pruning to 20x (``MaskedSparse``, saved as CSR) and doped Kronecker at 20x (the ``Doped`` method's conversion).
Checkpoint: ``torch.save`` of the stack's ``state_dict``; ONNX: leanlstm's structured-forms export.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

import leanlstm  # noqa: E402
from leanlstm.nn import LSTM  # noqa: E402
from leanlstm.runtime.onnx import export_onnx  # noqa: E402

KINDS = ("dense", "pruned-20x", "doped-kp-20x")


def stack(kind: str) -> LSTM:
    torch.manual_seed(0)
    lstm = LSTM(650, 650, 2)
    lstm.reset_parameters(0.05)
    if kind == "pruned-20x":
        leanlstm.compress_(lstm, leanlstm.Prune(compression=20, total_steps=1)).finalize()
    elif kind == "doped-kp-20x":
        leanlstm.compress_(lstm, leanlstm.Doped(compression=20, total_steps=1)).finalize()
    return lstm.eval()


def sizes(lstm: LSTM) -> dict:
    buffer = io.BytesIO()
    torch.save(lstm.state_dict(), buffer)
    row = {"stored_bytes": lstm.stored_params() * 4, "checkpoint_bytes": buffer.tell()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "stack.onnx")
        export_onnx(lstm, path, structure="always")   # the forms as stored, whatever runs faster
        row["onnx_bytes"] = os.path.getsize(path)
    row["checkpoint_ratio"] = row["checkpoint_bytes"] / row["stored_bytes"]
    row["onnx_ratio"] = row["onnx_bytes"] / row["stored_bytes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for kind in KINDS:
        rows.append({"model": kind, **sizes(stack(kind))})
        print(f"{kind:>13}: stored {rows[-1]['stored_bytes']:,} B; checkpoint {rows[-1]['checkpoint_bytes']:,} B "
              f"({rows[-1]['checkpoint_ratio']:.3f}x); ONNX {rows[-1]['onnx_bytes']:,} B ({rows[-1]['onnx_ratio']:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command_line(), "machine": machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
