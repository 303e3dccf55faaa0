"""A/B of the engine's 2x32 step between two checkouts of leanlstm, each in its own processes.

    git worktree add /tmp/before 57f5f09
    python benchmarks/engine_ab.py /tmp/before . [--rounds 6]

Each round starts one process per checkout (alternating, one thread, a Numba cache of its own), which times a
2x32 ``leanlstm.LSTM`` on 35-step sequences: 10 repeats of 300 ``run`` calls and of 30 streams of 35
``Stream.step`` calls. Prints the median over rounds of each process's median, in us per time step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PROBE = r'''
import sys, time, json, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import leanlstm
from leanlstm.runtime import compile
torch.manual_seed(0)
engine = compile(leanlstm.LSTM(32, 32, 2))
xs = np.random.default_rng(0).standard_normal((35, 32)).astype(np.float32)
for _ in range(50):
    engine.run(xs)
stream = engine.stream()
for x in xs:
    stream.step(x)
times = {"run": [], "stream": []}
for _ in range(10):
    start = time.perf_counter()
    for _ in range(300):
        engine.run(xs)
    times["run"].append((time.perf_counter() - start) / 300 / 35 * 1e6)
    start = time.perf_counter()
    for _ in range(30):
        stream.reset()
        for x in xs:
            stream.step(x)
    times["stream"].append((time.perf_counter() - start) / 30 / 35 * 1e6)
print(json.dumps({name: float(np.median(values)) for name, values in times.items()}))
'''


def probe(checkout: Path, label: str) -> dict[str, float]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "NUMBA_CACHE_DIR": f"/tmp/engine-ab-cache-{label}"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(checkout)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{checkout}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label in results:
            results[label].append(probe(getattr(args, label).resolve(), label))
    for label, rounds in results.items():
        medians = {name: round(float(np.median([r[name] for r in rounds])), 3) for name in rounds[0]}
        print(f"{label:>6} ({getattr(args, label)}): us per step {medians}")


if __name__ == "__main__":
    main()
