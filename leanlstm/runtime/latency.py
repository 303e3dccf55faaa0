"""Measured batch-1 latency: microseconds per time step, per backend, in one interleaved run.

Every sample runs a whole sequence of ``seq_len`` steps from a zero state and divides by ``seq_len``.
Backends (and models, in ``measure``) take turns within each repeat, in an order that rotates every
repeat, so drift in the machine's speed (turbo, a neighbour's load) hits all of them alike. Threads are
pinned for PyTorch, Numba and ONNX Runtime; garbage collection is paused while timing.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from ..graph import find_lstms
from ..nn import WeightForm
from .backends import get_backend
from .pipeline import Pipeline, pipeline_of

log = logging.getLogger(__name__)

DEFAULT_BACKENDS = ("leanlstm", "torch", "onnxruntime")
MIN_SAMPLE_SECONDS = 1e-3    # short sequences are repeated within a sample, to stay well above timer noise


def latency(model: nn.Module, backends: Sequence[str] = DEFAULT_BACKENDS, seq_len: int = 35,
            repeats: int = 30, warmup: int = 3, threads: int = 1, seed: int = 0, warm: bool = False
            ) -> dict[str, Any]:
    """Per-step latency of the whole ``model`` (anything ``runtime.compile`` runs) on each backend, batch 1;
    ``warm`` as in ``measure`` (each sample right after an untimed run on the same backend).

    Returns ``{"backends": {name: {"median", "p25", "p75", "iqr", "min", "max", "samples"}}, "errors":
    {name: message}, "seq_len", "threads", ...}``, all times in microseconds per time step. A backend
    that cannot run the model (or a model the runtime cannot read) is reported under ``errors`` instead of
    stopping the others.

    >>> import leanlstm
    >>> result = latency(leanlstm.LSTM(8, 16), backends=("leanlstm",), seq_len=5, repeats=3)
    >>> sorted(result["backends"]["leanlstm"])
    ['iqr', 'max', 'median', 'min', 'p25', 'p75', 'samples']
    """
    result = measure({"model": model}, backends, seq_len, repeats, warmup, threads, seed, warm)
    return {**{k: v for k, v in result.items() if k != "models"}, **result["models"]["model"]}


def measure(models: Mapping[str, nn.Module], backends: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_BACKENDS,
            seq_len: int = 35, repeats: int = 30, warmup: int = 3, threads: int = 1, seed: int = 0,
            warm: bool = False) -> dict[str, Any]:
    """``latency`` for several models at once, all (model, backend) pairs interleaved in one run.

    ``backends`` is one list for every model or a mapping from model label to its own list. Returns the
    settings plus ``{"models": {label: {"backends": ..., "errors": ...}}}``.

    Taking turns, each sample starts after the other pairs' runs have filled the caches with their own weights: a
    model whose weights fit in cache pays to fetch them again at the start of each sample, a model that streams its
    weights from beyond the cache at every step pays little more. ``warm=True`` runs each pair once, untimed, just
    before each of its samples: the steady state of a model called again and again, as a server running one model
    sees it, still interleaved against the host's drift. (Intel Xeon, the 40x int8 block stack of BENCHMARKS.md's
    row M9, 35 steps, six runs of each: 21.9-22.9 us a step taking turns, 14.5-18.6 warm; the dense stack on ONNX
    Runtime int8 91.5-105.7 against 68.3-90.1.)
    """
    if seq_len < 1 or repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"need seq_len >= 1, repeats >= 1, warmup >= 0 and threads >= 1; got seq_len={seq_len}, "
                         f"repeats={repeats}, warmup={warmup}, threads={threads}")
    if not isinstance(backends, Mapping):
        backends = {label: backends for label in models}
    backends = {label: list(backends.get(label, ())) for label in models}
    for name in {name for names in backends.values() for name in names}:
        get_backend(name)                                   # unknown names fail before any work
    with pinned_threads(threads):
        runners, errors = _build_runners(models, backends, seq_len, threads, seed)
        samples = _interleave(runners, seq_len, repeats, warmup, errors, warm)
    report = {label: {"backends": {}, "errors": errors.get(label, {})} for label in models}
    for (label, name), values in samples.items():
        report[label]["backends"][name] = summarise(values)
    return {"unit": "us per time step", "batch": 1, "seq_len": seq_len, "repeats": repeats, "warmup": warmup,
            "warm": warm, "threads": threads, "machine": machine_info(), "models": report}


def stack_and_model(models: Mapping[str, nn.Module], backends: Sequence[str] = ("leanlstm", "onnxruntime"),
                    seq_len: int = 35, repeats: int = 30, threads: int = 1, warm: bool = False) -> dict[str, Any]:
    """Latency of each model whole (embedding, LSTM stacks, heads) and of its LSTM stacks alone.

    All (model, part, backend) triples take turns in one interleaved run, so the ratios between models
    compare like with like. A model that is only LSTM stacks is timed once, as ``"lstm"``. Returns the
    settings plus ``{"models": {label: {"lstm": {backend: stats}, "model": {backend: stats}, "errors":
    {"lstm/backend": message}}}}``.
    """
    parts, failed = {}, {}
    for label, model in models.items():
        try:
            pipeline = pipeline_of(model)
        except ValueError as error:             # reported, as a backend that cannot run it would be; a single
            failed[label] = f"{type(error).__name__}: {error}"          # stack is still timed on its own
            stacks = find_lstms(model)
            if len(stacks) == 1:
                parts[f"{label}\0lstm"] = pipeline_of(stacks[0][1]).recurrent_only()
            continue
        parts[f"{label}\0lstm"] = pipeline.recurrent_only()
        if pipeline.tokens or len(pipeline.stages) > len(pipeline.stacks):
            parts[f"{label}\0model"] = pipeline
    result = measure(parts, backends, seq_len=seq_len, repeats=repeats, threads=threads, warm=warm)
    report = {label: {"lstm": {}, "model": {}, "errors": {}} for label in models}
    for label, message in failed.items():
        report[label]["errors"] = {f"model/{name}": message for name in backends}
    for key, measured in result.pop("models").items():
        label, part = key.split("\0")
        report[label][part] = measured["backends"]
        report[label]["errors"] |= {f"{part}/{name}": message for name, message in measured["errors"].items()}
    return {**result, "models": report}


def medians(stats: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{backend: median}`` of a ``{backend: stats}`` mapping."""
    return {name: values["median"] for name, values in stats.items()}


def _build_runners(models: Mapping[str, nn.Module], backends: Mapping[str, list[str]], seq_len: int, threads: int,
                   seed: int) -> tuple[dict[tuple[str, str], Callable], dict[str, dict[str, str]]]:
    runners, errors = {}, {}
    for label, model in models.items():
        try:
            model = pipeline_of(model)                      # read once; every backend runs the same pipeline
            inputs = example_inputs(model, seq_len, seed)
        except Exception as error:  # noqa: BLE001 - a model no backend can run is reported, not fatal
            errors[label] = {name: f"{type(error).__name__}: {error}" for name in backends[label]}
            continue
        for name in backends[label]:
            try:
                with torch.no_grad():
                    runners[label, name] = get_backend(name)(model, inputs, threads)
            except Exception as error:  # noqa: BLE001 - one backend failing must not stop the others
                log.warning("%s on %s: cannot run (%s: %s)", label, name, type(error).__name__, error)
                errors.setdefault(label, {})[name] = f"{type(error).__name__}: {error}"
    return runners, errors


def example_inputs(model: nn.Module | Pipeline, seq_len: int, seed: int = 0) -> np.ndarray:
    """Random inputs for one sequence: (T,) token ids for a model that starts with an embedding, else
    (T, input) floats."""
    pipeline, rng = pipeline_of(model), np.random.default_rng(seed)
    if pipeline.tokens:
        return rng.integers(0, pipeline.embedding.num_embeddings, seq_len).astype(np.int64)
    return rng.standard_normal((seq_len, pipeline.input_size)).astype(np.float32)


def _interleave(runners: dict[Any, Callable], seq_len: int, repeats: int, warmup: int,
                errors: dict[str, dict[str, str]], warm: bool = False) -> dict[Any, list[float]]:
    """Microseconds per step of each runner, taking turns in a rotating order; with ``warm`` each sample follows
    one untimed run of the same runner."""
    inner = {}
    for key, run in list(runners.items()):
        try:
            inner[key] = _calibrate(run, warmup)
        except Exception as error:  # noqa: BLE001
            log.warning("%s on %s: failed while warming up (%s)", *key, error)
            errors.setdefault(key[0], {})[key[1]] = f"{type(error).__name__}: {error}"
            del runners[key]
    keys, samples = list(runners), {key: [] for key in runners}
    with _gc_paused():
        for repeat in range(repeats):
            shift = repeat % max(len(keys), 1)
            for key in keys[shift:] + keys[:shift]:
                run, count = runners[key], inner[key]
                if warm:
                    run()
                start = time.perf_counter_ns()
                for _ in range(count):
                    run()
                samples[key].append((time.perf_counter_ns() - start) / 1e3 / count / seq_len)
    return samples


def _calibrate(run: Callable, warmup: int) -> int:
    """Warm up (compilation, caches) and return how many runs one sample needs, timed on a run after the
    warm-up: the first run may include compiling."""
    for _ in range(max(warmup, 1)):
        run()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(seconds, 1e-9)))


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min and max of latency samples."""
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75), "iqr": float(p75 - p25),
            "min": float(np.min(values)), "max": float(np.max(values)), "samples": len(values)}


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run PyTorch and Numba with ``threads`` threads (ONNX Runtime sessions get it at creation)."""
    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_now() -> dict[str, Any]:
    """How busy the machine is: the load averages lag by a minute, the count of runnable processes (this one
    included) does not. Timed with the training jobs paused (SIGSTOP), it reads 1."""
    try:
        with open("/proc/loadavg") as loadavg:
            runnable = int(loadavg.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        runnable = None
    return {"load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "runnable": runnable}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including the load at the time (a busy machine reads slow)."""
    import onnxruntime

    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model_name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name, "cpus": os.cpu_count(), "platform": platform.platform(),
            **load_now(),
            "versions": {"numpy": np.__version__, "numba": numba.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")
                    if k in os.environ}}


def model_size(model: nn.Module) -> dict[str, int]:
    """Stored parameters and bytes of a model: weight forms count what they store (index overhead
    included), everything else four bytes a parameter."""
    forms = [m for m in model.modules() if isinstance(m, WeightForm)]
    nested = {id(child) for form in forms for child in form.modules() if child is not form}
    forms = [form for form in forms if id(form) not in nested]     # a doped form counts its parts itself
    inside = {id(p) for form in forms for p in form.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    nbytes = sum(form.nbytes() for form in forms) + 4 * other
    return {"params": sum(form.stored_params() for form in forms) + other, "bytes": nbytes}
