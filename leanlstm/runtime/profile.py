"""Hardware profiles: measured latency of LSTMs and of single layers on this machine and backend.

Latency does not grow smoothly with size: vector widths, cache sizes and kernel tiling make some sizes faster
than smaller ones (*latency hysteresis*, Yin et al., arXiv 1901.10997). Two kinds of profile, each a folder:

- a *size sweep* (``profile``): one LSTM of ``num_layers`` layers across sizes. Its ``LatencyTable`` answers
  ``fastest_at_or_above(n)`` (round a size up to a faster one), ``largest_under(budget_us)`` (the most capacity a
  budget allows), ``valleys()`` (local latency minima) and ``hysteresis()`` (sizes faster than a smaller one).
- a *layer table* (``profile_layers``, ``LayerProfile``): one layer (one direction) keyed by ``LayerKey``: cell,
  input size, hidden size, and which matrices are sparse at which density. ``runtime.latency_model`` sums it into
  a whole stack; ``LayerTable.faster_densities`` gives the densities at which a sparse matrix beats the dense layer
  on the backend (none: sparsity is refused there). Symbiotic training (``methods.symbiotic``) reads it, and a
  ``LayerProfile`` measures the rows it is asked for on demand.

A profile folder holds ``settings.json`` (what is measured, plus the ``fingerprint``: the machine and the backend's
library versions), ``latency.csv`` (one row per measurement, written as soon as it is measured, so an interrupted
profile keeps its rows and a rerun skips them; a layer table times its layers in small interleaved runs, as
``runtime.latency.measure`` does, and writes each run's rows when it ends), ``latency.json`` (the table, hysteresis
points and valleys) and ``latency.png``. Numbers measured elsewhere are never reused silently: profiling into a
folder measured on another machine or backend version warns, moves the old files to ``stale-N/`` and measures
everything again, and ``LatencyTable.load`` / ``LayerTable.load`` warn.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..files import write_json
from ..nn import LSTM
from ..nn.cells import RecurrentLayer
from ..nn.forms import form_class
from ..train import MAX_SEED, Range, check_memory, check_ranges
from .backends import get_backend
from .kernel_cache import kernel_digest
from .latency import latency, load_now, machine_info, measure
from .speed_check import speed_checks_off

log = logging.getLogger(__name__)

STATS = ("median", "p25", "p75", "min", "max")
COLUMNS = ("size",) + STATS
PAIRED = ("dense_median", "dense_min")    # a sparse row's dense layer, timed in the same interleaved run
LAYER_COLUMNS = ("cell", "input_size", "hidden_size", "matrices", "density") + STATS + PAIRED
SETTINGS, ROWS, TABLE, PLOT = "settings.json", "latency.csv", "latency.json", "latency.png"
FINGERPRINT = "fingerprint"
MAX_SIZES = 100_000          # sizes in one profile: each is timed ``repeats`` times
SIZE = Range(1, 10**6, integer=True)
TOGETHER, TOGETHER_BYTES = 16, 2**29   # layers timed in one interleaved run: at most this many, this much memory
MACHINE_KEYS = ("cpu", "cpus", "platform", "env")      # machine_info() without the load, which changes by the second
# the libraries whose code each family of backends times: a new version may bring other kernels
LIBRARIES = {"leanlstm": ("leanlstm", "numba", "numpy"), "torch": ("torch",),
             "onnxruntime": ("onnxruntime", "onnx", "torch", "leanlstm")}


# backends that run every weight form as the dense matrix it materialises (runtime.backends): there a sparse
# matrix cannot run faster than dense, so hardware-guided training does not profile sparsity on them
FORMS_RUN_DENSE = frozenset({"torch", "torch-int8", "onnxruntime", "onnxruntime-int8", "onnxruntime-stream"})


def runs_forms_dense(backend: str) -> bool:
    """Whether ``backend`` runs every form as its dense matrix (sparsity cannot pay there).

    >>> runs_forms_dense("onnxruntime"), runs_forms_dense("leanlstm-int8")
    (True, False)
    """
    get_backend(backend)
    return backend in FORMS_RUN_DENSE


class ProfileError(RuntimeError):
    """A backend could not run a size; the message carries its error."""


# --- what a profile's numbers depend on besides its settings ------------------------------------------------
def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        try:
            return str(getattr(importlib.import_module(library), "__version__", "unknown"))
        except ImportError:
            return "not installed"


def backend_versions(backend: str) -> dict[str, str]:
    """Versions of the libraries ``backend`` runs on (unknown names are refused, naming the known ones); for the
    engine's backends also the digest of its kernels' source (``kernel_cache.kernel_digest``), which changes with
    any kernel between releases.

    >>> sorted(backend_versions("torch-int8"))
    ['torch']
    >>> sorted(backend_versions("leanlstm-int8"))
    ['leanlstm', 'leanlstm kernels', 'numba', 'numpy']
    """
    get_backend(backend)
    family = backend.split("-")[0]
    libraries = LIBRARIES.get(family, sorted({name for names in LIBRARIES.values() for name in names}))
    versions = {name: _version(name) for name in libraries}
    if family == "leanlstm":
        versions["leanlstm kernels"] = kernel_digest()[:16]
    return versions


def fingerprint(backend: str) -> dict[str, Any]:
    """The machine (``machine_info()`` without its load) and ``backend``'s library versions, as stored in JSON."""
    info = machine_info()
    return json.loads(json.dumps({"machine": {key: info.get(key) for key in MACHINE_KEYS},
                                  "versions": backend_versions(backend)}))


def fingerprint_changes(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Where a stored fingerprint differs from ``current``, one line each; a profile that recorded none (older
    than fingerprints) differs.

    >>> here = {"machine": {"cpu": "A"}, "versions": {"numba": "1"}}
    >>> fingerprint_changes({"machine": {"cpu": "B"}, "versions": {"numba": "1"}}, here)
    ["machine.cpu: 'B' there, 'A' here"]
    """
    if not stored:
        return ["the profile recorded no machine"]
    changes = []
    for part in ("machine", "versions"):
        there, here = stored.get(part) or {}, current.get(part) or {}
        changes += [f"{part}.{key}: {there.get(key)!r} there, {here.get(key)!r} here"
                    for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key)]
    return changes


def _stored_settings(directory: Path) -> dict[str, Any]:
    """The settings of a profile folder; a warning when they were measured on another machine or version."""
    if not (directory / SETTINGS).is_file():
        return {}
    settings = json.loads((directory / SETTINGS).read_text())
    try:
        changes = fingerprint_changes(settings.get(FINGERPRINT), fingerprint(settings.get("backend", "leanlstm")))
    except ValueError:                                      # a backend this version does not have
        changes = [f"backend {settings.get('backend')!r} is unknown here"]
    if changes:
        log.warning("%s was profiled on another machine or backend version (%s): its numbers may not hold here; "
                    "profile into that folder again to measure them here", directory, "; ".join(changes))
    return settings


# --- size sweeps --------------------------------------------------------------------------------------------
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
    >>> table.valleys(), table.snapped_sizes()
    ([16], [16, 24])
    """

    rows: dict[int, dict[str, float]]                  # size -> {"median", "p25", "p75", "min", "max"}
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], settings: dict[str, Any] | None = None) -> "LatencyTable":
        table = {int(row["size"]): _stats(row) for row in rows}
        return cls(dict(sorted(table.items())), dict(settings or {}))

    @classmethod
    def load(cls, directory: str | Path) -> "LatencyTable":
        """The table measured so far in a profile directory (a warning if measured on another machine)."""
        directory = Path(directory)
        return cls.from_rows(_read_rows(directory / ROWS), _stored_settings(directory))

    @property
    def sizes(self) -> list[int]:
        return list(self.rows)

    def latency(self, size: int) -> float:
        """Median microseconds per step at ``size`` (measured sizes only)."""
        if size not in self.rows:
            raise KeyError(f"size {size} was not profiled; profiled sizes run from {self._span()}")
        return self.rows[size]["median"]

    def fastest_at_or_above(self, n: int, tolerance: float = 0.0) -> int:
        """The smallest profiled size ``>= n`` within ``tolerance`` (a fraction) of the fastest size ``>= n``:
        with tolerance 0, the fastest (the smaller on ties); a larger size wins only by more than the noise."""
        candidates = [s for s in self.rows if s >= n]
        if not candidates:
            raise ValueError(f"no profiled size is >= {n}; profiled sizes run from {self._span()}")
        best = min(self.rows[s]["median"] for s in candidates)
        return min(s for s in candidates if self.rows[s]["median"] <= best * (1 + tolerance))

    def largest_under(self, budget_us: float) -> int | None:
        """The largest profiled size whose latency is within ``budget_us`` per step, or None."""
        fitting = [s for s, row in self.rows.items() if row["median"] <= budget_us]
        return max(fitting) if fitting else None

    def valleys(self, tolerance: float = 0.0) -> list[int]:
        """Local latency minima: sizes faster than the size before them by more than ``tolerance`` (the first
        size: always) and not slower than the size after them by more than ``tolerance`` (the last: always)."""
        sizes, found = self.sizes, []
        for i, size in enumerate(sizes):
            here = self.rows[size]["median"]
            drop = i == 0 or here < self.rows[sizes[i - 1]]["median"] * (1 - tolerance)
            if drop and (i == len(sizes) - 1 or here <= self.rows[sizes[i + 1]]["median"] * (1 + tolerance)):
                found.append(size)
        return found

    def snapped_sizes(self, tolerance: float = 0.0) -> list[int]:
        """Every profiled size snapped up by ``fastest_at_or_above``: the sizes no larger size beats, smallest
        first. Each is faster than every larger one (up to ``tolerance``): the ladder a width steps down."""
        return sorted({self.fastest_at_or_above(size, tolerance) for size in self.rows})

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
                "hysteresis": self.hysteresis(tolerance), "valleys": self.valleys(tolerance)}

    def _span(self) -> str:
        return f"{min(self.rows)} to {max(self.rows)}" if self.rows else "(none yet)"


def profile(sizes: Iterable[int], out_dir: str | Path, settings: ProfileSettings | None = None,
            on_row: Callable[[int, dict[str, float]], None] | None = None) -> LatencyTable:
    """Measure latency for every size in ``sizes`` into ``out_dir`` and return the whole table.

    Sizes already in ``out_dir`` (same settings, same machine) are skipped, so rerunning resumes a broken-off
    profile; a folder measured on another machine or backend version is set aside and measured again.

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
    _prepare(out, json.loads(json.dumps(asdict(settings))), settings.backend)
    done = {int(row["size"]) for row in _read_rows(out / ROWS)}
    for size in sorted(set(sizes) - done):
        row = _measure_size(size, settings)
        _append_row(out / ROWS, COLUMNS, [size, *(f"{row[k]:.4f}" for k in STATS)])
        log.debug("profiled size %d: %.2f us/step", size, row["median"])
        if on_row is not None:
            on_row(size, row)
    table = LatencyTable.from_rows(_read_rows(out / ROWS), json.loads((out / SETTINGS).read_text()))
    (out / TABLE).write_text(json.dumps(table.to_dict(), indent=2))
    plot(table, out / PLOT)
    return table


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only warnings from logger ``name`` while inside."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


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
    return _timed(model, settings.backend, settings, f"size {size}")


def _timed(model: torch.nn.Module, backend: str, settings: Any, what: str) -> dict[str, float]:
    """The latency statistics of ``model`` on ``backend`` with the settings' sequence, repeats and threads."""
    result = latency(model, backends=(backend,), seq_len=settings.seq_len, repeats=settings.repeats,
                     warmup=2, threads=settings.threads, seed=settings.seed)
    if backend in result["errors"]:
        raise ProfileError(f"backend {backend} cannot run {what}: {result['errors'][backend]}")
    stats = result["backends"][backend]
    return {k: stats[k] for k in STATS}


# --- the folder: settings, rows as measured -----------------------------------------------------------------
def _prepare(out: Path, wanted: dict[str, Any], backend: str) -> None:
    """Write the settings and this machine's fingerprint, or check that an existing profile there was measured the
    same way. Other settings are refused; another machine or backend version is set aside (``stale-N/``) with a
    warning, and everything is measured again. A folder whose settings never got a measured row (the first size
    failed) takes the new settings."""
    out.mkdir(parents=True, exist_ok=True)
    current = fingerprint(backend)
    if (out / SETTINGS).is_file() and _read_rows(out / ROWS):
        stored = json.loads((out / SETTINGS).read_text())
        measured_with = {k: v for k, v in stored.items() if k != FINGERPRINT}
        if measured_with != wanted:
            changed = ", ".join(f"{k}={measured_with.get(k)!r} there, {v!r} now" for k, v in wanted.items()
                                if measured_with.get(k) != v)
            raise ValueError(f"{out} holds a profile measured with other settings ({changed}); "
                             f"choose another output folder")
        changes = fingerprint_changes(stored.get(FINGERPRINT), current)
        if not changes:
            return
        aside = _set_aside(out)
        log.warning("%s was profiled on another machine or backend version (%s); its numbers are not reused: "
                    "they are moved to %s and every row is measured again here", out, "; ".join(changes), aside)
    write_json(out / SETTINGS, wanted | {FINGERPRINT: current})


def _set_aside(out: Path) -> Path:
    """Move a profile's files into the first free ``stale-N`` subfolder."""
    number = 1
    while (out / f"stale-{number}").exists():
        number += 1
    aside = out / f"stale-{number}"
    aside.mkdir()
    for name in (SETTINGS, ROWS, TABLE, PLOT):
        if (out / name).exists():
            (out / name).rename(aside / name)
    return aside


def _stats(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(row[k]) for k in STATS + PAIRED if row.get(k) not in (None, "")}


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("median")]


def _append_row(path: Path, columns: tuple[str, ...], values: list[Any]) -> None:
    """Append one row and force it to disk: a killed profile loses at most the row being measured."""
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerow(values)
        handle.flush()
        os.fsync(handle.fileno())


# --- layer tables -------------------------------------------------------------------------------------------
class LayerKey(NamedTuple):
    """One profiled layer (one direction): its cell, input and hidden sizes, and which of its matrices are sparse
    at ``density``: ``"all"`` or one matrix (``"hh"``); density 1 is the dense layer (matrices ``"all"``).

    ``cell`` is the cell's name, then its options as JSON where it has any that shape its products (an H-LSTM's
    ``gate_hidden``, an LSTM's ``proj_size``); ``layer_cell(layer)`` writes it for a built layer. The option
    ``layers`` (default 1) times a stack of that many equal layers instead (the latency model's overhead term).

    >>> LayerKey("lstm", 8, 16, "hh", 0.25).dense
    LayerKey(cell='lstm', input_size=8, hidden_size=16, matrices='all', density=1.0)
    """

    cell: str
    input_size: int
    hidden_size: int
    matrices: str = "all"
    density: float = 1.0

    @property
    def dense(self) -> "LayerKey":
        return LayerKey(self.cell, self.input_size, self.hidden_size)

    @property
    def is_dense(self) -> bool:
        return self.density >= 1.0


def layer_key(cell: str, input_size: int, hidden_size: int, matrices: str = "all", density: float = 1.0
              ) -> LayerKey:
    """A ``LayerKey`` in its one written form: whole sizes, the density to 4 decimals, dense keys on ``"all"``.

    >>> layer_key("lstm", 8.0, 16, "hh", 0.123456)
    LayerKey(cell='lstm', input_size=8, hidden_size=16, matrices='hh', density=0.1235)
    """
    density = round(float(density), 4)
    if density >= 1.0:
        return LayerKey(str(cell), int(input_size), int(hidden_size))
    return LayerKey(str(cell), int(input_size), int(hidden_size), str(matrices), density)


def cell_name(cell: str, options: dict[str, Any] | None = None) -> str:
    """The ``cell`` of a ``LayerKey``: ``("hlstm", {"gate_hidden": 16})`` -> ``'hlstm {"gate_hidden": 16}'``."""
    return cell if not options else f"{cell} {json.dumps(options, sort_keys=True)}"


def split_cell(cell: str) -> tuple[str, dict[str, Any]]:
    """``'hlstm {"gate_hidden": 16}'`` -> ``("hlstm", {"gate_hidden": 16})``."""
    name, _, options = cell.partition(" ")
    return name, (json.loads(options) if options else {})


def layer_cell(layer: RecurrentLayer) -> str:
    """The ``LayerKey`` cell of a built layer: its name and the constructor options that shape its products.

    >>> from leanlstm.nn.hlstm import HLSTMLayer
    >>> layer_cell(LSTM(4, 8).layers[0]), layer_cell(HLSTMLayer(4, 8, gate_hidden=5))
    ('lstm', 'hlstm {"gate_hidden": [5, 5, 5, 5]}')
    """
    shaping = {k: v for k, v in layer.arguments().items()
               if k not in ("input_size", "hidden_size", "reverse", "gate_dropout")
               and not (k == "bias" and v) and not (k == "proj_size" and not v)}
    return cell_name(layer.cell, shaping)


def layer_model(key: LayerKey) -> LSTM:
    """The LSTM stack a key measures: one layer (or ``layers`` equal ones), random weights, sparse matrices
    magnitude-masked."""
    name, options = split_cell(key.cell)
    proj, bias, layers = options.pop("proj_size", 0), options.pop("bias", True), options.pop("layers", 1)
    model = LSTM(key.input_size, [key.hidden_size] * layers, bias=bias, proj_size=proj, cell=name,
                 cell_options=options or None)
    if not key.is_dense:
        with speed_checks_off():
            model.replace_forms("sparse", density=key.density, speed_check=False,
                                matrices=None if key.matrices == "all" else [key.matrices])
    return model


@dataclass
class LayerSettings:
    """How every row of a layer table is measured."""

    backend: str = "leanlstm"            # which inference backend is timed
    seq_len: int = 35                    # steps per timed sequence
    repeats: int = 7                     # timed sequences per row (median reported)
    threads: int = 1                     # pinned thread count
    seed: int = 0                        # weights and inputs

    ranges = {"seq_len": Range(1, 10**5, integer=True), "repeats": Range(1, 10**5, integer=True),
              "threads": Range(1, 1024, integer=True), "seed": Range(0, MAX_SEED, integer=True)}

    def __post_init__(self) -> None:
        check_ranges(self, self.ranges)
        get_backend(self.backend)           # an unknown backend is refused now, naming the known ones

    def stored(self) -> dict[str, Any]:
        """As written to ``settings.json`` (the ``table`` entry tells a layer table from a size sweep)."""
        return {"table": "layers"} | asdict(self)


@dataclass
class LayerTable:
    """Median latency (us per step) of single layers, by ``LayerKey``; lookups, interpolation, density choice.

    >>> t = LayerTable.from_rows([{"cell": "lstm", "input_size": 8, "hidden_size": h, "median": m}
    ...                           for h, m in ((8, 1.0), (16, 2.0))])
    >>> t.estimate(LayerKey("lstm", 8, 12)), t.sweep("lstm", 8).sizes
    (1.5, [8, 16])
    """

    rows: dict[LayerKey, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], settings: dict[str, Any] | None = None) -> "LayerTable":
        table = {layer_key(row["cell"], row["input_size"], row["hidden_size"], row.get("matrices") or "all",
                           row.get("density") or 1.0): _stats(row) for row in rows}
        return cls(table, dict(settings or {}))

    @classmethod
    def load(cls, directory: str | Path) -> "LayerTable":
        """The layer table measured so far in a profile folder (a warning if measured on another machine)."""
        directory = Path(directory)
        return cls.from_rows(_read_rows(directory / ROWS), _stored_settings(directory))

    def ensure(self, keys: Iterable[LayerKey]) -> "LayerTable":
        """This table, if it holds every key; a fixed table measures nothing (``LayerProfile.ensure`` does)."""
        missing = sorted(set(keys) - set(self.rows))
        if missing:
            raise KeyError(f"the layer table has no row for {', '.join(map(str, missing[:3]))}"
                           f"{' ...' if len(missing) > 3 else ''}; measure them with a LayerProfile")
        return self

    def latency(self, key: LayerKey) -> float:
        """Median microseconds per step of a measured key."""
        if key not in self.rows:
            raise KeyError(f"{key} was not profiled")
        return self.rows[key]["median"]

    def estimate(self, key: LayerKey) -> float:
        """The latency of ``key``: measured, else interpolated linearly between profiled densities of its matrices
        (the dense layer is density 1), then between profiled hidden and input sizes. Never extrapolated: a key
        outside the profiled ranges is a ``KeyError`` naming them."""
        if key in self.rows:
            return self.rows[key]["median"]
        if not key.is_dense:
            densities = sorted({k.density for k in self.rows if (k.cell, k.matrices) == (key.cell, key.matrices)})
            if key.density not in densities:
                below = [d for d in densities if d < key.density]
                above = [d for d in densities if d > key.density] + [1.0]
                if not below:
                    raise KeyError(f"{key}: no density below {key.density} was profiled for these matrices")
                low, high = below[-1], above[0]
                at_low, at_high = self.estimate(key._replace(density=low)), self.estimate(
                    key.dense if high >= 1.0 else key._replace(density=high))
                return at_low + (at_high - at_low) * (key.density - low) / (high - low)
        points = {(k.input_size, k.hidden_size): row["median"] for k, row in self.rows.items()
                  if (k.cell, k.matrices, k.density) == (key.cell, key.matrices, key.density)}
        return _interpolate(points, key)

    def saving(self, key: LayerKey) -> float:
        """What making ``key.matrices`` sparse at ``key.density`` saves against the dense layer, us per step: the
        share saved within the run that timed both, where there was one, times the dense layer's estimate; else
        the difference of the estimates. A share, not a difference: a run timed while the machine was busier reads
        both slower, and its difference would then exceed what the layer costs in a quieter row."""
        row = self.rows.get(key)
        if row is not None and "dense_median" in row and row["dense_median"] > 0:
            return (1.0 - row["median"] / row["dense_median"]) * self.estimate(key.dense)
        return self.estimate(key.dense) - self.estimate(key)

    def sweep(self, cell: str, input_size: int, matrices: str = "all", density: float = 1.0) -> LatencyTable:
        """The hidden sizes profiled for one cell, input size and form, as a size sweep (valleys, snapping)."""
        want = layer_key(cell, input_size, 1, matrices, density)
        rows = [{"size": k.hidden_size, **row} for k, row in self.rows.items()
                if (k.cell, k.input_size, k.matrices, k.density) == (want.cell, want.input_size, want.matrices,
                                                                      want.density)]
        return LatencyTable.from_rows(rows, self.settings)

    def faster_densities(self, cell: str, input_size: int, hidden_size: int, matrices: str = "all",
                         tolerance: float = 0.0) -> list[float]:
        """The profiled densities (highest first) at which making ``matrices`` sparse runs the layer faster than
        dense by more than ``tolerance``, in its median and in its fastest sample (both: one noisy sample on a busy
        machine must not decide); ``[]`` where dense is as fast or faster: sparsity is refused there.

        >>> t = LayerTable.from_rows([{"cell": "lstm", "input_size": 8, "hidden_size": 8, "matrices": "hh",
        ...                            "density": d, "median": m} for d, m in ((0.1, 0.5), (0.5, 1.2), (1, 1.0))])
        >>> t.faster_densities("lstm", 8, 8, "hh"), t.faster_densities("lstm", 8, 8, "hh", tolerance=0.6)
        ([0.1], [])
        """
        dense_key = layer_key(cell, input_size, hidden_size)
        self.latency(dense_key)                                  # a KeyError unless the dense layer was profiled
        dense = self.rows[dense_key]

        def faster(row: dict[str, float]) -> bool:       # against its own run's dense layer where it has one
            return all(row.get(stat, row["median"]) < row.get(f"dense_{stat}", dense.get(stat, dense["median"]))
                       * (1 - tolerance) for stat in ("median", "min"))

        found = [k for k in self.rows if not k.is_dense and
                 (k.cell, k.input_size, k.hidden_size, k.matrices) == (cell, input_size, hidden_size, matrices)]
        return sorted((k.density for k in found if faster(self.rows[k])), reverse=True)

    def to_dict(self, tolerance: float = 0.0) -> dict[str, Any]:
        series = sorted({(k.cell, k.input_size, k.matrices, k.density) for k in self.rows})
        return {"settings": self.settings, "unit": "us per time step", "key": list(LAYER_COLUMNS[:5]),
                "rows": [{**k._asdict(), **row} for k, row in sorted(self.rows.items())],
                "valleys": [{"cell": c, "input_size": i, "matrices": m, "density": d,
                             "sizes": self.sweep(c, i, m, d).valleys(tolerance)} for c, i, m, d in series]}


def _interpolate(points: dict[tuple[int, int], float], key: LayerKey) -> float:
    """Linear in the hidden size at each bracketing profiled input size, then linear in the input size."""
    inputs = sorted({i for i, _ in points})
    low = [i for i in inputs if i <= key.input_size]
    high = [i for i in inputs if i >= key.input_size]
    if not low or not high:
        raise KeyError(f"{key}: input size outside the profiled ones ({inputs or 'none'}); profile it")

    def along_hidden(inputs_: int) -> float:
        curve = sorted((h, v) for (i, h), v in points.items() if i == inputs_)
        for (h0, v0), (h1, v1) in zip(curve, curve[1:] + [curve[-1]]):
            if h0 <= key.hidden_size <= h1:
                return v0 if h1 == h0 else v0 + (v1 - v0) * (key.hidden_size - h0) / (h1 - h0)
        raise KeyError(f"{key}: hidden size outside the profiled ones at input {inputs_} "
                       f"({[h for h, _ in curve]}); profile it")

    i0, i1 = low[-1], high[0]
    v0, v1 = along_hidden(i0), along_hidden(i1)
    return v0 if i1 == i0 else v0 + (v1 - v0) * (key.input_size - i0) / (i1 - i0)


def warn_if_busy(rows: int) -> bool:
    """Warn when other processes compete for the CPU: a profile measured on a busy machine reads slow and
    scatters, and on torch eager (load 3-5 on 2 cores) the valleys it found were not valleys on the quiet machine.
    Returns whether it warned."""
    runnable = load_now()["runnable"]
    busy = runnable is not None and runnable > 1
    if busy:
        log.warning("profiling %d layer rows while %d other processes are runnable: the rows will read slow and "
                    "scatter, and valleys found now may not be valleys on a quiet machine; profile with the machine "
                    "otherwise idle (the cache keeps the rows: delete its folder to measure again)", rows,
                    runnable - 1)
    return busy


class LayerProfile:
    """A layer table in a folder that measures what it is asked for: ``ensure(keys)`` measures the keys it does
    not hold yet (rows written as each interleaved run ends) and returns the table. Opening a folder measured with
    other settings is refused; one from another machine or backend version is set aside and measured again.

    >>> import tempfile
    >>> table = LayerProfile(tempfile.mkdtemp(), LayerSettings(seq_len=4, repeats=2)).ensure([LayerKey("lstm", 4, 8)])
    >>> list(table.rows)
    [LayerKey(cell='lstm', input_size=4, hidden_size=8, matrices='all', density=1.0)]
    """

    def __init__(self, out_dir: str | Path, settings: LayerSettings | None = None,
                 on_row: Callable[[LayerKey, dict[str, float]], None] | None = None) -> None:
        self.out, self.settings, self.on_row = Path(out_dir), settings or LayerSettings(), on_row
        self.warned_busy = False
        _prepare(self.out, json.loads(json.dumps(self.settings.stored())), self.settings.backend)
        self.table = LayerTable.from_rows(_read_rows(self.out / ROWS), json.loads((self.out / SETTINGS).read_text()))

    def ensure(self, keys: Iterable[LayerKey]) -> LayerTable:
        """Measure the keys not in the table yet and return it. Dense layers are timed together in interleaved
        runs (a sweep's sizes share the machine's conditions, so a valley is not a moment of quiet); sparse layers
        with their dense layer in the same run, whose numbers each sparse row keeps (``dense_median``,
        ``dense_min``): what sparsity saves is a difference within one run."""
        missing = sorted(set(keys) - set(self.table.rows))
        for key in missing:
            _check_key(key, self.settings)
        if missing and not self.warned_busy:          # once per profile: its rows are measured in many runs
            self.warned_busy = warn_if_busy(len(missing))
        for chunk in _chunks([key for key in missing if key.is_dense]):
            self._run(chunk)
        sparse = [key for key in missing if not key.is_dense]
        for shape in sorted({key.dense for key in sparse}):
            for chunk in _chunks([key for key in sparse if key.dense == shape], reserve=shape):
                self._run(chunk, reference=shape)
        if missing:
            (self.out / TABLE).write_text(json.dumps(self.table.to_dict(), indent=2))
        return self.table

    def _run(self, keys: list[LayerKey], reference: LayerKey | None = None) -> None:
        """Time ``keys`` (and ``reference``) in one interleaved run; append their rows, then report them."""
        torch.manual_seed(self.settings.seed)
        models = {str(i): layer_model(key) for i, key in enumerate(keys)}
        if reference is not None:
            models["dense"] = layer_model(reference)
        s = self.settings
        with _quiet("leanlstm.runtime.cells"):     # a low-precision backend's per-matrix choices, hundreds a profile
            result = measure(models, backends=(s.backend,), seq_len=s.seq_len, repeats=s.repeats, warmup=2,
                             threads=s.threads, seed=s.seed)["models"]
        for label, key in list(zip(models, keys)) + [("dense", reference)]:
            if key is not None and s.backend not in result[label]["backends"]:
                raise ProfileError(f"backend {s.backend} cannot run layer {tuple(key)}: "
                                   f"{result[label]['errors'].get(s.backend)}")
        dense = result["dense"]["backends"][s.backend] if reference is not None else {}
        rows = {}
        for label, key in zip(models, keys):
            row = {k: result[label]["backends"][s.backend][k] for k in STATS}
            rows[key] = row | ({"dense_median": dense["median"], "dense_min": dense["min"]} if dense else {})
            paired = [f"{dense[stat]:.4f}" if dense else "" for stat in ("median", "min")]   # PAIRED's order
            _append_row(self.out / ROWS, LAYER_COLUMNS, [*key, *(f"{row[k]:.4f}" for k in STATS), *paired])
        self.table.rows.update(rows)
        for key, row in rows.items():
            log.debug("profiled %s: %.2f us/step", key, row["median"])
            if self.on_row is not None:
                self.on_row(key, row)

    def plot(self) -> Path:
        return plot_layers(self.table, self.out / PLOT)


def _layer_bytes(key: LayerKey) -> int:
    """The float32 weights of a key's layer (counted on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return 4 * sum(p.numel() for p in layer_model(key.dense).parameters())


def _chunks(keys: list[LayerKey], reserve: LayerKey | None = None) -> list[list[LayerKey]]:
    """``keys`` in runs of at most ``TOGETHER`` layers whose weights (three copies each: the model, its form, the
    backend's), with ``reserve``'s, stay within ``TOGETHER_BYTES``; at least one layer a run."""
    chunks, current, used = [], [], 3 * _layer_bytes(reserve) if reserve is not None else 0
    start = used
    for key in keys:
        size = 3 * _layer_bytes(key)
        if current and (len(current) + (reserve is not None) >= TOGETHER or used + size > TOGETHER_BYTES):
            chunks.append(current)
            current, used = [], start
        current.append(key)
        used += size
    return chunks + ([current] if current else [])


def _check_key(key: LayerKey, settings: LayerSettings) -> None:
    """Sizes in range and the layer's weights (three copies) within memory, before anything is built."""
    SIZE.check("input_size", key.input_size)
    SIZE.check("hidden_size", key.hidden_size)
    if not 0 < key.density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {key.density} in {key}")
    weights = 4 * 4 * key.hidden_size * (key.input_size + key.hidden_size + 2)
    check_memory("hidden_size", key.hidden_size, 3 * weights + 16 * settings.seq_len * key.input_size,
                 f"a {key.cell} layer {key.input_size} -> {key.hidden_size} and its inputs")


def profile_layers(keys: Iterable[LayerKey], out_dir: str | Path, settings: LayerSettings | None = None,
                   on_row: Callable[[LayerKey, dict[str, float]], None] | None = None) -> LayerTable:
    """Measure every layer in ``keys`` into ``out_dir`` (rows already there are kept), plot, return the table."""
    profile_ = LayerProfile(out_dir, settings, on_row)
    table = profile_.ensure(keys)
    (profile_.out / TABLE).write_text(json.dumps(table.to_dict(), indent=2))
    profile_.plot()
    return table


# --- plots --------------------------------------------------------------------------------------------------
def _axes():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt, *plt.subplots(figsize=(8, 4.5))


def _mark(ax, table: LatencyTable, color: str, label: bool) -> None:
    """Hysteresis points (filled) and valleys (open circles) of one curve."""
    points = table.hysteresis()
    if points:
        ax.scatter([p["size"] for p in points], [p["latency"] for p in points], color=color, s=16, zorder=3,
                   label="faster than a smaller size" if label else None)
    valleys = table.valleys()
    ax.scatter(valleys, [table.rows[s]["median"] for s in valleys], facecolors="none", edgecolors=color, s=60,
               zorder=3, label="valley (local minimum)" if label else None)


def plot(table: LatencyTable, path: str | Path) -> Path:
    """Latency against size (median line, quartile band) with the hysteresis points and the valleys marked."""
    plt, fig, ax = _axes()
    sizes = table.sizes
    ax.plot(sizes, [table.rows[s]["median"] for s in sizes], lw=1.2, label="median")
    if all("p25" in r and "p75" in r for r in table.rows.values()):
        ax.fill_between(sizes, [table.rows[s]["p25"] for s in sizes], [table.rows[s]["p75"] for s in sizes],
                        alpha=0.3, label="p25-p75")
    if sizes:
        _mark(ax, table, "red", label=True)
    s = table.settings
    ax.set(xlabel="layer size", ylabel="us per time step (batch 1)",
           title=f"{s.get('backend', '?')}, {s.get('num_layers', '?')} layer(s), {s.get('form', '?')}, "
                 f"{s.get('threads', '?')} thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_layers(table: LayerTable, path: str | Path, most: int = 12) -> Path:
    """Latency against hidden size, one line per (cell, input size, form) with two or more sizes (at most
    ``most``), hysteresis points filled and valleys circled."""
    plt, fig, ax = _axes()
    series = sorted({(k.cell, k.input_size, k.matrices, k.density) for k in table.rows})
    curves = [(s, table.sweep(*s)) for s in series]
    for number, ((cell, inputs, matrices, density), sweep) in enumerate([c for c in curves if len(c[1].sizes) > 1]
                                                                       [:most]):
        form = "dense" if density >= 1 else f"{matrices} sparse {density:g}"
        line, = ax.plot(sweep.sizes, [sweep.rows[h]["median"] for h in sweep.sizes], lw=1.2,
                        label=f"{cell}, input {inputs}, {form}")
        _mark(ax, sweep, line.get_color(), label=number == 0)
    s = table.settings
    ax.set(xlabel="hidden size", ylabel="us per time step (batch 1), one layer",
           title=f"{s.get('backend', '?')}, {s.get('threads', '?')} thread(s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
