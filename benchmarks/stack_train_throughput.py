"""Training throughput of the LSTM stack alone: dense ``leanlstm.LSTM`` against ``torch.nn.LSTM``, in one run.

    python benchmarks/stack_train_throughput.py --out results/stack-train-throughput.json

Each shape trains both modules on the same random batches (forward, a squared-output loss, backward, an SGD
step), with repeats interleaved between the two so that machine drift hits both alike; we report medians of
tokens per second and the ratio leanlstm / torch. The stack alone is the strict comparison: an embedding and a
softmax around it add the same time to both and shrink the ratio's distance from 1. Shapes: the PTB ``small``
and ``medium`` stacks (batch 20, 20 and 35 steps), and the medium stack bidirectional, projected (proj 325) and
both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

import leanlstm  # noqa: E402

SHAPES = {  # name -> (input, hidden, layers, steps, batch, nn.LSTM keyword arguments)
    "small": (200, 200, 2, 20, 20, {}),
    "medium": (650, 650, 2, 35, 20, {}),
    "medium-bidirectional": (650, 650, 2, 35, 20, {"bidirectional": True}),
    "medium-proj325": (650, 650, 2, 35, 20, {"proj_size": 325}),
    "medium-bidirectional-proj325": (650, 650, 2, 35, 20, {"bidirectional": True, "proj_size": 325}),
}


def tokens_per_second(module: nn.Module, batches: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    started = time.perf_counter()
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        out, _ = module(x)
        out.square().mean().backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return sum(x.shape[0] * x.shape[1] for x in batches) / seconds


def measure(shape: str, windows: int, repeats: int) -> dict:
    inputs, hidden, layers, steps, batch, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    reference = nn.LSTM(inputs, hidden, layers, **kwargs)
    modules = {"torch": reference, "leanlstm": leanlstm.LSTM.from_torch(reference)}
    optimizers = {name: torch.optim.SGD(module.parameters(), lr=1e-3) for name, module in modules.items()}
    batches = [torch.randn(steps, batch, inputs) for _ in range(windows)]
    for name in modules:                                     # warm-up: allocator, oneDNN primitives
        tokens_per_second(modules[name], batches[:2], optimizers[name])
    samples = {name: [] for name in modules}
    for _ in range(repeats):
        for name in modules:
            samples[name].append(tokens_per_second(modules[name], batches, optimizers[name]))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"tokens_per_s": medians, "samples": samples, "ratio": medians["leanlstm"] / medians["torch"],
            "shape": {"input": inputs, "hidden": hidden, "layers": layers, "steps": steps, "batch": batch, **kwargs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--windows", type=int, default=10, help="training windows per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": command_line(), "machine": machine(), "threads": args.threads, "torch": torch.__version__,
               "windows": args.windows, "repeats": args.repeats, "shapes": {}}
    for shape in args.shapes:
        row = results["shapes"][shape] = measure(shape, args.windows, args.repeats)
        print(f"{shape:30s} torch {row['tokens_per_s']['torch']:8.0f} tok/s  leanlstm "
              f"{row['tokens_per_s']['leanlstm']:8.0f} tok/s  ratio {row['ratio']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
