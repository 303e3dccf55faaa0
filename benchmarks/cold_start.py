"""Fresh-process first-call time of ``leanlstm.runtime.compile(model).run(x)`` (35 steps), 2x650 LSTM stacks.

    python benchmarks/cold_start.py --out results/cold-start.json [--runs 5] [--checkout PATH]

Dense, pruned 20x and doped Kronecker at 20x (one-shot conversions of a randomly initialised stack). Every sample
is a new Python process with the checkout's ``leanlstm`` first on its path (``--checkout``, default this one: pass
a ``git worktree`` of an older commit to time it); the first process of each model fills the on-disk kernel cache
and is reported apart. Medians of ``--runs`` processes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import numpy as np, torch
import leanlstm
from leanlstm.nn import LSTM
torch.manual_seed(0)
lstm = LSTM(650, 650, 2)
lstm.reset_parameters(0.05)
if sys.argv[1] == "pruned-20x":
    leanlstm.compress_(lstm, leanlstm.Prune(compression=20, total_steps=1)).finalize()
elif sys.argv[1] == "doped-kp-20x":
    leanlstm.compress_(lstm, leanlstm.Doped(compression=20, total_steps=1)).finalize()
lstm.eval()
x = np.random.default_rng(0).standard_normal((35, 650)).astype(np.float32)
from leanlstm import runtime
start = time.perf_counter()
engine = runtime.compile(lstm)
compiled = time.perf_counter()
engine.run(x)
first = time.perf_counter()
print(json.dumps({"compile_s": compiled - start, "first_run_s": first - compiled, "total_s": first - start}))
"""
MODELS = ("dense", "pruned-20x", "doped-kp-20x")


def sample(model: str, checkout: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, model, str(checkout)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    load_before, rows = os.getloadavg(), []
    for model in MODELS:
        warming = sample(model, args.checkout.resolve())
        runs = [sample(model, args.checkout.resolve()) for _ in range(args.runs)]
        rows.append({"model": model, "warming_process_total_s": warming["total_s"],
                     **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
                     "total_s_each": [r["total_s"] for r in runs]})
        print(f"{model:>13}: first call {rows[-1]['total_s']:.2f} s (median of {args.runs} fresh processes; "
              f"the cache-filling one {warming['total_s']:.2f} s)")
    report = {"command": command_line(), "machine": machine(), "checkout": str(args.checkout),
              "load_average": [load_before, os.getloadavg()], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
