"""Which structure suits a trained model: each method applied to a trained run's weights at its final compression,
with no training, then validation perplexity.

    OMP_NUM_THREADS=1 python benchmarks/one_shot.py runs/ptb-medium-cpu --compression 20 \
        --methods prune doped-kp doped-lmf doped-hmd kp lmf --json results/ptb-medium-cpu-one-shot.json

A method starting from a trained baseline begins where its conversion leaves the model. Doped methods convert
exactly (``S + D = W``, ``D`` dense), then prune ``D``; pruning prunes ``W``. This script jumps to the end of
that schedule at once (``Method.finalize``: every sparse part at its final density, by magnitude), so the
perplexity says how much of the trained function the final budget keeps before any training repairs it. Per
matrix it also reports the relative Frobenius error ``|W - W'| / |W|`` of the converted matrix ``W'``, and for
doped forms the error of ``S`` alone. Evaluation runs at batch ``--eval-batch`` (10 by default, for speed; the
training runs evaluate at batch 1), so the dense baseline is evaluated the same way in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from leanlstm.methods import get_method
from leanlstm.methods.base import parse_settings
from leanlstm.methods.pruning import weight_compression
from leanlstm.nn.forms import Doped
from leanlstm.graph import lstm_forms
from leanlstm.runs import build_task, load_run

sys.path.insert(0, str(Path(__file__).parent))
from record_run import command_line, machine  # noqa: E402


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((weight - approximation).norm() / weight.norm())


@torch.no_grad()
def convert(model: torch.nn.Module, method_spec: str, compression: float) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` with ``method_spec`` (a method name, optionally ``:key=value,...`` settings of its
    config, e.g. ``doped-kp:doping_share=0.75``) applied at ``compression`` and every sparse part at its final
    density; and per matrix the relative errors."""
    method_name, _, settings = method_spec.partition(":")
    method_class = get_method(method_name)
    values = parse_settings(item for item in settings.split(",") if item)
    # no CMR override: it acts only in training, and a doped method's finalize switches it off anyway
    method = method_class(method_class.Config.from_strings({"compression": str(compression)} | values))
    original = {name: form.materialize().detach().clone() for name, form in lstm_forms(model)}
    converted = method.finalize(method.prepare(copy.deepcopy(model)))
    errors = {}
    for name, form in lstm_forms(converted):
        entry = {"error": relative_error(original[name], form.materialize())}
        if isinstance(form, Doped):
            entry["structure_alone_error"] = relative_error(original[name], form.structured.materialize())
        errors[name] = entry
    return converted, {"lstm_weight_compression": weight_compression(converted), "matrices": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained (dense) run directory")
    parser.add_argument("--methods", nargs="+", default=["prune", "doped-kp", "doped-lmf"],
                        help="method names, each optionally with config settings: doped-kp:doping_share=0.75")
    parser.add_argument("--compression", type=float, default=20.0)
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--eval-batch", type=int, default=10)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    run, model, _ = load_run(options.run)
    task = build_task(run, run.train_config())
    task.eval_batch_size = options.eval_batch
    started = time.time()
    rows = [{"method": "dense (as trained)", "lstm_weight_compression": 1.0,
             "ppl": task.evaluate(model, options.split)["ppl"]}]
    print(f"dense: {rows[0]['ppl']:.2f}", flush=True)
    for name in options.methods:
        converted, record = convert(model, name, options.compression)
        rows.append({"method": name, **record, "ppl": task.evaluate(converted, options.split)["ppl"]})
        print(f"{name}: {rows[-1]['ppl']:.2f}", flush=True)
    print(f"\n| method | LSTM weight compression | {options.split} ppl, no training | relative error per matrix "
          f"| S alone |")
    print("|---|---|---|---|---|")
    for row in rows:
        matrices = row.get("matrices", {}).values()
        errors = ", ".join(f"{m['error']:.2f}" for m in matrices) or "-"
        alone = ", ".join(f"{m['structure_alone_error']:.2f}" for m in matrices if "structure_alone_error" in m)
        print(f"| {row['method']} | {row['lstm_weight_compression']:.2f}x | {row['ppl']:.2f} | {errors} "
              f"| {alone or '-'} |")
    if options.json:
        record = {"command": command_line(), "machine": machine(), "run": options.run,
                  "compression": options.compression, "split": options.split, "eval_batch": options.eval_batch,
                  "seconds": time.time() - started, "rows": rows}
        options.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
