"""Training throughput of structured dropout (issue 26) against standard dropout on a PTB model (medium-cpu).

    LEANLSTM_DATA=../shared/data python benchmarks/structured_dropout_throughput.py \
        --out results/structured-dropout-throughput.json --threads 2 1 --steps-per-mask 1 5

The model is ``--preset``'s (``medium-cpu``: 2x650, dropout 0.5, batch 20, bptt 35; ``large``: 2x1500, dropout
0.65) on real PTB training windows: forward, summed loss, backward, clipping, SGD step, as the Trainer does. ``standard`` runs PyTorch's fused LSTM kernel
with per-sequence dropout; ``structured`` (``--steps-per-mask 1``: a new mask every step, the paper's method)
computes every dropped-input product on the kept columns only; ``structured/gN`` shares a mask over N
consecutive steps (one gather for N * 20 rows); ``structured-window`` draws one mask for the whole window and runs
PyTorch's fused LSTM kernel on the kept inputs. Also timed: the products alone (``products``), dense masked
against compacted, forward + backward, at the two shapes of the model (650 -> 2600 per layer, 650 -> 10000
decoder). Configurations run interleaved, one window at a time after warm-up; medians. The machine's load
average is recorded before and after: it is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.nn.structured_dropout import draw_masks, structured_linear  # noqa: E402
from leanlstm.tasks.lm import WordLM  # noqa: E402
from leanlstm.tasks.ptb import PRESETS, batchify, load_ptb  # noqa: E402


def models(preset: str, steps_per_mask: list[int]) -> dict[str, WordLM]:
    base = PRESETS[preset].model
    out = {"standard": base}
    for group in steps_per_mask:
        out["structured" if group == 1 else f"structured/g{group}"] = replace(
            base, dropout_mode="structured", dropout_steps_per_mask=group)
    out["structured-window"] = replace(base, dropout_mode="structured-window")
    result = {}
    for name, config in out.items():
        torch.manual_seed(0)
        result[name] = WordLM(config).train()
    return result


def window_seconds(model: WordLM, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                   precision: str, clip: float) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        _, loss, _ = model(inputs, None, targets)
    optimizer.zero_grad(set_to_none=True)
    (loss * inputs.shape[0]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return time.perf_counter() - started


def product_seconds(out_features: int, compact: bool, p: float = 0.5, T: int = 35, B: int = 20, n: int = 650
                    ) -> float:
    x = torch.randn(T, B, n, requires_grad=True)
    weight = torch.randn(out_features, n, requires_grad=True)
    masks = draw_masks(T, n, p)
    started = time.perf_counter()
    if compact:
        y = structured_linear(x, weight, masks, p)
    else:
        y = (x * (masks.unsqueeze(1) / (1 - p))) @ weight.t()
    y.sum().backward()
    return time.perf_counter() - started


def load() -> float:
    return os.getloadavg()[0]


def time_products(preset: str, repeats: int) -> dict:
    """Dense masked against compacted, forward + backward, at the model's two shapes (a layer's input product, the
    decoder); interleaved, medians in ms."""
    model, train = PRESETS[preset].model, PRESETS[preset].train
    n, products = model.hidden_sizes[0], {}
    for out_features in (4 * n, model.vocab_size):
        samples = {"dense_masked": [], "compacted": []}
        for repeat in range(repeats + 2):
            for name in (samples if repeat % 2 else list(samples)[::-1]):
                seconds = product_seconds(out_features, name == "compacted", model.dropout, train.bptt,
                                          train.batch_size, n)
                if repeat >= 2:
                    samples[name].append(seconds)
        medians = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
        products[f"{n}->{out_features}"] = {"median_ms": medians,
                                            "compacted_vs_dense": medians["dense_masked"] / medians["compacted"]}
        print(f"  product {n}->{out_features} fwd+bwd: dense masked {medians['dense_masked']:.1f} ms, compacted "
              f"{medians['compacted']:.1f} ms", flush=True)
    return products


def time_training(columns: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict, list[float]]:
    """Training windows of every configuration, interleaved window by window (order alternating)."""
    train = PRESETS[args.preset].train
    bptt = train.bptt
    nets = models(args.preset, args.steps_per_mask)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=train.lr) for name, m in nets.items()}
    samples, loads = {name: [] for name in nets}, []
    for index in range(args.warmup + args.windows):
        start = (index * bptt) % (columns.shape[0] - bptt - 1)
        inputs, targets = columns[start:start + bptt], columns[start + 1:start + 1 + bptt]
        for name in (list(nets) if index % 2 == 0 else list(nets)[::-1]):
            seconds = window_seconds(nets[name], optimizers[name], inputs, targets, args.precision, train.clip)
            if index >= args.warmup:
                samples[name].append(seconds)
        loads.append(load())
    rows, base = {}, statistics.median(samples["standard"])
    for name, values in samples.items():
        median = statistics.median(values)
        rows[name] = {"windows_per_s": 1 / median, "median_s": median, "min_s": min(values), "max_s": max(values),
                      "tokens_per_s": bptt * columns.shape[1] / median, "speedup_vs_standard": base / median}
        print(f"  {name:16s} {1 / median:6.2f} windows/s ({bptt * columns.shape[1] / median:7.0f} tok/s), "
              f"x{base / median:.3f} of standard", flush=True)
    return rows, samples, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=["medium-cpu", "large"], default="medium-cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch threads; one run per value")
    parser.add_argument("--windows", type=int, default=30, help="timed windows per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-per-mask", type=int, nargs="+", default=[1])
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--product-repeats", type=int, default=15, help="0: time training windows only")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    model, train = PRESETS[args.preset].model, PRESETS[args.preset].train
    columns = batchify(load_ptb(args.data_dir).train, PRESETS[args.preset].train.batch_size)
    runs = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
        before = os.getloadavg()
        products = time_products(args.preset, args.product_repeats) if args.product_repeats else {}
        rows, samples, loads = time_training(columns, args)
        runs[str(threads)] = {"load_average_before": list(before), "load_average_after": list(os.getloadavg()),
                              "load_average_1min_during": {"median": statistics.median(loads), "min": min(loads),
                                                           "max": max(loads)},
                              "products_fwd_bwd": products, "training": rows, "samples_s": samples}
    result = {"command": command_line(), "machine": machine(), "precision": args.precision,
              "model": f"ptb {args.preset}: {model.hidden_sizes}, dropout {model.dropout}, batch {train.batch_size}, "
                       f"bptt {train.bptt}, SGD + clipping",
              "windows": args.windows, "warmup": args.warmup, "runs_by_threads": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
