"""Repeated runs (seeds) of a few recipes side by side: each run's test and validation metric, and each recipe's
median, so that a comparison rests on more than one run of each.

    python benchmarks/repeats.py --out results/digits-hlstm-gp-seeds.json \\
      --recipe dense=runs/digits-medium,runs/digits-medium-seed1,runs/digits-medium-seed2 \\
      --recipe gp=runs/digits-hlstm-gp-distill,runs/digits-hlstm-gp-distill-seed1,runs/digits-hlstm-gp-distill-seed2

Every run must have finished (``metrics.json``). The metric is the task's own (``metric`` in the run's metrics:
``wer``, ``ppl``); word errors and words are copied too where the task records them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from record_run import command_line, machine

KEPT = ("method", "task", "preset", "lstm_params", "dense_lstm_params", "train_minutes", "test_word_errors",
        "test_words", "heldout_wer")


def recipe(text: str) -> tuple[str, list[Path]]:
    name, _, runs = text.partition("=")
    if not name or not runs:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN,RUN,..., got {text!r}")
    return name, [Path(run) for run in runs.split(",") if run]


def row(run: Path) -> dict:
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        sys.exit(f"{run} has not finished (no metrics.json): finish it, or leave it out")
    metrics = json.loads(metrics_file.read_text())
    config = json.loads((run / "config.json").read_text())
    metric = metrics["metric"]
    seed = config.get("overrides", {}).get("seed")
    return {"run": str(run), "seed": seed if seed is not None else "the preset's", "metric": metric,
            f"test_{metric}": metrics[f"test_{metric}"], f"val_{metric}": metrics[f"val_{metric}"],
            **{key: metrics[key] for key in KEPT if key in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=recipe, action="append", required=True, help="NAME=RUN,RUN,...")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    recipes = {}
    for name, runs in args.recipe:
        rows = [row(run) for run in runs]
        metric = rows[0]["metric"]
        if any(r["metric"] != metric for r in rows):
            sys.exit(f"recipe {name} mixes metrics: {sorted({r['metric'] for r in rows})}")
        recipes[name] = {"runs": rows, f"median_test_{metric}": statistics.median(r[f"test_{metric}"] for r in rows),
                         f"median_val_{metric}": statistics.median(r[f"val_{metric}"] for r in rows)}
        tests = ", ".join(f"{r[f'test_{metric}']:.4g}" for r in rows)
        print(f"{name}: test {metric} {tests}; median {recipes[name][f'median_test_{metric}']:.4g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command_line(), "machine": machine(), "recipes": recipes}, indent=1)
                        + "\n")


if __name__ == "__main__":
    main()
