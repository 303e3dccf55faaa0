"""Training throughput of structured dropout (issue 26) against standard dropout on a PTB model (medium-cpu).

    LEANLSTM_DATA=../shared/data python benchmarks/structured_dropout_throughput.py \
        --out results/structured-dropout-throughput.json --threads 2 1 --steps-per-mask 1 5

The model is ``--task``'s ``--preset``'s (PTB ``medium-cpu``: 2x650, dropout 0.5, batch 20, bptt 35; ``large``:
2x1500, dropout 0.65; digits ``digits-medium``: 2x256, dropout 0.1 between the layers and before the head, batches
of 32 utterances) on the task's real training batches: forward, the task's objective, backward, clipping, the
preset's optimizer step, as the Trainer does. ``standard`` runs PyTorch's fused LSTM kernel
with per-sequence dropout; ``structured`` (``--steps-per-mask 1``: a new mask every step, the paper's method)
computes every dropped-input product on the kept columns only; ``structured/gN`` shares a mask over N
consecutive steps (one gather for N * 20 rows); ``structured-window`` draws one mask for the whole window and runs
PyTorch's fused LSTM kernel on the kept inputs; ``structured-hybrid/gN`` (``--hybrid-steps N``) does so at the
stack's inputs and redraws the head's mask every N steps. Also timed: the products alone (``products``), dense masked
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
from leanlstm.tasks import get_task  # noqa: E402
from leanlstm.tasks.base import DataConfig  # noqa: E402
from leanlstm.train import OPTIMIZERS  # noqa: E402


def models(task, base, steps_per_mask: list[int], hybrid_steps: list[int] = ()) -> dict[str, torch.nn.Module]:
    """The model of config ``base`` in every dropout configuration, all from the same initial weights."""
    out = {"standard": base}
    for group in steps_per_mask:
        out["structured" if group == 1 else f"structured/g{group}"] = replace(
            base, dropout_mode="structured", dropout_steps_per_mask=group)
    out["structured-window"] = replace(base, dropout_mode="structured-window")
    for group in hybrid_steps:
        out[f"structured-hybrid/g{group}"] = replace(base, dropout_mode="structured-hybrid",
                                                     dropout_steps_per_mask=group)
    result = {}
    for name, config in out.items():
        torch.manual_seed(0)
        result[name] = type(task).build_model(config).train()
        if hasattr(task, "fit_normalisation"):
            task.fit_normalisation(result[name])
    return result


def window_seconds(task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, precision: str,
                   clip: float) -> float:
    """One training step as the Trainer takes it (the task's objective, e.g. the summed loss of a PTB window)."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        objective, _, _ = task.training_loss(model, batch, None)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
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


def time_products(model, train, repeats: int) -> dict:
    """Dense masked against compacted, forward + backward, at the word model's two shapes (a layer's input product,
    the decoder); interleaved, medians in ms."""
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


def time_training(task, model, train, args: argparse.Namespace) -> tuple[dict, dict, list[float]]:
    """Training windows (batches) of every configuration, interleaved window by window (order alternating)."""
    nets = models(task, model, args.steps_per_mask, args.hybrid_steps)
    optimizers = {name: OPTIMIZERS[train.optimizer](m.parameters(), lr=train.lr) for name, m in nets.items()}
    samples, loads = {name: [] for name in nets}, []
    batches = iter(task.train_batches(1))
    for index in range(args.warmup + args.windows):
        batch = next(batches)
        for name in (list(nets) if index % 2 == 0 else list(nets)[::-1]):
            seconds = window_seconds(task, nets[name], optimizers[name], batch, args.precision, train.clip)
            if index >= args.warmup:
                samples[name].append(seconds)
        loads.append(load())
    rows, base = {}, statistics.median(samples["standard"])
    for name, values in samples.items():
        median = statistics.median(values)
        rows[name] = {"windows_per_s": 1 / median, "median_s": median, "min_s": min(values), "max_s": max(values),
                      "speedup_vs_standard": base / median}
        print(f"  {name:22s} {1 / median:6.2f} windows/s, x{base / median:.3f} of standard", flush=True)
    return rows, samples, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", choices=["ptb", "digits"], default="ptb")
    parser.add_argument("--preset", default="medium-cpu", help="a preset of --task (ptb: medium-cpu, large; "
                        "digits: digits-medium)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch threads; one run per value")
    parser.add_argument("--windows", type=int, default=30, help="timed windows per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-per-mask", type=int, nargs="*", default=[1],
                        help="the per-step mode's steps per mask, one configuration each (none: window mode only)")
    parser.add_argument("--hybrid-steps", type=int, nargs="*", default=[],
                        help="structured-hybrid's head steps per mask, one configuration each")
    parser.add_argument("--dropout", type=float, help="every configuration's dropout rate (default: the preset's)")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--product-repeats", type=int, default=15, help="0: time training windows only")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    task_type = get_task(args.task)
    model, train = task_type.preset(args.preset).model, task_type.preset(args.preset).train
    if args.dropout is not None:              # every configuration's rate, the products' too
        model = replace(model, dropout=args.dropout)
    task = task_type.load(DataConfig(args.data_dir), train)
    runs = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
        before = os.getloadavg()
        timed = args.product_repeats and args.task == "ptb"        # the products' shapes are PTB's
        products = time_products(model, train, args.product_repeats) if timed else {}
        rows, samples, loads = time_training(task, model, train, args)
        runs[str(threads)] = {"load_average_before": list(before), "load_average_after": list(os.getloadavg()),
                              "load_average_1min_during": {"median": statistics.median(loads), "min": min(loads),
                                                           "max": max(loads)},
                              "products_fwd_bwd": products, "training": rows, "samples_s": samples}
    result = {"command": command_line(), "machine": machine(), "precision": args.precision,
              "model": f"{args.task} {args.preset}: {model.hidden_sizes}, dropout {model.dropout}, batch "
                       f"{train.batch_size}, {train.optimizer} + clipping",
              "windows": args.windows, "warmup": args.warmup, "runs_by_threads": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
