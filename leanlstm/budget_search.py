"""Compress to a latency budget by trying every applicable method: ``leanlstm compress --latency-budget-us N --from
RUN --out DIR`` without ``--method`` (``leanlstm.budget_search.search``).

For each candidate method, in order:

1. **Size** it to the budget before any training. A method with a latency budget of its own takes it (symbiotic's
   ``latency_budget_us`` on the backend; ISS's ``target_latency_us``, which is the leanlstm engine's latency); a
   method with a strength knob (``compression``, AntMan's ``reduction``) is applied to a copy of the trained model
   and finalized at once at each value of a geometric ladder (magnitude masks, fitted factors: the structure its
   training ends in), and the weakest value whose LSTM stacks measure within ``budget x (1 - margin)`` wins; a
   method with neither (int8 post-training quantisation) is taken as it is. A method that no ladder value brings
   within the budget is left out, with the fastest it reached.
2. **Train** each sized method on a short schedule (``epochs`` + ``finetune_epochs``; a method that trains no
   epochs by default, int8, keeps its own), each a run directory under ``DIR``, resumable like any run.
3. **Measure** every trained candidate and the dense model in one interleaved run on the backend (methods whose
   weights are int8 on the backend's int8 variant: ``leanlstm-int8``, ``onnxruntime-int8``, ``torch-int8``), and
   write the front to ``DIR/search.json``: validation and test metric, LSTM parameters, measured latency, within
   the budget or not. The dense model is a point of the front too: a budget it already meets needs no
   compression, and the search says so by picking it.

The pick is the candidate within the budget with the best *validation* metric: the test split is reported, never
chosen on. The budget is the LSTM stacks' latency per step (batch 1), as for symbiotic and ISS: embeddings and heads
are not counted, since no method changes them. Sizing decisions are saved before training, so an interrupted
search continues with the same candidates (``--resume``), even if re-measuring would now choose others.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from .compress import compress_
from .files import read_json, write_json
from .methods import config_for, get_method
from .runs import METRICS, RunConfig, RunDirError, compress_run, load_run, read_config, read_metrics
from .runtime.backends import BACKENDS, get_backend
from .runtime.latency import machine_info, measure
from .runtime.pipeline import pipeline_of
from .train import ConfigError, Range

log = logging.getLogger(__name__)

SEARCH = "search.json"
DEFAULT_METHODS = ("int8", "prune", "doped-kp", "iss", "symbiotic")
KNOBS = ("compression", "reduction")        # a method's strength, larger = smaller and (usually) faster
BUDGETS = ("latency_budget_us", "target_latency_us")   # a method's own latency budget (ISS's: the engine's)
LADDER = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class BudgetSearch:
    """What to search: the budget, the backend it holds on, the candidates and their short schedule.

    >>> BudgetSearch(latency_budget_us=40).methods
    ['int8', 'prune', 'doped-kp', 'iss', 'symbiotic']
    """

    latency_budget_us: float = 0.0      # per-step latency (us, batch 1) of the LSTM stacks; required
    backend: str = "leanlstm"           # where the budget holds (int8 methods run on its int8 variant)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int = 2                     # compression-phase epochs of each candidate
    finetune_epochs: int = 1            # fine-tuning epochs of each candidate
    ladder: list[float] = field(default_factory=lambda: list(LADDER))   # knob values tried, weakest first
    margin: float = 0.1                 # a knob's structure must measure within budget x (1 - margin)
    repeats: int = 15                   # timed sequences per measurement
    seq_len: int = 35
    threads: int = 1

    def __post_init__(self) -> None:
        Range(0, 1e9, low_open=True, note="required: > 0").check("latency_budget_us", self.latency_budget_us)
        get_backend(self.backend)
        if not self.methods:
            raise ConfigError("methods", self.methods, "name at least one method")
        for name in self.methods:
            get_method(name)
        Range(0, 10**6, integer=True).check("epochs", self.epochs)
        Range(0, 10**6, integer=True).check("finetune_epochs", self.finetune_epochs)
        Range(0, 1, high_open=True).check("margin", self.margin)
        for name in ("repeats", "seq_len", "threads"):
            Range(1, 10**6, integer=True).check(name, getattr(self, name))
        if not self.ladder or any(value <= 1 for value in self.ladder):
            raise ConfigError("ladder", self.ladder, "hold strengths above 1")
        self.ladder = sorted(self.ladder)


def budget_field(method_type: Any) -> str | None:
    """The config field in which a method takes a latency budget of its own, or None.

    >>> from leanlstm.methods import get_method
    >>> budget_field(get_method("symbiotic")), budget_field(get_method("iss")), budget_field(get_method("prune"))
    ('latency_budget_us', 'target_latency_us', None)
    """
    names = {f.name for f in fields(method_type.Config())}
    return next((name for name in BUDGETS if name in names), None)


# --- where each method runs ---------------------------------------------------------------------------------------
def candidate_backend(method: Any, backend: str) -> str:
    """The backend a method's result is timed on: its own precision's variant of ``backend`` when there is one
    (int8 weights: ``leanlstm`` -> ``leanlstm-int8``), else ``backend``.

    >>> from leanlstm.methods import get_method
    >>> candidate_backend(get_method("int8")(), "onnxruntime"), candidate_backend(get_method("prune")(), "torch")
    ('onnxruntime-int8', 'torch')
    """
    primary = method.latency_backends[0]
    if primary.startswith("leanlstm") and primary != "leanlstm":
        variant = backend + primary[len("leanlstm"):]
        if variant in BACKENDS:
            return variant
    return backend


def stack_latency(models: dict[str, nn.Module], backends: dict[str, str], config: BudgetSearch) -> dict[str, Any]:
    """Per-step latency of each model's LSTM stacks on its backend, one interleaved run: ``{label: us or error}``."""
    stacks = {label: pipeline_of(copy.deepcopy(model).cpu().eval()).recurrent_only() for label, model in models.items()}
    result = measure(stacks, {label: [backends[label]] for label in stacks}, seq_len=config.seq_len,
                     repeats=config.repeats, threads=config.threads)["models"]
    out = {}
    for label, measured in result.items():
        stats = measured["backends"].get(backends[label])
        out[label] = stats["median"] if stats else measured["errors"].get(backends[label], "not measured")
    return out


# --- 1. sizing ----------------------------------------------------------------------------------------------------
def size_method(name: str, model: nn.Module, config: BudgetSearch) -> dict[str, Any]:
    """The settings that bring ``name`` within the budget, decided before training, with why.

    Returns ``{"method", "settings", "backend", "how", "structure_us", "note"}``; ``settings`` is None when the
    method cannot reach the budget (``note`` says how close it came)."""
    method_type = get_method(name)
    defaults = method_type.Config()
    names = {f.name for f in fields(defaults)}
    backend = candidate_backend(method_type(defaults), config.backend)
    row = {"method": name, "backend": backend, "settings": None, "structure_us": None, "note": ""}
    own = budget_field(method_type)
    if own is not None:
        if "backend" not in names and config.backend != "leanlstm":
            return row | {"how": "its own budget", "note": f"its latency target is the leanlstm engine's, not "
                                                           f"{config.backend}'s"}
        settings = {own: config.latency_budget_us} | ({"backend": config.backend} if "backend" in names else {})
        return row | {"settings": settings, "how": "its own budget"}
    knob = next((k for k in KNOBS if k in names), None)
    if knob is None:
        us, aim = _structure_us(name, {}, model, backend, config), config.latency_budget_us * (1 - config.margin)
        fits = isinstance(us, float) and us <= aim
        return row | {"settings": {} if fits else None, "how": "as it is", "structure_us": us,
                      "note": "" if fits else f"runs {_us(us)} per step on {backend}, over the budget less its "
                                              f"margin ({aim:.2f} us)"}
    return _ladder(row, name, knob, model, config)


def _ladder(row: dict[str, Any], name: str, knob: str, model: nn.Module, config: BudgetSearch) -> dict[str, Any]:
    target, fastest = config.latency_budget_us * (1 - config.margin), math.inf
    for value in config.ladder:
        us = _structure_us(name, {knob: value}, model, row["backend"], config)
        if isinstance(us, str):     # the method cannot build this strength (budget unreachable, form refused)
            log.info("search: %s at %s=%g: %s", name, knob, value, us)
            break
        log.info("search: %s at %s=%g runs %.2f us per step on %s (aim: %.2f)", name, knob, value, us,
                 row["backend"], target)
        fastest = min(fastest, us)
        if us <= target:
            return row | {"settings": {knob: value}, "how": f"{knob} ladder", "structure_us": us}
    reached = f"{fastest:.2f} us" if math.isfinite(fastest) else "nothing it could build"
    return row | {"how": f"{knob} ladder", "note": f"no {knob} in {config.ladder[0]:g}-{config.ladder[-1]:g} brings "
                                                   f"it within the budget on {row['backend']} (fastest: {reached})"}


def _structure_us(name: str, settings: dict[str, Any], model: nn.Module, backend: str,
                  config: BudgetSearch) -> float | str:
    """The latency of the structure ``name`` with ``settings`` ends in, built on a copy of ``model`` (or why it
    cannot be built)."""
    method_type = get_method(name)
    names = {f.name for f in fields(method_type.Config())}
    extra = {k: v for k, v in (("total_steps", 1), ("speed_check", False)) if k in names}
    trial = copy.deepcopy(model).cpu()
    try:
        handle = compress_(trial, config_for(name, settings | extra))
        if method_type.has_finetune:
            handle.finalize()
    except ValueError as error:
        return str(error)
    us = stack_latency({name: trial}, {name: backend}, config)[name]
    return us if isinstance(us, float) else f"cannot run on {backend}: {us}"


def _us(value: Any) -> str:
    return f"{value:.2f} us" if isinstance(value, float) else str(value)


# --- 2. training and 3. the front ---------------------------------------------------------------------------------
def search(source: str | Path, out: str | Path, config: BudgetSearch, resume: bool = False, progress: bool = True,
           run_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, train and measure every candidate; write and return ``DIR/search.json`` with the pick.

    ``run_options`` are ``RunConfig`` fields every candidate run shares (``data_dir``, ``max_tokens``,
    ``verify_data``, ``overrides``: the training settings beyond the epochs)."""
    out = Path(out)
    origin = read_config(source)
    task = origin.task_type()
    read_metrics(source, (f"val_{task.metric}", f"test_{task.metric}"))   # a finished run, checked now
    model = load_run(source)[1]
    saved = read_json(out / SEARCH, "delete it and search again") if resume and (out / SEARCH).is_file() else None
    if saved is None and out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} is not empty: give a new --out, or --resume to continue the search in it")
    if saved is not None and saved["config"] != asdict(config):
        raise RunDirError(f"{out} holds a search with other settings ({saved['config']}); give a new --out, or the "
                         f"same options as before with --resume")
    out.mkdir(parents=True, exist_ok=True)
    sizing = saved["sizing"] if saved else _size_all(model, config)
    state = {"config": asdict(config), "source": str(source), "task": origin.task, "sizing": sizing}
    write_json(out / SEARCH, state)
    for row in sizing:
        if row["settings"] is not None:
            _train(row, source, origin, out, config, progress, run_options or {})
    state |= _front(model, source, sizing, out, config, task)
    write_json(out / SEARCH, state)
    _report(state, task)
    return state


def _size_all(model: nn.Module, config: BudgetSearch) -> list[dict[str, Any]]:
    rows = []
    for name in config.methods:
        row = size_method(name, model, config)
        log.info("search: %s: %s", name, f"{row['how']}, {row['settings']}" if row["settings"] is not None
                 else f"left out: {row['note']}")
        rows.append(row)
    return rows


def _train(row: dict[str, Any], source: str | Path, origin: RunConfig, out: Path, config: BudgetSearch,
           progress: bool, options: dict[str, Any]) -> None:
    method = get_method(row["method"])
    run_dir = out / row["method"]
    if (run_dir / METRICS).is_file():
        return
    overrides = dict(options.get("overrides", {}))
    finetune = {}
    if method.compress_epochs != 0:      # int8 trains nothing before quantising: keep that
        overrides["epochs"] = config.epochs
    if method.has_finetune and method.finetune_epochs != 0:
        finetune["epochs"] = config.finetune_epochs
    run = RunConfig(task=origin.task, preset=origin.preset, method=row["method"],
                    data_dir=options.get("data_dir", origin.data_dir), max_tokens=options.get("max_tokens"),
                    verify_data=options.get("verify_data", origin.verify_data), overrides=overrides,
                    method_config=config_for(row["method"], row["settings"]).to_dict(), source=str(source),
                    finetune_overrides=finetune, latency_repeats=0,
                    command=f"leanlstm compress --latency-budget-us {config.latency_budget_us:g} (search)")
    log.info("search: training %s in %s", row["method"], run_dir)
    compress_run(run, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), progress=progress)


def _front(dense: nn.Module, source: str | Path, sizing: list[dict[str, Any]], out: Path, config: BudgetSearch,
           task: Any) -> dict[str, Any]:
    """Every trained candidate and the dense model itself (a budget it already meets needs no compression),
    measured in one interleaved run."""
    metric = task.metric
    rows = {"dense": {"run": Path(source), "settings": {}, "backend": config.backend}}
    rows |= {row["method"]: {"run": out / row["method"], "settings": row["settings"], "backend": row["backend"]}
             for row in sizing if row["settings"] is not None}
    models = {"dense": dense} | {name: load_run(row["run"])[1] for name, row in rows.items() if name != "dense"}
    measured = stack_latency(models, {name: row["backend"] for name, row in rows.items()}, config)
    front = []
    for name, row in rows.items():
        metrics = read_metrics(row["run"], (f"val_{metric}", f"test_{metric}", "lstm_params"))
        us = measured[name]
        front.append({"method": name, "run": str(row["run"]), "settings": row["settings"], "backend": row["backend"],
                      f"val_{metric}": metrics[f"val_{metric}"], f"test_{metric}": metrics[f"test_{metric}"],
                      "lstm_params": metrics["lstm_params"], "lstm_compression": metrics.get("lstm_compression", 1.0),
                      "stack_us": us, "within_budget": isinstance(us, float) and us <= config.latency_budget_us,
                      "speedup_vs_dense": measured["dense"] / us if isinstance(us, float)
                      and isinstance(measured["dense"], float) else None})
    sign = -1 if task.higher_is_better else 1
    within = [row for row in front if row["within_budget"]]
    picked = min(within, key=lambda row: sign * row[f"val_{metric}"]) if within else None
    return {"dense_stack_us": measured["dense"], "front": front, "picked": picked and picked["method"],
            "picked_run": picked and picked["run"], "machine": machine_info()}


def _report(state: dict[str, Any], task: Any) -> None:
    metric, budget = task.metric, state["config"]["latency_budget_us"]
    log.info("search on %s, budget %.2f us per step; dense stack %s", state["config"]["backend"], budget,
             _us(state["dense_stack_us"]))
    for row in state["front"]:
        log.info("  %-10s %-16s val %s %.4g  test %.4g  stack %s (%s)%s", row["method"], row["backend"], metric,
                 row[f"val_{metric}"], row[f"test_{metric}"], _us(row["stack_us"]),
                 "within" if row["within_budget"] else "OVER", "  <- picked" if row["method"] == state["picked"]
                 else "")
    for row in state["sizing"]:
        if row["settings"] is None:
            log.info("  %-10s left out: %s", row["method"], row["note"])
    if state["picked"] is None:
        log.warning("search: no trained candidate measured within the budget of %.2f us per step", budget)
