"""How much of a doped model's function its sparse part D carries: perplexity with S + D and with S alone.

    OMP_NUM_THREADS=1 python benchmarks/doped_parts.py runs/ptb-small-doped-kp-20x-6ep \
        runs/ptb-small-doped-kp-20x-6ep-nocmr

Co-matrix adaptation (Thakker et al.) is S leaning on D: then S alone is far worse than S + D. Co-matrix dropout
(CMR) is meant to make S carry the function on its own. Per run: validation perplexity of S + D (the model as
trained) and of S with every D zeroed, and per matrix the Frobenius norms of S and D and D's nonzeros.
Prints a table; ``--json PATH`` also writes it.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from leanlstm.nn.forms.doped import Doped
from leanlstm.graph import lstm_forms
from leanlstm.runs import build_task, load_run

sys.path.insert(0, str(Path(__file__).parent))
from record_run import command_line, machine  # noqa: E402


def parts(run_dir: str, split: str) -> dict:
    run, model, _ = load_run(run_dir)
    task = build_task(run, run.train_config())
    forms = [(name, form) for name, form in lstm_forms(model) if isinstance(form, Doped)]
    if not forms:
        raise SystemExit(f"{run_dir}: the model has no doped matrices")
    matrices = []
    with torch.no_grad():
        for name, form in forms:
            sparse = form.sparse.materialize()
            matrices.append({"matrix": name, "s_norm": float(form.structured.materialize().norm()),
                             "d_norm": float(sparse.norm()), "d_nonzeros": int(sparse.count_nonzero())})
    structured_only = copy.deepcopy(model)
    with torch.no_grad():
        for _, form in lstm_forms(structured_only):
            if isinstance(form, Doped):
                form.sparse.weight.zero_()
    return {"run": run_dir, "split": split, "ppl_s_plus_d": task.evaluate(model, split)["ppl"],
            "ppl_s_only": task.evaluate(structured_only, split)["ppl"], "matrices": matrices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    results = [parts(run, options.split) for run in options.runs]
    print(f"| run | {options.split} ppl S + D | S only | |D| / |S| per matrix |")
    print("|---|---|---|---|")
    for r in results:
        ratios = ", ".join(f"{m['d_norm'] / m['s_norm']:.2f}" for m in r["matrices"])
        print(f"| {r['run']} | {r['ppl_s_plus_d']:.2f} | {r['ppl_s_only']:.2f} | {ratios} |")
    if options.json:
        record = {"command": command_line(), "machine": machine(), "runs": results}
        options.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
