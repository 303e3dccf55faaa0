"""Figures drawn from a run's ``metrics.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .methods.doping import DopingConfig

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
