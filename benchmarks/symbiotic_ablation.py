"""Hardware-guided against size-only sizing (``Symbiotic(sizing=...)``) at one latency budget per backend: each
run's test WER beside its LSTM stack's latency per step on the backend it was designed for.

    OMP_NUM_THREADS=1 python benchmarks/symbiotic_ablation.py --out results/symbiotic-ablation.json \
        [--baseline runs/digits-medium] [--repeats 30] [RUN_DIR ...]

Without RUN_DIRs, the digits runs of ``DEFAULT_RUNS`` (relative to the working directory). Every run must have
finished (``metrics.json``). The final models' LSTM stacks are timed as symbiotic's ``finalize`` times them: each
stack alone, batch 1, ``seq_len``-step sequences (the run's), one thread, the median of ``--repeats`` sequences,
summed over stacks; each on its run's backend, and the dense baseline's stacks on every backend used, all in one
interleaved run. Test WERs are evaluated now with ``leanlstm.runs.evaluate_run`` (what ``leanlstm eval`` reports;
a run's ``metrics.json`` number is kept beside it as ``test_wer_recorded``). ``predicted_us`` is the latency model's
(the profile's) prediction of the design, ``assumed_us`` what size-only sizing expected of it (sparsity saving in
proportion to size), ``measured_at_finalize_us`` the run's own measurement when training ended (a busier machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line, machine  # noqa: E402

from leanlstm.graph import find_lstms  # noqa: E402
from leanlstm.runs import evaluate_run, load_run, read_config, read_metrics  # noqa: E402
from leanlstm.runtime.latency import load_now, measure  # noqa: E402

DEFAULT_RUNS = ("runs/digits-medium-symbiotic-12us", "runs/digits-medium-symbiotic-size-12us",
                "runs/digits-medium-symbiotic-torch-30us", "runs/digits-medium-symbiotic-size-torch-30us",
                "runs/digits-medium-symbiotic-size-dense-torch-30us")


def stacks(model) -> dict[str, object]:
    """The model's LSTM stacks, copied for timing as ``Symbiotic.finalize`` times them."""
    return {name or "(model)": copy.deepcopy(lstm).cpu().eval() for name, lstm in find_lstms(model)}


def run_info(run_dir: Path) -> dict:
    if not (run_dir / "metrics.json").is_file():
        raise SystemExit(f"{run_dir} has not finished (no metrics.json): finish it with the same `leanlstm compress "
                         f"...` command and --resume")
    config, metrics = read_config(run_dir), read_metrics(run_dir, ("test_wer", "symbiotic_widths"))
    options = config.method_config
    if config.method != "symbiotic":
        raise SystemExit(f"{run_dir} is a {config.method} run, not symbiotic")
    sizing, sparsity = options.get("sizing", "hardware"), options.get("sparsity", True)
    return {"run": str(run_dir), "method": f"symbiotic-{sizing}" + ("" if sparsity else "-dense"),
            "task": config.task, "sizing": sizing, "sparsity": sparsity, "backend": options["backend"],
            "budget_us": metrics["symbiotic_budget_us"], "seq_len": options.get("seq_len", 35),
            "widths": metrics["symbiotic_widths"], "densities": metrics["symbiotic_densities"],
            "lstm_params": metrics.get("lstm_params"), "predicted_us": metrics["symbiotic_predicted_us"],
            "assumed_us": metrics.get("symbiotic_assumed_us"),
            "measured_at_finalize_us": metrics.get("symbiotic_measured_us"), "test_wer_recorded": metrics["test_wer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished symbiotic run directories")
    parser.add_argument("--baseline", type=Path, default=Path("runs/digits-medium"), help="the dense run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    rows = [run_info(run_dir) for run_dir in args.runs or [Path(d) for d in DEFAULT_RUNS]]
    seq_lens = {row["seq_len"] for row in rows}
    if len(seq_lens) != 1:
        raise SystemExit(f"the runs were measured with different seq_len {sorted(seq_lens)}: compare like with like")

    baseline_wer = evaluate_run(args.baseline, ["test"])["test"]["wer"]
    for row in rows:
        row["test_wer"] = evaluate_run(row["run"], ["test"])["test"]["wer"]
        row["baseline_test_wer"] = baseline_wer

    models, backends = {}, {}
    for row in rows:
        for stack, module in stacks(load_run(row["run"])[1]).items():
            models[f"{row['run']}\0{stack}"] = module
            backends[f"{row['run']}\0{stack}"] = [row["backend"]]
    used = sorted({row["backend"] for row in rows})
    for stack, module in stacks(load_run(args.baseline)[1]).items():
        models[f"baseline\0{stack}"] = module
        backends[f"baseline\0{stack}"] = used
    busy_before = load_now()
    timing = measure(models, backends, seq_len=seq_lens.pop(), repeats=args.repeats, threads=args.threads)
    busy_after = load_now()

    def total(label: str, backend: str) -> float | None:
        """The summed stack medians of one run on one backend; None if a stack could not run there."""
        found = [m["backends"].get(backend) for key, m in timing["models"].items() if key.split("\0")[0] == label]
        return sum(stats["median"] for stats in found) if found and all(found) else None

    dense = {backend: total("baseline", backend) for backend in used}
    cpu = timing["machine"]["cpu"]
    for row in rows:
        row["measured_us"] = measured = total(row["run"], row["backend"])
        row["within_budget"] = measured is not None and measured <= row["budget_us"]
        row["baseline_measured_us"] = dense[row["backend"]]
        row["cpu"] = cpu
        errors = {key.split("\0")[1]: m["errors"] for key, m in timing["models"].items()
                  if key.split("\0")[0] == row["run"] and m["errors"]}
        if errors:
            row["latency_errors"] = errors

    report = {"command": command_line(), "machine": machine() | timing["machine"],
              "busy_before": busy_before, "busy_after": busy_after,
              "latency_settings": {k: timing[k] for k in ("unit", "batch", "seq_len", "repeats", "warmup", "threads")},
              "baseline": {"run": str(args.baseline), "test_wer": baseline_wer, "measured_us": dense,
                           "lstm_params": read_metrics(args.baseline).get("lstm_params")},
              "note": args.note, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    nan = float("nan")
    print(f"baseline {args.baseline}: test WER {100 * baseline_wer:.2f}%, dense stack "
          + ", ".join(f"{b} {t or nan:.2f} us" for b, t in dense.items()))
    print(f"{'run':52s}{'backend':>10}{'budget':>8}{'widths':>12}{'WER %':>7}{'assumed':>9}{'predicted':>10}"
          f"{'measured':>10}")
    for row in rows:
        widths = ",".join(str(w) for stack in row["widths"].values() for w in stack)
        assumed = row["assumed_us"] if row["assumed_us"] is not None else nan
        print(f"{row['run']:52s}{row['backend']:>10}{row['budget_us']:>8.1f}{widths:>12}{100 * row['test_wer']:>7.2f}"
              f"{assumed:>9.2f}{row['predicted_us']:>10.2f}{row['measured_us'] or nan:>10.2f}")


if __name__ == "__main__":
    main()
