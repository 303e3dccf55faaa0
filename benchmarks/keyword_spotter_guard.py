"""The user trial's 2x128 keyword spotter: do pruning and doped KP at 3x still run slower than dense, silently?

    python benchmarks/keyword_spotter_guard.py --out results/keyword-spotter-guard.json

The model: a 2-layer LSTM of hidden size 128 on 40 MFCC-like inputs, read at its last step by a 12-way classifier
head (random weights: latency depends on the structure, not on trained values). Each method's final structure is
applied without training (``compress_`` then ``finalize()``: masks at their final density), once as it is and once
with ``keep_slow_dense=True`` (the guard keeps the matrices that would run slower than dense dense). For each we
record whether the speed guard's warning fired, with its numbers, and the whole model's per-step latency at batch
1 on the leanlstm engine: ``sequence`` (35 steps in one call) and ``stream`` (one frame per call, state carried,
as a keyword spotter runs). All models and backends take turns in one interleaved run (one thread), repeated
``--invocations`` times; the file keeps every run's medians and their median, the CPU (lscpu) and the load.
``OPENBLAS_CORETYPE`` is recorded as found (unset is allowed here: no backend timed here calls OpenBLAS).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

import leanlstm  # noqa: E402
from leanlstm.methods.pruning import weight_compression  # noqa: E402
from leanlstm.runtime.latency import load_now, measure  # noqa: E402

BACKENDS = ("leanlstm", "leanlstm-stream")


class KeywordSpotter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(40, 128, 2, batch_first=True), nn.Linear(128, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def compressed(dense: nn.Module, config: leanlstm.methods.MethodConfig) -> tuple[nn.Module, dict]:
    """The model with the method's final structure, and what the speed guard said."""
    model, collect = copy.deepcopy(dense), Collect()
    logger = logging.getLogger("leanlstm.compress")
    logger.addHandler(collect)
    try:
        handle = leanlstm.compress_(model, config)
        handle.finalize()
    finally:
        logger.removeHandler(collect)
    summary = handle.summary()
    return model.eval(), {"warning_fired": bool(collect.messages), "warnings": collect.messages,
                          "kept_dense": summary["kept_dense"], "slow_downs": summary["slow_downs"],
                          "lstm_weight_compression": weight_compression(model)}


def models() -> tuple[dict[str, nn.Module], dict[str, dict]]:
    torch.manual_seed(0)
    dense = KeywordSpotter().eval()
    configs = {
        "pruned-3x": leanlstm.Prune(compression=3, total_steps=1),
        "doped-kp-3x": leanlstm.Doped("kronecker", compression=3, total_steps=1),
        "pruned-3x-guarded": leanlstm.Prune(compression=3, total_steps=1, keep_slow_dense=True),
        "doped-kp-3x-guarded": leanlstm.Doped("kronecker", compression=3, total_steps=1, keep_slow_dense=True),
    }
    built, notes = {"dense": dense}, {"dense": {"warning_fired": False, "lstm_weight_compression": 1.0}}
    for label, config in configs.items():
        built[label], notes[label] = compressed(dense, config)
    return built, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved samples per model and backend")
    parser.add_argument("--invocations", type=int, default=3, help="whole interleaved runs")
    parser.add_argument("--out", type=Path, default=Path("results/keyword-spotter-guard.json"))
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_before = load_now()
    built, notes = models()
    runs = []
    for _ in range(options.invocations):
        result = measure(built, BACKENDS, seq_len=35, repeats=options.repeats, threads=1)
        runs.append({label: {b: stats["median"] for b, stats in entry["backends"].items()}
                     for label, entry in result["models"].items()})
        runs[-1]["load"] = load_now()
    report = {}
    for label in built:
        per_backend = {b: [run[label][b] for run in runs] for b in BACKENDS}
        median = {b: statistics.median(values) for b, values in per_backend.items()}
        report[label] = notes[label] | {
            "us_per_step": median, "us_per_step_runs": per_backend,
            "vs_dense": {b: median[b] / statistics.median(run["dense"][b] for run in runs) for b in BACKENDS}}
    out = {"command": command_line(), "machine": machine(), "cpus": os.cpu_count(),
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset"),
           "load_before": load_before, "load_after": load_now(),
           "settings": {"model": "LSTM 40 -> 2x128, last step -> Linear 12", "batch": 1, "seq_len": 35,
                        "threads": 1, "repeats": options.repeats, "invocations": options.invocations,
                        "backends": {"leanlstm": "35-step sequence per call", "leanlstm-stream": "one frame per call"}},
           "unit": "us per time step (median of each run's median)", "models": report}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(out, indent=2) + "\n")
    for label, entry in report.items():
        logging.getLogger("keyword_spotter_guard").warning(
            "%-20s %5.2fx  seq %6.2f us (%.2fx dense)  stream %6.2f us (%.2fx dense)  warning %s  kept dense %d",
            label, entry["lstm_weight_compression"], entry["us_per_step"]["leanlstm"], entry["vs_dense"]["leanlstm"],
            entry["us_per_step"]["leanlstm-stream"], entry["vs_dense"]["leanlstm-stream"], entry["warning_fired"],
            len(entry.get("kept_dense", [])))


if __name__ == "__main__":
    main()
