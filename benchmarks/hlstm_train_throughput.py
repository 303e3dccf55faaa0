"""Training throughput of the H-LSTM cell against an LSTM with the same number of recurrent parameters.

    python benchmarks/hlstm_train_throughput.py --out results/hlstm-train-throughput.json [--threads 2] \
        [--precision bfloat16]

For each H-LSTM shape (input, hidden, gate width) the LSTM of equal parameter count has the hidden size that
comes closest; both are ``leanlstm.LSTM`` stacks (the LSTM runs PyTorch's fused kernel, the H-LSTM its explicit
recurrence, ``nn.hlstm.hlstm_recurrence``). Same random batches, forward + backward + SGD step, ``--repeats``
interleaved repeats of ``--windows`` windows, the forward under bfloat16 autocast with ``--precision bfloat16``
(as ``TrainConfig.precision``); medians in time steps x batch per second.
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

SHAPES = (  # (input, hidden, gate width, layers, steps, batch): the digits preset, and PTB's medium width
    (120, 256, 128, 2, 100, 32),
    (650, 650, 325, 2, 35, 20),
)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def equal_lstm(hlstm: leanlstm.LSTM, layers: int) -> leanlstm.LSTM:
    """The LSTM stack with the hidden size whose parameter count is closest to ``hlstm``'s."""
    target = params(hlstm)
    count = lambda h: params(leanlstm.LSTM(hlstm.input_size, h, layers))  # noqa: E731
    best = min(range(8, 2 * hlstm.hidden_size), key=lambda h: abs(count(h) - target))
    return leanlstm.LSTM(hlstm.input_size, best, layers)


def step_time(model: leanlstm.LSTM, x: torch.Tensor, optimizer: torch.optim.Optimizer, precision: str) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        output, _ = model(x)
    output.float().pow(2).mean().backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for inputs, hidden, width, layers, steps, batch in SHAPES:
        models = {"hlstm": leanlstm.LSTM(inputs, hidden, layers, cell="hlstm", cell_options={"gate_hidden": width})}
        models["lstm"] = equal_lstm(models["hlstm"], layers)
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
        xs = [torch.randn(steps, batch, inputs) for _ in range(args.windows)]
        for name, model in models.items():                  # warm-up
            step_time(model, xs[0], optimizers[name], args.precision)
        samples = {name: [] for name in models}
        for repeat in range(args.repeats):
            for name in (list(models) if repeat % 2 == 0 else list(models)[::-1]):
                seconds = sum(step_time(models[name], x, optimizers[name], args.precision) for x in xs)
                samples[name].append(args.windows * steps * batch / seconds)
        medians = {name: float(np.median(values)) for name, values in samples.items()}
        row = {"input": inputs, "hidden": hidden, "gate_hidden": width, "layers": layers, "steps": steps,
               "batch": batch, "hlstm_params": params(models["hlstm"]), "lstm_params": params(models["lstm"]),
               "lstm_hidden": models["lstm"].hidden_size, "tokens_per_s": medians, "samples": samples,
               "hlstm_vs_lstm": medians["hlstm"] / medians["lstm"]}
        rows.append(row)
        print(f"H-LSTM {layers}x{hidden} (gates {width} wide, {row['hlstm_params']:,} params) "
              f"{medians['hlstm']:,.0f} tok/s; LSTM {layers}x{row['lstm_hidden']} ({row['lstm_params']:,}) "
              f"{medians['lstm']:,.0f} tok/s; ratio {row['hlstm_vs_lstm']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command_line(), "machine": machine(), "threads": args.threads,
                                    "precision": args.precision, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
