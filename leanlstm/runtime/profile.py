"""Hardware profiles: measured latency of an LSTM across layer sizes, for hardware-guided training.

Latency does not grow smoothly with size: vector widths, cache sizes and kernel tiling make some sizes
faster than smaller ones (*latency hysteresis*). ``profile`` sweeps sizes on this machine and backend and
returns a ``LatencyTable`` that training methods query: ``fastest_at_or_above(n)`` (round a size up to
a faster one), ``largest_under(budget_us)`` (the most capacity a latency budget allows).

A profile directory holds ``settings.json`` (what is measured), ``latency.csv`` (one row per size, written
as soon as it is measured, so an interrupted profile keeps its rows and a rerun skips them),
``latency.json`` (table plus hysteresis points) and ``latency.png``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import write_json
from ..nn import LSTM
from ..nn.forms import form_class
from ..train import MAX_SEED, Range, check_memory, check_ranges
from .backends import get_backend
from .latency import latency
from .speed_check import speed_checks_off

log = logging.getLogger(__name__)

COLUMNS = ("size", "median", "p25", "p75", "min", "max")
SETTINGS, ROWS, TABLE, PLOT = "settings.json", "latency.csv", "latency.json", "latency.png"
MAX_SIZES = 100_000          # sizes in one profile: each is timed ``repeats`` times
SIZE = Range(1, 10**6, integer=True)


class ProfileError(RuntimeError):
    """A backend could not run a size; the message carries its error."""


@dataclass
class ProfileSettings:
    backend: str = "leanlstm"            # which inference backend is timed
    num_layers: int = 1                  # layers of the swept LSTM, all of the swept size
    input_size: int | None = None        # input width; None: equal to the swept size (a layer inside a stack)
    form: str = "dense"                  # weight form of every matrix
    form_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"density": 0.1} for "sparse"
    seq_len: int = 35                    # steps per timed sequence
    repeats: int = 15                    # timed sequences per size (median reported)
    threads: int = 1                     # pinned thread count
    seed: int = 0                        # weights and inputs

    ranges = {"num_layers": Range(1, 1000, integer=True), "input_size": SIZE,
              "seq_len": Range(1, 10**5, integer=True), "repeats": Range(1, 10**5, integer=True),
              "threads": Range(1, 1024, integer=True), "seed": Range(0, MAX_SEED, integer=True)}

    def __post_init__(self) -> None:
        check_ranges(self, self.ranges, optional=("input_size",))    # ConfigError names the setting
        get_backend(self.backend)                  # raise now, naming the known ones, not after the first size
        form_class(self.form)

    def bytes_at(self, size: int) -> int:
        """A generous estimate of the memory measuring ``size`` takes: the dense float32 weights (three copies:
        the model, its form and a backend's own) and a few sequences of inputs and outputs."""
        widths = [self.input_size or size] + [size] * (self.num_layers - 1)
        weights = sum(4 * size * (width + size + 2) for width in widths)
        return 4 * (3 * weights + 4 * self.seq_len * (widths[0] + size))


def check_sizes(count: int, largest: int, settings: ProfileSettings, name: str = "sizes") -> None:
    """Refuse a sweep of more than ``MAX_SIZES`` sizes, or whose largest size would not fit in memory, before
    anything is built (``count`` and ``largest`` come from the request, not from a built list).

    >>> check_sizes(10**9, 10**9, ProfileSettings())
    Traceback (most recent call last):
    ...
    leanlstm.train.ConfigError: the number of sizes must be at least 1 and at most 100000 (...), got 1000000000
    """
    Range(1, MAX_SIZES, integer=True, note="each is timed on its own").check(f"the number of {name}", count)
    SIZE.check(f"largest of {name}", largest)
    check_memory(f"largest of {name}", largest, settings.bytes_at(largest),
                 f"an LSTM of size {largest} with {settings.num_layers} layer(s) and its inputs")


@dataclass
class LatencyTable:
    """Median latency (us per step) per layer size, with the spread of each measurement.

    >>> table = LatencyTable.from_rows([{"size": 8, "median": 2.0}, {"size": 16, "median": 1.5},
    ...                                 {"size": 24, "median": 3.0}])
    >>> table.fastest_at_or_above(8), table.largest_under(2.0), [p["size"] for p in table.hysteresis()]
    (16, 16, [16])
    """

    rows: dict[int, dict[str, float]]                  # size -> {"median", "p25", "p75", "min", "max"}
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], settings: dict[str, Any] | None = None) -> "LatencyTable":
        table = {}
        for row in rows:
            size = int(row["size"])
            table[size] = {k: float(row[k]) for k in COLUMNS[1:] if row.get(k) not in (None, "")}
        return cls(dict(sorted(table.items())), dict(settings or {}))

    @classmethod
    def load(cls, directory: str | Path) -> "LatencyTable":
        """The table measured so far in a profile directory."""
        directory = Path(directory)
        settings = json.loads((directory / SETTINGS).read_text()) if (directory / SETTINGS).is_file() else {}
        return cls.from_rows(_read_rows(directory / ROWS), settings)

    @property
    def sizes(self) -> list[int]:
        return list(self.rows)

    def latency(self, size: int) -> float:
        """Median microseconds per step at ``size`` (measured sizes only)."""
        if size not in self.rows:
            raise KeyError(f"size {size} was not profiled; profiled sizes run from {self._span()}")
        return self.rows[size]["median"]

    def fastest_at_or_above(self, n: int) -> int:
        """The profiled size ``>= n`` with the lowest latency (the smaller size on ties)."""
        candidates = [s for s in self.rows if s >= n]
        if not candidates:
            raise ValueError(f"no profiled size is >= {n}; profiled sizes run from {self._span()}")
        return min(candidates, key=lambda s: (self.rows[s]["median"], s))

    def largest_under(self, budget_us: float) -> int | None:
        """The largest profiled size whose latency is within ``budget_us`` per step, or None."""
        fitting = [s for s, row in self.rows.items() if row["median"] <= budget_us]
        return max(fitting) if fitting else None

    def hysteresis(self, tolerance: float = 0.0) -> list[dict[str, float]]:
        """Sizes that run faster than some smaller size, by more than ``tolerance`` (a fraction).

        Each point names the size, its latency, and the slowest smaller size it beats.
        """
        points, slowest = [], None
        for size, row in self.rows.items():
            if slowest is not None and row["median"] < self.rows[slowest]["median"] * (1 - tolerance):
                points.append({"size": size, "latency": row["median"], "slower_size": slowest,
                               "slower_latency": self.rows[slowest]["median"]})
            if slowest is None or row["median"] > self.rows[slowest]["median"]:
                slowest = size
        return points

    def to_dict(self, tolerance: float = 0.0) -> dict[str, Any]:
        return {"settings": self.settings, "unit": "us per time step",
                "rows": [{"size": s, **row} for s, row in self.rows.items()],
                "hysteresis": self.hysteresis(tolerance)}

    def _span(self) -> str:
        return f"{min(self.rows)} to {max(self.rows)}" if self.rows else "(none yet)"


def profile(sizes: Iterable[int], out_dir: str | Path, settings: ProfileSettings | None = None,
            on_row: Callable[[int, dict[str, float]], None] | None = None) -> LatencyTable:
    """Measure latency for every size in ``sizes`` into ``out_dir`` and return the whole table.

    Sizes already in ``out_dir`` (same settings) are skipped, so rerunning resumes a broken-off profile.

    >>> import tempfile
    >>> table = profile([4, 8], tempfile.mkdtemp(), ProfileSettings(seq_len=4, repeats=3))
    >>> table.sizes
    [4, 8]
    """
    settings = settings or ProfileSettings()
    sizes = sorted(set(int(s) for s in sizes))
    if sizes and sizes[0] < 1:
        raise ValueError(f"layer sizes must be positive, got {sizes[0]}")
    check_sizes(len(sizes), max(sizes, default=1), settings)
    out = Path(out_dir)
    _prepare(out, settings)
    done = {int(row["size"]) for row in _read_rows(out / ROWS)}
    for size in sorted(set(sizes) - done):
        row = _measure_size(size, settings)
        _append_row(out / ROWS, size, row)
        log.debug("profiled size %d: %.2f us/step", size, row["median"])
        if on_row is not None:
            on_row(size, row)
    table = LatencyTable.load(out)
    (out / TABLE).write_text(json.dumps(table.to_dict(), indent=2))
    plot(table, out / PLOT)
    return table


def _prepare(out: Path, settings: ProfileSettings) -> None:
    """Write the settings, or check that an existing profile there was measured the same way. A folder whose
    settings never got a measured row (the first size failed) takes the new settings."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = json.loads(json.dumps(asdict(settings)))          # normalised as stored (tuples -> lists)
    if (out / SETTINGS).is_file() and _read_rows(out / ROWS):
        stored = json.loads((out / SETTINGS).read_text())
        if stored != wanted:
            changed = ", ".join(f"{k}={stored.get(k)!r} there, {v!r} now" for k, v in wanted.items()
                                if stored.get(k) != v)
            raise ValueError(f"{out} holds a profile measured with other settings ({changed}); "
                             f"choose another output folder")
    else:
        write_json(out / SETTINGS, wanted)


def _measure_size(size: int, settings: ProfileSettings) -> dict[str, float]:
    torch.manual_seed(settings.seed)
    model = LSTM(settings.input_size or size, size, settings.num_layers)
    if settings.form != "dense":
        try:
            with speed_checks_off():                # a sweep measures the form itself; no per-matrix check
                model.replace_forms(settings.form, **settings.form_options)
        except TypeError as error:                  # a missing or unknown option of the form's constructor
            raise ValueError(f"form {settings.form!r} with options {settings.form_options}: {error}; give its "
                             f"options with --form-option KEY=VALUE") from error
    result = latency(model, backends=(settings.backend,), seq_len=settings.seq_len, repeats=settings.repeats,
                     warmup=2, threads=settings.threads, seed=settings.seed)
    if settings.backend in result["errors"]:
        raise ProfileError(f"backend {settings.backend} cannot run size {size}: "
                           f"{result['errors'][settings.backend]}")
    stats = result["backends"][settings.backend]
    return {k: stats[k] for k in COLUMNS[1:]}


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("size") and row.get("median")]


def _append_row(path: Path, size: int, row: dict[str, float]) -> None:
    """Append one row and force it to disk: a killed profile loses at most the size being measured."""
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([size, *(f"{row[k]:.4f}" for k in COLUMNS[1:])])
        handle.flush()
        os.fsync(handle.fileno())


def plot(table: LatencyTable, path: str | Path) -> Path:
    """Latency against size (median line, quartile band) with the hysteresis points marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sizes = table.sizes
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(sizes, [table.rows[s]["median"] for s in sizes], lw=1.2, label="median")
    if all("p25" in r and "p75" in r for r in table.rows.values()):
        ax.fill_between(sizes, [table.rows[s]["p25"] for s in sizes], [table.rows[s]["p75"] for s in sizes],
                        alpha=0.3, label="p25-p75")
    points = table.hysteresis()
    if points:
        ax.scatter([p["size"] for p in points], [p["latency"] for p in points], color="red", s=14, zorder=3,
                   label="faster than a smaller size")
    s = table.settings
    ax.set(xlabel="layer size", ylabel="us per time step (batch 1)",
           title=f"{s.get('backend', '?')}, {s.get('num_layers', '?')} layer(s), {s.get('form', '?')}, "
                 f"{s.get('threads', '?')} thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
