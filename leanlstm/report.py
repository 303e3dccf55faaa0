"""Figures drawn from runs' metrics, and the comparison report of `leanlstm report` (HTML and Markdown)."""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods.doping import DopingConfig

log = logging.getLogger(__name__)
DOPING_SHARE = DopingConfig.doping_share   # runs without the setting (older ones) used the default


def plot_components(metrics: str | Path | dict[str, Any], out_png: str | Path) -> Path:
    """Surviving ISS components (hidden units) per layer over training, from ``metrics.json`` or its dict.

    >>> plot_components({"iss_components": [{"phase": "compress", "epoch": 0, "components": [8, 8]},
    ...                                     {"phase": "compress", "epoch": 1, "components": [5, 7]}]},
    ...                 "/tmp/components.png").name
    'components.png'
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    if not isinstance(metrics, dict):
        metrics = json.loads(Path(metrics).read_text())
    entries = metrics.get("iss_components")
    if not entries:
        raise ValueError("these metrics hold no 'iss_components'; was the run made with --method iss?")
    steps = range(len(entries))
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for layer in range(len(entries[0]["components"])):
        ax.plot(steps, [e["components"][layer] for e in entries], marker="o", ms=3, label=f"layer {layer}")
    phases = [e["phase"] for e in entries]
    for index in range(1, len(entries)):
        if phases[index] != phases[index - 1]:
            ax.axvline(index - 0.5, color="grey", ls="--", lw=1, label=f"{phases[index]} starts")
    ax.set(xlabel="epoch (all phases in order)", ylabel="surviving components (hidden units)",
           title="ISS: surviving components per layer", ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return Path(out_png)


def method_label(run: dict[str, Any]) -> str:
    """A run's line in a comparison: its method, marked when it trained from scratch (not from a trained
    model: another schedule, so another line), when an ablation switched co-matrix dropout off, when a doped
    run gave ``D`` another share of the budget, and when it was distilled from a teacher.

    >>> method_label({"method": "iss", "source": None}), method_label({"method": "iss", "source": "runs/base"})
    ('iss (from scratch)', 'iss')
    """
    label = run.get("method", "?")
    if run.get("role") == "control":  # a plain training run is the direct design of the same sizes
        return "direct design (control)" if label == "baseline" else f"{label} (control)"
    if "source" in run and run["source"] is None:
        label += " (from scratch)"
    config = run.get("method_config") or {}
    if config.get("cmr") == 0:
        label += " (no CMR)"
    if config.get("doping_share", DOPING_SHARE) != DOPING_SHARE:   # another split of the budget: another line
        label += f" (doping share {config['doping_share']:g})"
    if run.get("distilled_from"):
        label += " (distilled)"
    return label


def plot_tradeoff(report: str | Path | dict[str, Any], out_png: str | Path, metric: str | None = None) -> Path:
    """The task's test metric against LSTM compression, one line per method, the dense baseline as a dashed line.

    ``report`` is what ``benchmarks/compression_results.py`` writes (its JSON file or dict): ``baseline`` and
    ``runs``, each with ``lstm_compression`` and ``test_<metric>``. ``metric`` defaults to the report's
    ``metric``, else the baseline's one ``test_<metric>`` other than ``test_loss``.

    >>> plot_tradeoff({"baseline": {"test_wer": 4.0}, "runs": [
    ...     {"method": "prune", "lstm_compression": 10.0, "test_wer": 4.2},
    ...     {"method": "prune", "lstm_compression": 20.0, "test_wer": 5.1}]}, "/tmp/tradeoff.png").name
    'tradeoff.png'
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    metric = metric or report.get("metric") or _test_metric(report["baseline"])
    key, label = f"test_{metric}", metric_label(metric)
    lines: dict[str, list[tuple[float, float]]] = {}
    for run in report["runs"]:
        lines.setdefault(method_label(run), []).append((run["lstm_compression"], run[key]))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, points in sorted(lines.items()):
        points.sort()
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(report["baseline"][key], color="grey", ls="--", lw=1, label="dense baseline")
    factors = [x for points in lines.values() for x, _ in points]
    if factors and max(factors) / min(factors) < 2:  # one target factor: a log axis would zoom into rounding
        ax.set_xlim(min(factors) / 1.5, max(factors) * 1.5)
    ax.set(xscale="log", xlabel="LSTM compression (dense bytes / stored bytes incl. indices)",
           ylabel=f"test {label}", title=f"{label[:1].upper()}{label[1:]} against compression")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # after set_xscale, which installs its own formatters
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return Path(out_png)


def _test_metric(baseline: dict[str, Any]) -> str:
    """The metric of a run summary that names none: its only ``test_<metric>`` besides ``test_loss``."""
    found = [k[len("test_"):] for k, v in baseline.items()
             if k.startswith("test_") and k != "test_loss" and isinstance(v, (int, float))]
    if len(found) != 1:
        raise ValueError(f"cannot tell the metric from the baseline's keys ({', '.join(sorted(baseline))}): pass "
                         f"metric= or add 'metric' to the report")
    return found[0]


def metric_label(metric: str) -> str:
    """Words for a metric in plots: the label of a registered task whose metric it is, else the metric's name.

    >>> metric_label("wer-doc")
    'wer-doc'
    """
    from .tasks import TASKS

    labels = [task.metric_label for task in TASKS.values() if task.metric == metric and task.metric_label]
    return labels[0] if labels else metric


# --- the comparison report: `leanlstm report` ---------------------------------------------------------------------
# A page per set of runs: per task, a table of every run, Pareto plots and training curves. Rows come from run
# directories (their metrics.json; latency measured here, all runs of a task in one interleaved run) or from the
# result files benchmarks/ writes (numbers as recorded there). Latencies depend on the machine (batch-1 latency on
# one CPU kind can be twice another's): each carries the CPU it was measured on, latencies are shown per task and
# machine, and a speed-up divides only latencies of one measurement (one results file, one run's record, or this
# report's interleaved run), never two machines'.

OURS = "leanlstm"                  # the backend the speed-ups are of; the others are its peers
FLOAT_BYTES = 4                    # stored parameters count float32 equivalents (sparse indices included)
GENERATOR = "leanlstm report"      # report.json's mark: its folder's files may be replaced by a new report
PARTS = ("lstm", "model")          # latency of the LSTM stacks alone, or of the whole model
UNRECORDED = "unrecorded machine"  # the machine of latencies recorded without one: never compared across rows


@dataclass
class Timing:
    """Latencies of one measurement, all on one machine: a results file, a run's own record, or this report's
    interleaved run. Latencies of two timings are never divided by one another (unless their sessions match)."""

    machine: str                                 # the CPU's model name as recorded, or ``UNRECORDED``
    session: str                                 # latencies of one session were measured in one interleaved run
    latency: dict[str, dict[str, float]]         # part -> backend -> us/step
    baseline_latency: dict[str, dict[str, float]] = field(default_factory=dict)   # the dense one's, same session


@dataclass
class Row:
    """One model of the report, from a run directory or a results file."""

    name: str                                    # the run directory, as given or as recorded
    task: str
    method: str                                  # ``method_label``: ablations, controls, distillation marked
    preset: str | None = None
    metric: float | None = None                  # the task's test metric
    baseline_metric: float | None = None         # the dense model's, as recorded with the run or found here
    lstm_params: int | None = None               # stored float32 words (bytes / 4), indices included
    total_params: int | None = None
    timings: list[Timing] = field(default_factory=list)   # at most one per machine, the first read of each
    command: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None        # the run it was compressed from
    origins: list[str] = field(default_factory=list)      # the run directory or results files it was read from
    is_baseline: bool = False
    label: str = ""                  # the name shown: ``name``, or more where two rows share it
    errors: dict[str, str] = field(default_factory=dict)  # backends that could not run it

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def latency(self) -> dict[str, dict[str, float]]:
        """The latencies of the first machine it was timed on (``{}`` if none)."""
        return self.timings[0].latency if self.timings else {}

    @property
    def machines(self) -> list[str]:
        return [t.machine for t in self.timings]

    def timing(self, machine: str | None = None) -> Timing | None:
        """Its timing on ``machine`` (default: the first one), or ``None``."""
        return next((t for t in self.timings if machine is None or t.machine == machine), None)


def _timings(latency: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], machine: str | None,
             session: str) -> list[Timing]:
    return [Timing(machine or UNRECORDED, session, latency, baseline)] if latency else []


def cpu_of(*machines: Any) -> str | None:
    """The CPU of the first recorded machine (``machine_info``'s or ``benchmarks/``' dict) that names one.

    >>> cpu_of(None, "x86_64", {"cpu": " AMD EPYC ", "cpus": 2})
    'AMD EPYC'
    """
    for machine in machines:
        if isinstance(machine, dict) and isinstance(machine.get("cpu"), str) and machine["cpu"].strip():
            return machine["cpu"].strip()
    return None


def row_from_run(run_dir: str | Path) -> Row:
    """A run directory's row: its config and, once finished, its ``metrics.json`` (an unfinished run has no test
    metric yet, and its curves come from its checkpoint)."""
    from .runs import METRICS, read_config, read_metrics, run_progress
    from .tasks import get_task

    run = read_config(run_dir)
    metric = get_task(run.task).metric
    metrics = read_metrics(run_dir) if (Path(run_dir) / METRICS).is_file() else {}
    recorded = metrics.get("latency_us_per_step") or {}   # compress: the result and its baseline, one session
    machine = cpu_of((metrics.get("latency_settings") or {}).get("machine"), metrics.get("machine"))
    described = {"method": run.method, "method_config": run.method_config, "distilled_from": run.distill_from}
    if run.method != "baseline":
        described["source"] = run.source
    return Row(name=str(run_dir), task=run.task, method=method_label(described), preset=run.preset,
               metric=metrics.get(f"test_{metric}"), baseline_metric=metrics.get(f"baseline_test_{metric}"),
               lstm_params=metrics.get("lstm_params"), total_params=metrics.get("total_params"),
               timings=_timings(recorded.get("compressed", {}), recorded.get("baseline", {}), machine,
                                f"{run_dir} (recorded)"), command=run.command,
               history=metrics.get("history") or run_progress(run_dir)["history"], source=run.source,
               origins=[str(run_dir)], is_baseline=run.method == "baseline")


def rows_from_results(path: str | Path) -> tuple[list[Row], str | None]:
    """The rows of a results file (``results/*.json``), with why there are none when there are none.

    Three shapes hold rows: a comparison (``baseline`` and ``runs``, as ``benchmarks/compression_results.py``
    writes), a table (``rows``, each with its ``method`` and ``task``) and one run's ``metrics.json``. A row is an
    entry with a ``method`` and the test metric of a registered task (its ``task``, else the first registered task
    whose metric it holds); anything else (timings, sizes) is not a row.
    """
    from .files import read_json
    from .tasks import get_task

    data = read_json(path, "pass a results file written by leanlstm or benchmarks/")
    if isinstance(data, dict) and isinstance(data.get("runs"), list) and isinstance(data.get("baseline"), dict):
        entries = [{**data["baseline"], "method": "baseline"}, *data["runs"]]
    elif isinstance(data, dict) and isinstance(data.get("rows"), list):
        entries = data["rows"]
    elif isinstance(data, list):
        entries = data
    else:
        entries = [data]
    context = data if isinstance(data, dict) else {}
    rows = [row for index, entry in enumerate(entries) if isinstance(entry, dict)
            if (row := _row_from_entry(entry, context, Path(path), index)) is not None]
    if rows:
        return rows, None
    keys = ", ".join(sorted({f"test_{get_task(name).metric}" for name in _task_names()}))
    return [], f"no runs in it: no entry has a 'method' and a test metric of a registered task ({keys})"


def _row_from_entry(entry: dict[str, Any], context: dict[str, Any], path: Path, index: int) -> Row | None:
    from .tasks import get_task

    task_name = entry.get("task") or context.get("task") or _task_of(entry)
    if not isinstance(entry.get("method"), str) or task_name is None:
        return None
    metric = get_task(task_name).metric
    value = entry.get(f"test_{metric}")
    if not _is_number(value):
        return None
    recorded = entry.get("latency_us_per_step") or entry.get("us_per_step")
    if isinstance(recorded, dict) and "compressed" in recorded:     # one run's metrics.json: it and its baseline
        latency, dense = _latency_parts(recorded["compressed"]), _latency_parts(recorded.get("baseline"))
    else:
        latency, dense = _latency_parts(recorded), _latency_parts(entry.get("baseline_latency_us_per_step"))
    settings = [entry.get("latency_settings"), context.get("latency_settings")]
    machine = cpu_of(*[s.get("machine") for s in settings if isinstance(s, dict)], entry.get("machine"),
                     context.get("machine"))        # where the latencies were measured, else where it was recorded
    baseline = entry.get("baseline_test_" + metric)
    return Row(name=entry.get("run") or _out_option(entry.get("command")) or f"{path.stem}[{index}]",
               task=task_name, method=method_label(entry), preset=entry.get("preset") or context.get("preset"),
               metric=float(value), baseline_metric=float(baseline) if _is_number(baseline) else None,
               lstm_params=entry.get("lstm_params"), total_params=entry.get("total_params"),
               timings=_timings(latency, dense, machine, str(path)), command=entry.get("command") or "",
               history=entry.get("history") or [], source=entry.get("source"),
               origins=[str(path)], is_baseline=entry["method"] == "baseline" and entry.get("role") != "control")


def _task_of(entry: dict[str, Any]) -> str | None:
    """The first registered task whose test metric ``entry`` holds (and whose presets hold its preset, if any)."""
    from .tasks import get_task

    for name in _task_names():
        task = get_task(name)
        if _is_number(entry.get(f"test_{task.metric}")) and entry.get("preset") in (None, *task.presets):
            return name
    return None


def _task_names() -> list[str]:
    """Built-in tasks first, in their order (ptb before text: both measure perplexity), then any registered."""
    from .tasks import BUILTIN_TASKS, TASKS

    return list(dict.fromkeys([*BUILTIN_TASKS, *TASKS]))


def _latency_parts(recorded: Any) -> dict[str, dict[str, float]]:
    """``{part: {backend: us}}`` from a recorded latency: already by part, or one flat ``{backend: us}`` of the
    whole model (as the spoken-digit results record the recogniser).

    >>> _latency_parts({"leanlstm": 3.0, "onnxruntime": 4.5})
    {'model': {'leanlstm': 3.0, 'onnxruntime': 4.5}}
    """
    if not isinstance(recorded, dict) or not recorded:
        return {}
    if all(_is_number(v) for v in recorded.values()):
        return {"model": {k: float(v) for k, v in recorded.items()}}
    return {part: {k: float(v) for k, v in values.items() if _is_number(v)}
            for part, values in recorded.items() if part in PARTS and isinstance(values, dict)}


def _out_option(command: Any) -> str | None:
    """The ``--out`` of a recorded command: the run directory it wrote.

    >>> _out_option("leanlstm train --preset small --out runs/ptb-small --no-progress")
    'runs/ptb-small'
    """
    if not isinstance(command, str):
        return None
    words = command.split()
    return words[words.index("--out") + 1] if "--out" in words[:-1] else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def same_run(a: str | None, b: str | None) -> bool:
    """Whether two recorded run directories are one: equal, or one a path suffix of the other.

    >>> same_run("/work/runs/ptb-small", "runs/ptb-small"), same_run("runs/ptb-small", "runs/small")
    (True, False)
    """
    if not a or not b:
        return False
    x, y = Path(os.path.normpath(a)).parts, Path(os.path.normpath(b)).parts
    n = min(len(x), len(y))
    return x[-n:] == y[-n:]


def merge_rows(rows: list[Row]) -> list[Row]:
    """One row per run: rows of the same run with the same result (read from several results files, say) are
    merged, each filling what the first lacks (latencies: the first timing on each machine); the same run with
    other results keeps its rows, labelled with their file."""
    merged: list[Row] = []
    for row in rows:
        twin = next((m for m in merged if m.task == row.task and same_run(m.name, row.name)
                     and _close(m.metric, row.metric)), None)
        if twin is None:
            if any(m.task == row.task and Path(m.name).name == Path(row.name).name for m in merged):
                row.label = f"{row.name} ({Path(row.origins[0]).name})"
            merged.append(row)
            continue
        for name in ("preset", "baseline_metric", "lstm_params", "total_params", "command", "source"):
            if getattr(twin, name) in (None, ""):
                setattr(twin, name, getattr(row, name))
        timed = set(twin.machines)           # a machine's first timing of the run; each machine keeps its own
        twin.timings += [timing for timing in row.timings if timing.machine not in timed]
        twin.history = twin.history or row.history
        twin.origins += row.origins
    return merged


def _close(a: float | None, b: float | None) -> bool:
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-9)


def baseline_of(row: Row, rows: list[Row]) -> Row | None:
    """The dense model ``row`` compares with: a baseline read from the same file, else the run it was compressed
    from, else the only baseline of its task and preset. Where several fit, the one whose result the row recorded
    as its baseline's."""
    if row.is_baseline:
        return row
    candidates = [b for b in rows if b.is_baseline and b.task == row.task]
    rules = ((lambda b: bool(set(b.origins) & set(row.origins)), False),
             (lambda b: same_run(b.name, row.source), False),
             (lambda b: b.preset == row.preset, True))       # by preset alone: only when one fits
    for rule, unique in rules:
        found = [b for b in candidates if rule(b)]
        if row.baseline_metric is not None and len(found) > 1:
            found = [b for b in found if _close(b.metric, row.baseline_metric)] or found
        if found and (len(found) == 1 or not unique):
            return found[0]
    return None


def collect(inputs: list[str | Path]) -> tuple[list[Row], list[dict[str, str]]]:
    """The rows of run directories and results files, merged, and the inputs skipped with why. A compressed run
    whose ``--from`` run exists but is not among ``inputs`` brings it along, as its baseline."""
    from .runs import read_config

    rows, skipped, seen = [], [], set()
    queue = [Path(p) for p in inputs]
    while queue:
        path = queue.pop(0)
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        if path.is_dir():
            rows.append(row_from_run(path))
            source = read_config(path).source
            if source and Path(source).is_dir() and os.path.realpath(source) not in seen | _pending(queue):
                log.info("adding %s, the run %s was compressed from, as its baseline", source, path)
                queue.append(Path(source))
        elif path.is_file():
            found, reason = rows_from_results(path)
            rows += found
            if reason:
                log.warning("skipped %s: %s", path, reason)
                skipped.append({"input": str(path), "reason": reason})
        else:
            raise FileNotFoundError(f"{path} does not exist: pass run directories or results files")
    return merge_rows(rows), skipped


def _pending(queue: list[Path]) -> set[str]:
    return {os.path.realpath(p) for p in queue}


def measure_rows(rows: list[Row], backends: tuple[str, ...], repeats: int = 5, seq_len: int = 35,
                 threads: int = 1) -> dict[str, Any]:
    """Batch-1 latency of every run directory's model, per task in one interleaved run (all models, backends and
    parts take turns) on this machine, replacing what the runs recorded; returns the settings, this machine's
    CPU among them. Results files keep theirs."""
    from .checkpoint import CheckpointError
    from .runs import RunDirError, load_run
    from .runtime.latency import machine_info, medians, stack_and_model

    machine = machine_info()
    here = cpu_of(machine) or "this machine"
    for task in dict.fromkeys(row.task for row in rows):
        models = {}
        for row in rows:
            if row.task == task and Path(row.origins[0]).is_dir():
                try:
                    models[row.name] = load_run(row.origins[0])[1]
                except (RunDirError, CheckpointError, FileNotFoundError) as error:
                    row.errors["load"] = str(error)
        if not models:
            continue
        log.info("timing %d %s model(s) on %s, %d repeats", len(models), task, ", ".join(backends), repeats)
        result = stack_and_model(models, backends, seq_len=seq_len, repeats=repeats, threads=threads)
        for row in rows:
            if row.name in models:
                measured = result["models"][row.name]
                latency = {part: medians(measured[part]) for part in PARTS if measured[part]}
                row.timings = _timings(latency, {}, here, f"measured: {task}")
                row.errors |= measured["errors"]
    return {"seq_len": seq_len, "repeats": repeats, "threads": threads, "backends": list(backends),
            "machine": {"cpu": here} | {k: machine[k] for k in ("cpus", "load_average") if k in machine}}


def row_numbers(row: Row, base: Row | None, part: str = "lstm", machine: str | None = None) -> dict[str, Any]:
    """What the report shows of ``row``: sizes, the metric and its change from the dense baseline ``base``, and of
    its timing on ``machine`` (default: the first machine it was timed on) the latency per backend of ``part``
    (the other part where only that one was measured) and two speed-ups of ``leanlstm`` on this model: over the
    dense baseline on its fastest backend, and over the fastest other backend on this same model. A speed-up
    divides only latencies of one measurement: the baseline's as the row recorded it, or the baseline row's own
    when both come from the same session (so never across machines); else it is ``None``."""
    timing = row.timing(machine)
    latency, used = _part(timing.latency if timing else {}, part)
    dense: dict[str, dict[str, float]] = {}
    if timing is not None:
        theirs = base.timing(timing.machine) if base is not None else None
        dense = timing.baseline_latency or (theirs.latency if theirs and theirs.session == timing.session else {})
    dense_part = dense.get(used, {})
    ours = latency.get(OURS)
    peers = [us for name, us in latency.items() if not name.startswith(OURS)]
    return {**_accuracy(row, base), "machine": timing.machine if timing else None,
            "session": timing.session if timing else None, "latency_part": used, "latency_us": latency,
            "dense_latency_us": dense_part,
            "speedup_vs_dense": min(dense_part.values()) / ours if ours and dense_part else None,
            "speedup_vs_peer": min(peers) / ours if ours and peers else None}


def _accuracy(row: Row, base: Row | None) -> dict[str, Any]:
    """What the report shows of ``row`` whatever the machine: sizes, the metric and its change from ``base``'s."""
    reference = row.baseline_metric if row.baseline_metric is not None else (base.metric if base else None)
    change = row.metric - reference if row.metric is not None and reference is not None else None
    return {"run": row.label, "method": row.method, "preset": row.preset, "is_baseline": row.is_baseline,
            "lstm_params": row.lstm_params, "total_params": row.total_params,
            "bytes": FLOAT_BYTES * row.total_params if row.total_params else None,
            "lstm_bytes": FLOAT_BYTES * row.lstm_params if row.lstm_params else None,
            "metric": row.metric, "baseline_metric": reference, "change": change,
            "change_percent": 100 * change / reference if change is not None and reference else None,
            "machines": row.machines, "baseline": base.label if base is not None else None,
            "command": row.command, "history": row.history, "errors": row.errors, "origins": row.origins}


def _part(latency: dict[str, dict[str, float]], part: str) -> tuple[dict[str, float], str]:
    if latency.get(part):
        return latency[part], part
    other = next((p for p in PARTS if latency.get(p)), part)
    return latency.get(other, {}), other


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[tuple[float, float]]:
    """The points no other point beats on both axes, by ``x`` (smaller is better: latency, bytes); ``y`` is better
    higher or lower as ``higher_is_better`` says.

    >>> pareto_front([(1, 5), (2, 4), (3, 6), (4, 3), (4, 2)])
    [(1, 5), (2, 4), (4, 2)]
    """
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return front


PEER_MARKERS = ("s", "D", "^", "v", "P", "X")
SERIES_MARKERS = ("o", "v", "^", "<", ">", "p", "h", "d")


def plot_pareto(rows: list[dict[str, Any]], axis: str, metric: str, higher_is_better: bool = False,
                machine: str | None = None) -> bytes | None:
    """PNG of a task's test metric against ``axis`` (``"latency"``: leanlstm's us per step; ``"bytes"``: the LSTM
    stacks' stored bytes), one series per method, dense baselines as stars and, on the latency plot, the dense
    baselines on the peer backends; the Pareto front dashed. ``rows`` are ``row_numbers`` dicts; ``None`` when no
    row has both numbers. Latencies of one plot are of one ``machine``, which its title names.

    >>> rows = [{"method": "baseline", "is_baseline": True, "metric": 112.0, "lstm_bytes": 2_572_800,
    ...          "latency_us": {"leanlstm": 24.0, "onnxruntime": 22.0}},
    ...         {"method": "prune", "is_baseline": False, "metric": 118.0, "lstm_bytes": 140_000,
    ...          "latency_us": {"leanlstm": 9.0}}]
    >>> plot_pareto(rows, "latency", "ppl")[:4], plot_pareto(rows[:0], "bytes", "ppl")
    (b'\\x89PNG', None)
    """
    from matplotlib.figure import Figure

    def x_of(row: dict[str, Any]) -> float | None:
        return row["latency_us"].get(OURS) if axis == "latency" else row["lstm_bytes"]

    drawn = [row for row in rows if row["metric"] is not None and x_of(row)]
    if not drawn:
        return None
    fig = Figure(figsize=(9.5, 4.8))
    ax = fig.subplots()
    series: dict[str, list[tuple[float, float]]] = {}
    for row in drawn:
        if not row["is_baseline"]:
            series.setdefault(row["method"], []).append((x_of(row), row["metric"]))
    _colours(ax, len(series))
    for index, (method, points) in enumerate(sorted(series.items())):
        # points only: a method's runs differ in more than one knob; shapes too, as colours repeat in shades
        ax.plot(*zip(*sorted(points)), marker=SERIES_MARKERS[index % len(SERIES_MARKERS)], ls="none", label=method)
    bases = [row for row in drawn if row["is_baseline"]]
    points = [p for ps in series.values() for p in ps] + [(x_of(b), b["metric"]) for b in bases]
    if bases:
        ax.scatter([x_of(b) for b in bases], [b["metric"] for b in bases], marker="*", s=180, color="black",
                   zorder=5, label="dense baseline" + (f" ({OURS})" if axis == "latency" else ""))
        for base in bases:      # several baselines (presets, precisions): say which is which
            ax.annotate(base.get("preset") or Path(base.get("run", "")).name, (x_of(base), base["metric"]),
                        xytext=(4, 6), textcoords="offset points", fontsize=7)
    if axis == "latency":
        points += _plot_peers(ax, bases)
    front = pareto_front(points, higher_is_better)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", ls="--", lw=1, zorder=1, label="Pareto front")
    xs = [x for x, _ in points]
    if max(xs) / min(xs) > 4:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_xscale("log")
        if axis == "latency":     # µs as plain numbers, not 6×10^1; some minor ticks named where decades are few
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.4)))
    label = metric_label(metric)
    where = f" {_on(machine)}" if machine else ""
    ax.set(xlabel=f"{OURS} us per time step, batch 1, measured{where}" if axis == "latency" else
           "LSTM stack bytes (stored, sparse indices included)",
           ylabel=f"test {label} ({'higher' if higher_is_better else 'lower'} is better)",
           title=f"{label[:1].upper()}{label[1:]} against {'latency' + where if axis == 'latency' else 'size'}")
    _legend_outside(ax)
    fig.tight_layout()
    return _png(fig)


def _colours(ax, lines: int) -> None:
    """Twenty colours where the default ten would repeat (two methods in one colour read as one)."""
    if lines > 10:
        from matplotlib import colormaps

        ax.set_prop_cycle(color=colormaps["tab20"].colors)


def _legend_outside(ax) -> None:
    """The legend right of the axes: with a series per method it would hide points inside them."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plot_peers(ax, bases: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The dense baselines on each peer backend: the speed a user gets without compressing."""
    peers = sorted({name for b in bases for name in b["latency_us"] if not name.startswith(OURS)})
    points = []
    for name, marker in zip(peers, PEER_MARKERS):
        xy = [(b["latency_us"][name], b["metric"]) for b in bases if name in b["latency_us"]]
        ax.scatter(*zip(*xy), marker=marker, s=50, facecolors="none", edgecolors="black", zorder=4,
                   label=f"dense baseline on {name}")
        points += xy
    return points


def plot_curves(rows: list[dict[str, Any]], metric: str) -> bytes | None:
    """PNG of each run's validation metric per epoch, all phases in order (compression, then fine-tuning);
    ``None`` when no run recorded a history."""
    from matplotlib.figure import Figure

    key = f"val_{metric}"
    curves = {row["run"]: [h[key] for h in row["history"] if _is_number(h.get(key))] for row in rows}
    curves = {run: values for run, values in curves.items() if values}
    if not curves:
        return None
    fig = Figure(figsize=(9.5, 4.8))
    ax = fig.subplots()
    _colours(ax, len(curves))
    for run, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=2, lw=1, label=Path(run).name)
    values = [v for vs in curves.values() for v in vs]
    if min(values) > 0 and max(values) / min(values) > 5:    # early epochs far above the rest: see both
        ax.set_yscale("log")
    label = metric_label(metric)
    ax.set(xlabel="epoch (all phases in order)", ylabel=f"validation {label}", title="Training curves")
    _legend_outside(ax)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as a 256-colour PNG: a third of the full-colour file, so a page of plots stays small."""
    import io

    from PIL import Image     # matplotlib's own dependency

    drawn, small = io.BytesIO(), io.BytesIO()
    fig.savefig(drawn, format="png", dpi=100)
    Image.open(drawn).convert("RGB").quantize(256).save(small, format="PNG", optimize=True)
    return small.getvalue()


def build_report(inputs: list[str | Path], out: str | Path, measure: bool = True,
                 backends: tuple[str, ...] = ("leanlstm", "torch", "onnxruntime", "torch-int8"), repeats: int = 5,
                 seq_len: int = 35, threads: int = 1, part: str = "lstm") -> dict[str, Any]:
    """Write the report of run directories and results files into ``out``: ``index.html`` (self-contained: the
    plots are data: URIs), ``report.md`` with its PNGs beside it, and ``report.json`` (every number shown).

    ``measure``: time the run directories' models now (per task, one interleaved run of ``repeats`` sequences of
    ``seq_len`` steps per model, part and backend); else show the latencies the runs recorded. ``part``: the LSTM
    stacks alone (``"lstm"``) or the whole model (``"model"``). Files in ``out`` that an earlier report did not
    write are never replaced. Returns what ``report.json`` holds.
    """
    from .files import check_writable

    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    out = Path(out)
    check_writable(out, "--out")
    rows, skipped = collect(inputs)
    if not rows:
        reasons = "; ".join(f"{s['input']}: {s['reason']}" for s in skipped)
        raise ValueError(f"no runs to report ({reasons}): pass run directories or results files with runs")
    settings = measure_rows(rows, tuple(backends), repeats, seq_len, threads) if measure else None
    report = {"generator": GENERATOR, "inputs": [str(p) for p in inputs],
              "latency": {"measured": measure, "part": part, "settings": settings}, "tasks": [], "skipped": skipped}
    figures: dict[str, bytes] = {}
    for task in dict.fromkeys(row.task for row in rows):
        entry, pngs = _task_section(task, rows, part)
        report["tasks"].append(entry)
        figures |= pngs
    files = {**figures, "report.md": render_markdown(report).encode(),
             "index.html": render_html(report, figures).encode()}
    report["files"] = [*sorted(files), "report.json"]
    write_outputs(out, files, report)
    return report


def _task_section(task: str, rows: list[Row], part: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A task's table rows (baselines first; sizes and the metric, whatever the machine), its latency sections
    (one per machine its runs were timed on: the runs timed there, their latencies and speed-ups) and figures."""
    from .tasks import get_task

    kind = get_task(task)
    mine = [(row, baseline_of(row, rows)) for row in rows if row.task == task]

    def order(numbers: dict[str, Any]) -> tuple[bool, str, str]:
        return not numbers["is_baseline"], numbers["method"], numbers["run"]

    numbers = sorted((_accuracy(row, base) for row, base in mine), key=order)
    label = kind.metric_label or kind.metric
    entry = {"task": task, "metric": kind.metric, "metric_label": label, "higher_is_better": kind.higher_is_better,
             "rows": numbers, "latency": [], "figures": []}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", task)
    pngs = {}

    def add(name: str, title: str, png: bytes | None) -> dict[str, str] | None:
        if png is None:
            return None
        pngs[f"{slug}-{name}.png"] = png
        entry["figures"].append({"file": f"{slug}-{name}.png", "title": title})
        return entry["figures"][-1]

    machines = sorted({m for row, _ in mine for m in row.machines}, key=lambda m: (m == UNRECORDED, m))
    named: set[str] = set()
    for machine in machines:
        timed = sorted((_latency_numbers(row_numbers(row, base, part, machine))
                        for row, base in mine if row.timing(machine)), key=order)
        name, copy = _slug(machine), 1
        while name in named:                 # two CPU names alike but for punctuation: two files still
            copy += 1
            name = f"{_slug(machine)}-{copy}"
        named.add(name)
        figure = add(f"pareto-latency-{name}", f"test {label} against batch-1 latency ({OURS}) {_on(machine)}",
                     plot_pareto(timed, "latency", kind.metric, kind.higher_is_better, machine))
        entry["latency"].append({"machine": machine, "rows": timed, "figure": figure})
    add("pareto-bytes", f"test {label} against the LSTM stacks' stored bytes",
        plot_pareto(numbers, "bytes", kind.metric, kind.higher_is_better))
    add("curves", f"validation {label} per epoch", plot_curves(numbers, kind.metric))
    return entry, pngs


LATENCY_KEYS = ("run", "method", "preset", "is_baseline", "metric", "lstm_bytes", "machine", "session",
                "latency_part", "latency_us", "dense_latency_us", "speedup_vs_dense", "speedup_vs_peer", "baseline")


def _latency_numbers(numbers: dict[str, Any]) -> dict[str, Any]:
    """A row of a latency section: ``row_numbers`` less what the task's table shows already."""
    return {key: numbers[key] for key in LATENCY_KEYS}


def _slug(text: str) -> str:
    """A file name's part from a CPU's name.

    >>> _slug("Intel(R) Xeon(R) Processor"), _slug("AMD EPYC")
    ('intel-xeon-processor', 'amd-epyc')
    """
    text = re.sub(r"\((r|tm)\)", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9_.]+", "-", text.lower()).strip("-.") or "unnamed"


def _on(machine: str) -> str:
    """Where latencies were measured, in words.

    >>> _on("AMD EPYC"), _on(UNRECORDED)
    ('on AMD EPYC', 'on an unrecorded machine')
    """
    return "on an unrecorded machine" if machine == UNRECORDED else f"on {machine}"


def table(entry: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and cells of a task's table (``entry``: a task of ``build_report``'s result): sizes, the metric,
    and the machines its latencies were measured on (the latency sections show them).

    >>> entry = {"metric": "ppl", "rows": [{"run": "runs/a", "method": "prune", "preset": "tiny", "is_baseline": False,
    ...          "lstm_params": 1200, "total_params": 5000, "bytes": 20000, "metric": 130.0, "change": 2.5,
    ...          "change_percent": 1.96, "machines": ["AMD EPYC"]}]}
    >>> table(entry)[1][0]
    ['runs/a', 'prune', 'tiny', '1,200', '5,000', '20.0 kB', '130', '+2.5 (+2.0%)', 'AMD EPYC']
    """
    header = ["run", "method", "preset", "LSTM params", "total params", "bytes", f"test {entry['metric']}",
              "change vs baseline", "latency measured on"]
    cells = []
    for row in entry["rows"]:
        change = "baseline" if row["is_baseline"] else _change(row["change"], row["change_percent"])
        cells.append([row["run"], row["method"], row["preset"] or "–", _count(row["lstm_params"]),
                      _count(row["total_params"]), _size(row["bytes"]), _number(row["metric"]), change,
                      ", ".join(row["machines"]) or "–"])
    return header, cells


def latency_table(metric: str, section: dict[str, Any], part: str = "lstm") -> tuple[list[str], list[list[str]]]:
    """The header and cells of a latency section's table: one machine's latencies and speed-ups.

    >>> section = {"machine": "AMD EPYC", "rows": [{"run": "runs/a", "method": "prune", "preset": "tiny",
    ...            "metric": 130.0, "machine": "AMD EPYC", "latency_part": "lstm",
    ...            "latency_us": {"leanlstm": 5.0, "torch": 10.0}, "speedup_vs_dense": 2.0, "speedup_vs_peer": None}]}
    >>> latency_table("ppl", section)[1][0]
    ['runs/a', 'prune', 'tiny', '130', 'AMD EPYC', '5.0', '10.0', '2.00×', '–']
    """
    backends = sorted({name for row in section["rows"] for name in row["latency_us"]},
                      key=lambda name: (name != OURS, name))
    header = ["run", "method", "preset", f"test {metric}", "machine", *[f"{name} µs/step" for name in backends],
              "× vs dense", "× vs best peer"]
    cells = []
    for row in section["rows"]:
        mark = "" if row["latency_part"] == part else "†"     # only the other part was measured
        latency = [f"{row['latency_us'][name]:.1f}{mark}" if name in row["latency_us"] else "–"
                   for name in backends]
        cells.append([row["run"], row["method"], row["preset"] or "–", _number(row["metric"]), row["machine"],
                      *latency, _times(row["speedup_vs_dense"]), _times(row["speedup_vs_peer"])])
    return header, cells


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _change(change: float | None, percent: float | None) -> str:
    if change is None:
        return "–"
    return f"{change:+.3g}" + (f" ({percent:+.1f}%)" if percent is not None else "")


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _about(report: dict[str, Any]) -> list[str]:
    """The page's opening lines: where the latencies come from and what the speed-ups compare."""
    latency, part = report["latency"], "LSTM stacks alone" if report["latency"]["part"] == "lstm" else "whole model"
    if latency["measured"]:
        s = latency["settings"]
        where = (f"measured now on this machine ({s['machine']['cpu']}) for the run directories (batch 1, "
                 f"{s['seq_len']} steps a sequence, {s['repeats']} repeats, {s['threads']} thread(s), all models of "
                 f"a task in one interleaved run); results files show what they recorded, on the machine they name")
    else:
        where = "as the runs and results files recorded them (--no-latency), each on the machine it names"
    return [f"Latency: µs per time step of the {part}, {where}. Latency depends on the machine, so each task has "
            f"a latency table and plot per machine (its CPU as recorded; \"{UNRECORDED}\": recorded without one, "
            f"each such run possibly on another). † marks a latency of the other part (the only one recorded).",
            f"× vs dense: the dense baseline on its fastest backend over this model on {OURS}, both from one "
            f"measurement (one results file, one run's record, or this report's run), else –; × vs best peer: this "
            f"model on its fastest other backend over {OURS}, in the same measurement. Change vs baseline: the test "
            f"metric minus the dense baseline's. Bytes: the whole model as stored (sparse indices included)."]


def _section_note(section: dict[str, Any]) -> str:
    runs = len(section["rows"])
    note = f"{runs} run(s) timed {_on(section['machine'])}; speed-ups divide latencies of one measurement only."
    if section["machine"] == UNRECORDED:
        note += " These runs recorded no machine: their latencies may come from different machines."
    return note


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the tables, the plots (the PNGs beside it) and each run's command."""
    lines = ["# leanlstm report", "", *[f"{line}\n" for line in _about(report)]]
    part = report["latency"]["part"]
    for entry in report["tasks"]:
        better = "higher" if entry["higher_is_better"] else "lower"
        lines += [f"## {entry['task']}: {entry['metric_label']} ({better} is better)", ""]
        header, cells = table(entry)
        lines += [_md_row(header), "|" + "---|" * len(header), *[_md_row(row) for row in cells], ""]
        in_sections = {section["figure"]["file"] for section in entry["latency"] if section["figure"]}
        lines += [f"![{figure['title']}]({figure['file']})\n" for figure in entry["figures"]
                  if figure["file"] not in in_sections]
        for section in entry["latency"]:
            lines += [f"### {entry['task']}: latency {_on(section['machine'])}", "", _section_note(section), ""]
            header, cells = latency_table(entry["metric"], section, part)
            lines += [_md_row(header), "|" + "---|" * len(header), *[_md_row(row) for row in cells], ""]
            if section["figure"]:
                lines += [f"![{section['figure']['title']}]({section['figure']['file']})", ""]
        lines += ["### Commands", ""] + [f"- `{row['run']}`: `{row['command'] or '(not recorded)'}`"
                                         for row in entry["rows"]] + [""]
    if report["skipped"]:
        lines += ["## Skipped inputs", ""] + [f"- `{s['input']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines).rstrip() + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px}
td{text-align:right}td:nth-child(-n+3){text-align:left}th{background:#f3f3f3}tr.baseline{font-weight:600}
figure{display:inline-block;margin:0.5em}img{max-width:100%}code{font-size:12px}li{margin:2px 0}"""
# nothing from the network: plots are data: URIs, and the policy refuses anything else
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    """``index.html``: the Markdown's content on one self-contained page."""
    e = html.escape
    body = ["<h1>leanlstm report</h1>", *[f"<p>{e(line)}</p>" for line in _about(report)]]

    def figure_html(figure: dict[str, str]) -> str:
        data = base64.b64encode(figures[figure["file"]]).decode()
        return (f'<figure><img alt="{e(figure["title"])}" src="data:image/png;base64,{data}">'
                f'<figcaption>{e(figure["title"])}</figcaption></figure>')

    def table_html(kind: str, attributes: str, header: list[str], rows: list[dict[str, Any]],
                   cells: list[list[str]]) -> str:
        lines = [f'<table class="{kind}" {attributes}><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in header)
                 + "</tr></thead><tbody>"]
        for row, values in zip(rows, cells):
            mark = ' class="baseline"' if row["is_baseline"] else ""
            lines.append(f'<tr data-run="{e(row["run"])}"{mark}>' + "".join(f"<td>{e(v)}</td>" for v in values)
                         + "</tr>")
        return "\n".join(lines + ["</tbody></table>"])

    for entry in report["tasks"]:
        better = "higher" if entry["higher_is_better"] else "lower"
        task = e(entry["task"])
        body.append(f'<section id="task-{task}"><h2>{task}: {e(entry["metric_label"])} ({better} is better)</h2>')
        header, cells = table(entry)
        body.append(table_html("runs", f'data-task="{task}"', header, entry["rows"], cells))
        in_sections = {section["figure"]["file"] for section in entry["latency"] if section["figure"]}
        body += [figure_html(figure) for figure in entry["figures"] if figure["file"] not in in_sections]
        for section in entry["latency"]:
            machine = e(section["machine"])
            body.append(f'<h3>{task}: latency {e(_on(section["machine"]))}</h3><p>{e(_section_note(section))}</p>')
            header, cells = latency_table(entry["metric"], section, report["latency"]["part"])
            body.append(table_html("latency", f'data-task="{task}" data-machine="{machine}"', header,
                                   section["rows"], cells))
            if section["figure"]:
                body.append(figure_html(section["figure"]))
        body.append("<h3>Commands</h3><ul>" + "".join(
            f"<li><code>{e(row['run'])}</code>: <code>{e(row['command'] or '(not recorded)')}</code></li>"
            for row in entry["rows"]) + "</ul></section>")
    if report["skipped"]:
        body.append('<section id="skipped"><h2>Skipped inputs</h2><ul>' + "".join(
            f"<li><code>{e(s['input'])}</code>: {e(s['reason'])}</li>" for s in report["skipped"]) + "</ul></section>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f"<title>leanlstm report</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def write_outputs(out: Path, files: dict[str, bytes], report: dict[str, Any]) -> None:
    """Write ``files`` and ``report.json`` into ``out``, refusing to replace a file an earlier report did not
    write; files of the earlier report that this one does not write (a task no longer in it) are removed."""
    from .files import FileProblem, atomic_write, write_json

    previous = _previous_outputs(out)
    targets = [*files, "report.json"]
    foreign = [name for name in targets if (out / name).exists() and name not in previous]
    if foreign:
        raise FileProblem(f"{out} already holds {', '.join(foreign)}, not written by {GENERATOR}: choose another "
                          f"--out, or move those files away")
    write_json(out / "report.json", report)      # first: should we stop half-way, a rerun may replace the rest
    for name, data in files.items():
        atomic_write(out / name, lambda handle, data=data: handle.write(data))
    for name in previous - set(targets):
        (out / name).unlink(missing_ok=True)


def _previous_outputs(out: Path) -> set[str]:
    """The files an earlier report wrote into ``out`` (named in its ``report.json``)."""
    try:
        earlier = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(earlier, dict) or earlier.get("generator") != GENERATOR:
        return set()
    return {name for name in earlier.get("files", []) if isinstance(name, str) and Path(name).name == name}
