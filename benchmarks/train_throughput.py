"""Training throughput (tokens/s) of PTB word LMs on leanlstm.LSTM forms vs torch.nn.LSTM, in one run.

    LEANLSTM_DATA=../shared/data python benchmarks/train_throughput.py --out results/train_throughput.json
    LEANLSTM_DATA=../shared/data python benchmarks/train_throughput.py --variants torch dense \
        --precisions float32 bfloat16 --out results/train_precision.json

Every configuration trains on the same real PTB windows (forward, backward, clipping, SGD step). Repeats are
interleaved across configurations so that machine drift hits all of them alike; we report medians and the
ratio of each median to the float32 torch.nn.LSTM median of the same preset. A configuration in another
precision than float32 is named ``VARIANT+PRECISION`` (``TrainConfig.precision``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.presets import get_preset  # noqa: E402
from leanlstm.tasks import build_ptb  # noqa: E402
from leanlstm.tasks.lm import WordLM  # noqa: E402
from leanlstm.train import PRECISIONS, Trainer  # noqa: E402

FORMS = {  # name -> options for LSTM.replace_forms, per preset
    "dense": lambda preset: None,
    "kronecker": lambda preset: {"form": "kronecker"},
    "lowrank": lambda preset: {"form": "lowrank", "rank": {"small": 20, "medium": 64}[preset]},
}


def build(preset_name: str, variant: str) -> WordLM:
    model = WordLM(get_preset(preset_name).lm)
    if variant == "torch":
        model.lstm = model.lstm.to_torch()
    elif (options := FORMS[variant](preset_name)) is not None:
        model.lstm.replace_forms(**options)
    return model


def time_windows(trainer: Trainer, windows: int) -> float:
    """Tokens per second over ``windows`` training windows (after one warm-up window)."""
    trainer.config = replace(trainer.config, max_batches=1)
    trainer.train_epoch(1)
    trainer.config = replace(trainer.config, max_batches=windows)
    started = time.perf_counter()
    trainer.train_epoch(1)
    seconds = time.perf_counter() - started
    return windows * trainer.config.batch_size * trainer.config.bptt / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--windows", type=int, default=40, help="timed training windows per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--variants", nargs="+", default=["torch", *FORMS], choices=["torch", *FORMS])
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=PRECISIONS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if "torch" not in args.variants or "float32" not in args.precisions:
        parser.error("every ratio is to float32 torch.nn.LSTM: keep torch in --variants and float32 in --precisions")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {"command": command_line(), "machine": machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "windows": args.windows, "repeats": args.repeats, "presets": {}}
    for preset_name in args.presets:
        preset = get_preset(preset_name)
        task = build_ptb(args.data_dir, preset.train.batch_size, preset.train.bptt)
        trainers = {}
        for precision in args.precisions:
            for variant in args.variants:
                torch.manual_seed(0)
                name = variant if precision == "float32" else f"{variant}+{precision}"
                trainers[name] = Trainer(build(preset_name, variant), task, replace(preset.train, precision=precision))
        variants = list(trainers)
        samples = {variant: [] for variant in variants}
        for _ in range(args.repeats):
            for variant in variants:
                samples[variant].append(time_windows(trainers[variant], args.windows))
        base = statistics.median(samples["torch"])
        rows = {}
        for variant in variants:
            median = statistics.median(samples[variant])
            rows[variant] = {"tokens_per_s": median, "min": min(samples[variant]), "max": max(samples[variant]),
                             "ratio_to_torch": median / base,
                             "lstm_params": _lstm_params(trainers[variant].model)}
            print(f"{preset_name:7s} {variant:18s} {median:8.0f} tok/s  x{median / base:.3f}  "
                  f"(min {min(samples[variant]):.0f}, max {max(samples[variant]):.0f})", flush=True)
        results["presets"][preset_name] = rows
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


def _lstm_params(model: WordLM) -> int:
    lstm = model.lstm
    return lstm.stored_params() if hasattr(lstm, "stored_params") else sum(p.numel() for p in lstm.parameters())


if __name__ == "__main__":
    main()
