"""Several runs of ``int8_latency.py`` side by side: one row per run, each chosen model's leanlstm int8 time and its
ratio to the best dense peer of the same run (the faster of ONNX Runtime int8 and torch-int8), with the peers' own
times, so that runs in different states of a shared host stay apart instead of being folded into one median.

    python benchmarks/int8_latency_runs.py results/int8-latency-xeon-*.json \\
      --show dense/lstm,dense/model,blocks-40x-int8-bytes/lstm,blocks-40x-int8-bytes+lowrank-decoder-12x/model

Prints a Markdown table, runs in the order given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PEERS = ("onnxruntime-int8", "torch-int8")
OURS = "leanlstm-int8"


def best_peer(medians: dict, part: str) -> float:
    """The fastest dense peer's us per step for ``part`` (``lstm`` or ``model``) in one run."""
    times = [medians[f"dense/{part}"][peer] for peer in PEERS if peer in medians.get(f"dense/{part}", {})]
    if not times:
        raise KeyError(f"no dense {part} timing of {' or '.join(PEERS)}")
    return min(times)


def run_row(path: Path, shown: list[str]) -> list[str]:
    result = json.loads(path.read_text())
    medians = result["medians"]
    cells = [path.name, " / ".join(f"{medians[f'dense/{part}'].get(peer, float('nan')):.1f}"
                                   for part in ("lstm", "model") for peer in PEERS)]
    for key in shown:
        if key not in medians or OURS not in medians[key]:
            sys.exit(f"{path}: no {OURS} timing of {key}; run int8_latency.py with that structure, or leave it out")
        ours = medians[key][OURS]
        peer = best_peer(medians, key.split("/")[1])
        cells.append(f"{ours:.1f} ({peer / ours:.2f}x)")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="result files of int8_latency.py")
    parser.add_argument("--show", default="dense/lstm,dense/model",
                        help="comma-separated MODEL/PART keys (PART: lstm or model) to show")
    args = parser.parse_args()
    shown = [key for key in args.show.split(",") if key]
    bad = [key for key in shown if key.count("/") != 1 or key.split("/")[1] not in ("lstm", "model")]
    if bad:
        parser.error(f"--show takes MODEL/lstm or MODEL/model, got {', '.join(bad)}")
    header = ["run", "dense stack: ORT int8 / torch-int8; whole: the same"] + [f"{key} (vs best peer)" for key in shown]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.results:
        print("| " + " | ".join(run_row(path, shown)) + " |")


if __name__ == "__main__":
    main()
