"""Figures drawn from a run's ``metrics.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
