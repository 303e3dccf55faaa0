"""Per-step cost of the engine's three ways to run a sequence, batch 1, one thread: ``run`` (whole sequence,
divided by its length), ``Engine.step`` (explicit state, copied and checked every call) and ``Stream.step``.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--repeats 7] [--out results/step-overhead.json]

The three take turns in every repeat (35-step sequences, 200 sequences a sample); medians in us per step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

import leanlstm  # noqa: E402
from leanlstm.runtime import compile  # noqa: E402

SEQ_LEN, SEQUENCES = 35, 200


def ways(engine, xs):
    stream = engine.stream()

    def run():
        engine.run(xs)

    def step():
        state = None
        for x in xs:
            _, state = engine.step(x, state)

    def stream_step():
        stream.reset()
        for x in xs:
            stream.step(x)
    return {"run": run, "Engine.step": step, "Stream.step": stream_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.manual_seed(0)
    report = {"command": command_line(), "machine": machine(), "unit": "us per step", "models": {}}
    for sizes in ([32, 32], [200, 200], [650, 650]):
        engine = compile(leanlstm.LSTM(sizes[0], sizes).eval())
        xs = np.random.default_rng(0).standard_normal((SEQ_LEN, sizes[0])).astype(np.float32)
        runners = ways(engine, xs)
        samples = {name: [] for name in runners}
        for name, runner in runners.items():
            runner()                                              # compile and warm up
        for _ in range(options.repeats):
            for name, runner in runners.items():
                started = time.perf_counter()
                for _ in range(SEQUENCES):
                    runner()
                samples[name].append((time.perf_counter() - started) / SEQUENCES / SEQ_LEN * 1e6)
        medians = {name: float(np.median(values)) for name, values in samples.items()}
        report["models"][f"{sizes[0]}x2"] = medians
        print(f"2x{sizes[0]}: " + ", ".join(f"{name} {value:.2f}" for name, value in medians.items()))
    if options.out:
        options.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
