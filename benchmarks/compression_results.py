"""Compressed runs beside their dense baseline: perplexity, size and batch-1 latency, measured in one run.

    python benchmarks/compression_results.py --baseline runs/ptb-small runs/ptb-small-iss-a runs/ptb-small-iss-b \
        --out results/ptb-small-iss.json [--control runs/ptb-small-direct] [--plot results/ptb-small-iss.png]

Every model's LSTM stack and whole model (embedding + stack + decoder) is timed on the leanlstm runtime and on
ONNX Runtime (dense), all interleaved in one measurement, so the speed-ups compare like with like. Perplexities,
sizes and configurations come from each run's ``metrics.json`` (finished runs only). ``--control`` marks runs
that are controls (e.g. the found sizes trained from scratch) rather than compression results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.report import plot_tradeoff  # noqa: E402
from leanlstm.runs import load_run  # noqa: E402
from leanlstm.runtime.latency import load_now, medians, stack_and_model  # noqa: E402

KEEP = ("method", "task", "preset", "hidden_sizes", "lstm_params", "dense_lstm_params", "lstm_compression", "val_ppl",
        "test_ppl", "epochs", "train_minutes", "command", "method_config", "source", "iss_hidden_sizes",
        "structure", "target_compression", "lstm_weight_compression", "lstm_macs_reduction", "sparse_density",
        "distilled_from", "distill")


def summary(run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{run_dir} has no metrics.json: finish the run first (leanlstm compress ... --resume)")
    metrics = json.loads(metrics_file.read_text())
    out = {"run": str(run_dir), **{k: metrics[k] for k in KEEP if k in metrics}}
    out["epochs_by_phase"] = {}
    for entry in metrics.get("history", []):
        out["epochs_by_phase"][entry["phase"]] = out["epochs_by_phase"].get(entry["phase"], 0) + 1
    return out


def ours(measured: dict, part: str, backend: str) -> float | None:
    """``backend``'s median for ``part`` ("lstm" or "model") of one model; None where it failed."""
    return measured[part].get(backend)


def origin(run_dir: Path) -> Path | None:
    """The run a chain of compressions started from (an int8 run from a pruned run from the baseline)."""
    source = summary(run_dir).get("source")
    while source and (Path(source) / "metrics.json").is_file() and summary(Path(source)).get("source"):
        source = summary(Path(source))["source"]
    return Path(source) if source else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished compressed run directories")
    parser.add_argument("--baseline", required=True, type=Path, help="the dense run they were compressed from")
    parser.add_argument("--control", nargs="*", type=Path, default=[], help="control runs (reported, not ranked)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--plot", type=Path, help="PNG of test perplexity against LSTM compression per method")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backends", nargs="+", default=["leanlstm", "onnxruntime"])
    parser.add_argument("--ours", default="leanlstm", help="the backend the compressed models are judged on, e.g. "
                        "leanlstm-int8; the others' dense times are the peers")
    parser.add_argument("--warm", action="store_true", help="time each sample right after an untimed run of the "
                        "same model and backend (runtime.latency.measure): steady-state latency, caches warm")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.ours not in args.backends:
        args.backends = [args.ours, *args.backends]

    summaries = {run_dir: summary(run_dir) for run_dir in [args.baseline, *args.runs, *args.control]}
    for run_dir in args.runs:        # ratios, ppl changes and the run's own compression factor share one baseline
        source = origin(run_dir)
        if source and source.resolve() != args.baseline.resolve():
            raise SystemExit(f"{run_dir} was compressed from {source}, not from --baseline {args.baseline}")
    dirs = {"baseline": args.baseline, **{str(d): d for d in [*args.runs, *args.control]}}
    models = {label: load_run(d)[1] for label, d in dirs.items()}
    busy_before = load_now()
    timing = stack_and_model(models, args.backends, repeats=args.repeats, warm=args.warm)
    busy_after = load_now()
    latency = {label: {part: medians(m[part]) for part in ("lstm", "model")} for label, m in timing["models"].items()}
    base = summaries[args.baseline] | {"latency_us_per_step": latency["baseline"]}
    dense_ort = latency["baseline"]["lstm"].get("onnxruntime")

    def entry(run_dir: Path, role: str) -> dict:
        result = summaries[run_dir] | {"role": role, "baseline_test_ppl": base["test_ppl"]}
        # a plain training run (e.g. a direct-design control) records no compression: against the baseline's stack
        result.setdefault("lstm_compression", base["lstm_params"] / result["lstm_params"])
        result["test_ppl_change"] = result["test_ppl"] - base["test_ppl"]
        result["test_ppl_change_percent"] = 100 * result["test_ppl_change"] / base["test_ppl"]
        result["latency_us_per_step"] = own = latency[str(run_dir)]
        result["baseline_latency_us_per_step"] = latency["baseline"]
        stack, model = ours(own, "lstm", args.ours), ours(own, "model", args.ours)
        dense_ort_model = latency["baseline"]["model"].get("onnxruntime")
        if dense_ort and stack:
            result["lstm_speedup_vs_dense_onnxruntime"] = dense_ort / stack
        if dense_ort_model and model:
            result["model_speedup_vs_dense_onnxruntime"] = dense_ort_model / model
        dense_ours = ours(latency["baseline"], "lstm", args.ours)
        if dense_ours and stack:
            result[f"lstm_speedup_vs_dense_{args.ours}"] = dense_ours / stack
        peers = {name: t for name, t in latency["baseline"]["lstm"].items() if not name.startswith("leanlstm")}
        if peers and stack:      # the best peer: the fastest other backend running the dense baseline
            best = min(peers, key=peers.get)
            result |= {"best_peer": best, "lstm_speedup_vs_best_dense_peer": peers[best] / stack}
            model_peers = {name: t for name, t in latency["baseline"]["model"].items() if name in peers}
            if model and best in model_peers:
                result["model_speedup_vs_best_dense_peer"] = model_peers[best] / model
        errors = timing["models"][str(run_dir)]["errors"]
        return result | ({"latency_errors": errors} if errors else {})

    report = {
        "command": command_line(),
        "machine": machine() | timing["machine"] | {"busy_before": busy_before, "busy_after": busy_after},
        "latency_settings": {k: timing[k] for k in ("unit", "batch", "seq_len", "repeats", "threads", "warm")}
                            | {"ours": args.ours},
        "note": args.note,
        "baseline": base,
        "runs": [entry(d, "result") for d in args.runs] + [entry(d, "control") for d in args.control],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_tradeoff(report, args.plot)
    width = max(len(r["run"]) for r in report["runs"]) + 2
    print(f"{'run':<{width}}{'sizes':>12}{'compr':>8}{'test':>8}{'d%':>7}{'stack us':>10}{'vs ORT':>8}{'model us':>10}")
    nan = float("nan")
    base_stack, base_model = (ours(latency["baseline"], part, args.ours) or nan for part in ("lstm", "model"))
    print(f"{'baseline':<{width}}{str(base['hidden_sizes']):>12}{1:>8.2f}{base['test_ppl']:>8.2f}{0:>7.1f}"
          f"{base_stack:>10.1f}{'':>8}{base_model:>10.1f}")
    for r in report["runs"]:
        own = r["latency_us_per_step"]
        print(f"{r['run']:<{width}}{str(r['hidden_sizes']):>12}{r['lstm_compression']:>8.2f}{r['test_ppl']:>8.2f}"
              f"{r['test_ppl_change_percent']:>7.1f}{ours(own, 'lstm', args.ours) or nan:>10.1f}"
              f"{r.get('lstm_speedup_vs_dense_onnxruntime', nan):>8.2f}{ours(own, 'model', args.ours) or nan:>10.1f}")
    print(f"dense baseline stack on ONNX Runtime: {dense_ort or nan:.1f} us/step; whole model "
          f"{latency['baseline']['model'].get('onnxruntime', nan):.1f}")


if __name__ == "__main__":
    main()
