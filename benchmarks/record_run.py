"""Copy a finished run's metrics into ``results/`` with the machine it ran on.

    python benchmarks/record_run.py runs/ptb-small results/ptb-small-baseline.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from leanlstm.tasks import get_task


def machine() -> dict:
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "git": git_commit()}


def command_line() -> str:
    """This process's command as typed: the thread and BLAS settings that change timings, then python and argv."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
           if k in os.environ]
    return shlex.join(env + ["python"] + sys.argv)


def git_commit() -> str:
    """The commit of the checkout these scripts live in (whatever the working directory), with ``+dirty`` when
    tracked files differ from it ("unknown" outside git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def dropout_of(run_dir: Path, metrics: dict) -> dict:
    """The run's dropout mode and rate (``config.json``, else its preset's), and for a run that trains with a
    structured mode and compresses nothing, a method name that says so instead of "baseline"."""
    config = json.loads((run_dir / "config.json").read_text())
    mode = config.get("dropout_mode") or "standard"
    rate = config.get("dropout")
    if rate is None:
        rate = getattr(get_task(config["task"]).preset(config["preset"]).model, "dropout", None)
    out = {"dropout_mode": mode, "dropout": rate}
    if mode != "standard" and metrics.get("method") == "baseline":
        out["method"] = f"{mode} dropout (training)"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--note", default="", help="anything a reader must know (e.g. a loaded machine)")
    args = parser.parse_args()
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    metrics |= dropout_of(args.run_dir, metrics)
    metrics["machine"] = machine()
    if args.note:
        metrics["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
