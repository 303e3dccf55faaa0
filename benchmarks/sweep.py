"""Run a list of ``leanlstm`` commands, a few at a time, each on one thread (``--threads``); resumable.

    python benchmarks/sweep.py benchmarks/sweeps/ptb-small-doping.txt --runs runs --workers 2
    python benchmarks/sweep.py FIRST.txt SECOND.txt --runs runs --workers 2     # several files, as one list

The sweep file holds one ``leanlstm ...`` command per line (``#`` starts a comment) with ``{runs}`` standing
for the runs folder; each command must have ``--out``. A command whose ``--out`` already holds
``metrics.json`` is skipped, one with a checkpoint is resumed (``--resume`` added), so re-running the sweep
after an interruption finishes it. Every command runs with ``OMP_NUM_THREADS=1`` (``--threads``): on a 2-core
machine two one-thread runs finish sooner than two two-thread runs taking turns (two OpenMP threads stall when a
core is taken); a chain of commands that must run one after the other takes ``--workers 1 --threads 2``. Each
command's output goes to ``OUT.log`` beside its run directory. A command whose ``--from`` (or
``--hidden-sizes-from``, ``--distill-from``) run has not finished waits until it has (it may be an earlier line of
the same sweep, or a run training in another process). A command whose own ``--out`` is training in another process
(an earlier sweep's, say, when the list is run again in a new order) waits for it too, and is then skipped if that
process finished it or resumed if not: the same run is never trained twice at once. Until then it counts as one of
the ``--workers``. The files are read again at every pass (every few seconds): lines added, removed or moved take
effect for the commands the sweep has not started, so a running sweep can be reordered by editing its file.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def commands(sweep: Path, runs: str) -> list[list[str]]:
    out = []
    for number, line in enumerate(sweep.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        args = shlex.split(line.replace("{runs}", runs))
        if args[0] != "leanlstm" or "--out" not in args:
            raise SystemExit(f"{sweep}:{number}: expected a `leanlstm ... --out DIR` command, got {line!r}")
        out.append(args)
    return out


def pending(sweeps: list[Path], runs: str, done: set[tuple[str, ...]]) -> list[list[str]]:
    """The commands the sweep files list now, in order, less those this sweep has started or given up (``done``)
    and those whose runs have finished; a command listed twice is run once."""
    seen, out = set(done), []
    for command in (c for sweep in sweeps for c in commands(sweep, runs)):
        if tuple(command) not in seen and prepared(command) is not None:
            seen.add(tuple(command))
            out.append(command)
    return out


def prepared(args: list[str]) -> list[str] | None:
    """The command to run now: None when finished, with --resume when a checkpoint is there."""
    out = out_of(args)
    if (out / "metrics.json").is_file():
        return None
    if (out / "checkpoint.pt").is_file() and "--resume" not in args:
        return args + ["--resume"]
    return args


SOURCES = ("--from", "--hidden-sizes-from", "--distill-from")   # options naming a run the command builds on


def sources(args: list[str]) -> list[Path]:
    """The run directories a command builds on (``SOURCES``)."""
    return [Path(args[args.index(option) + 1]) for option in SOURCES if option in args]


def source_ready(args: list[str]) -> bool:
    """Runs a command builds on must have finished (``metrics.json``): compressing or distilling from a
    half-trained baseline, or copying the sizes of an ISS run still shrinking, would give normal-looking results of
    the wrong model."""
    return all((run / "metrics.json").is_file() for run in sources(args))


def out_of(args: list[str]) -> Path:
    """The command's run directory (``--out``)."""
    return Path(args[args.index("--out") + 1])


def training_now(args: list[str]) -> bool:
    """Whether the command's own run is training in another process now (it holds the run's lock)."""
    from leanlstm.runs import training_pid

    return training_pid(out_of(args)) is not None


def trained_elsewhere(args: list[str]) -> bool:
    """Whether a run the command builds on is training now in another process (one started by hand, or by another
    sweep): then the command waits for it instead of being given up."""
    from leanlstm.runs import training_pid

    return any(training_pid(run) is not None for run in sources(args))


def executable(args: list[str]) -> list[str]:
    """``leanlstm ...`` run as ``python -m leanlstm ...`` with the interpreter running the sweep: the sweep then
    works from a virtual environment that is not activated (``.venv/bin/python benchmarks/sweep.py``)."""
    return [sys.executable, "-m", "leanlstm", *args[1:]]


def log_path(args: list[str]) -> Path:
    """``OUT.log`` beside the run directory (``--out runs/x/`` too, not ``runs/x/.log`` inside it)."""
    out = out_of(args)
    return out.with_name(out.name + ".log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", type=Path, nargs="+", help="sweep files, run as one list in the order given")
    parser.add_argument("--runs", default="runs", help="folder that {runs} stands for")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per command (keep workers x threads within the cores: 1 x 2 on two cores)")
    options = parser.parse_args()
    done: set[tuple[str, ...]] = set()          # commands started or given up by this sweep: never again
    queue = pending(options.sweeps, options.runs, done)      # prepared again when started: others may train
    threads = str(options.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running: list[tuple[subprocess.Popen, list[str], float]] = []
    failed, unread = 0, None
    while queue or running:
        while True:
            busy = list(map(training_now, queue))    # the list's runs another process trains: each uses a core
            if len(running) + sum(busy) >= options.workers:
                break
            ready = next((i for i, c in enumerate(queue) if not busy[i] and source_ready(c)), None)
            if ready is None:                                                 # in order, once ready
                break
            listed_args = queue.pop(ready)
            done.add(tuple(listed_args))
            args = prepared(listed_args)
            if args is None:
                print(f"finished by another process: {shlex.join(listed_args)}", flush=True)
                continue
            log = log_path(args)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"start: {shlex.join(args)}", flush=True)
            with log.open("a") as handle:
                process = subprocess.Popen(executable(args) + ["--no-progress"], stdout=handle,
                                           stderr=subprocess.STDOUT, env=env)
            running.append((process, args, time.time()))
        time.sleep(5)
        for entry in list(running):
            process, args, started = entry
            if process.poll() is not None:
                running.remove(entry)
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                failed += process.returncode != 0
                print(f"{status} in {(time.time() - started) / 60:.1f} min: {shlex.join(args)}", flush=True)
        try:                                    # the files as they are now: edits reorder what has not started
            fresh = pending(options.sweeps, options.runs, done)
        except (SystemExit, OSError) as error:
            if str(error) != unread:
                print(f"sweep files not read again ({error}); the list stays as it was", flush=True)
            unread = str(error)
        else:
            for args in queue:
                if args not in fresh and prepared(args) is None:
                    print(f"finished by another process: {shlex.join(args)}", flush=True)
            queue, unread = fresh, None
        # nothing here, and no other process, will finish the runs they start from
        if queue and not running and not any(map(source_ready, queue)) and not any(map(trained_elsewhere, queue)):
            for args in queue:
                print(f"NOT STARTED, the run it starts from is unfinished: {shlex.join(args)}", flush=True)
                done.add(tuple(args))
            failed += len(queue)
            queue = []
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
