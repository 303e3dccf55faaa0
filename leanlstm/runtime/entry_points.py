"""Layer loops with their weight kernels fixed in code, cached on disk so that a new process starts fast.

The layer loops (``kernels.layer_run``, ``hlstm_cell.hlstm_layer_run``, ...) take each matrix's product kernels as
first-class function arguments, and Numba cannot cache a function compiled for function-typed arguments: every
process would compile them again, seconds for a 2-layer LSTM. ``specialise`` writes, once per combination of
kernels, a small module holding the layer loop's own code with those kernels as global names, compiled with
``cache=True``; later processes load its machine code from Numba's cache. ``generated_kernels`` does the same for
kernels composed of other kernels (a doped matrix's ``S + D``).

The generated files live in ``cache_dir()`` (``$LEANLSTM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/leanlstm/kernels``,
default ``~/.cache/leanlstm/kernels``); Numba keeps its cache beside them (or under ``$NUMBA_CACHE_DIR``). A file's
name is a digest of its text, of the package's kernel source (``kernel_cache.kernel_digest``, with the Numba and
Python versions) and of the modules of the kernels it names, so a changed kernel never runs from a stale cache. Kernels a new process cannot import by
name (closures, ``__main__``) are compiled in the process as before, as is everything when the folder cannot be
written.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numba
from numba.core.dispatcher import Dispatcher

from ..files import atomic_write
from .kernel_cache import kernel_digest

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where generated entry points (and, next to them, Numba's cache of them) are kept."""
    if os.environ.get("LEANLSTM_KERNEL_CACHE"):
        return Path(os.environ["LEANLSTM_KERNEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leanlstm" / "kernels"


def specialise(target: Dispatcher, fixed: Sequence[Any], *rest: Any) -> tuple[Callable, tuple[Any, ...]]:
    """``(call, args)`` such that ``call(*args, *rest)`` computes ``target(*fixed, *rest)``, bound to the types of
    ``rest`` (see ``cells.bind``).

    Every kernel (a Numba dispatcher) among ``fixed`` is fixed in the code of a generated, disk-cached entry point
    and dropped from ``args``; when some kernel cannot be named, ``call`` is ``target``
    itself (compiled in this process, not cached) and ``args`` is ``fixed``.

    >>> import numpy as np
    >>> from leanlstm.runtime import kernels
    >>> op = kernels.dense_op(np.eye(2, dtype=np.float32))
    >>> call, args = specialise(kernels.layer_step, (op.matvec, op.arrays, op.matvec, op.arrays, None, (),
    ...                                              np.zeros(8, np.float32)), *[np.zeros(2, np.float32)] * 3)
    >>> len(args)     # the two kernel arguments are now part of the entry point's code
    5
    """
    from .cells import bind

    constant = tuple(isinstance(value, Dispatcher) for value in fixed)
    names = [_importable(value) for value, fixed_here in zip(fixed, constant) if fixed_here]
    entry = None
    if _importable(target) is not None and None not in names:
        try:
            entry = _entry_point(target, tuple(fixed), constant)
        except OSError as error:        # a read-only cache folder: compile in this process as before
            log.debug("kernel cache %s not usable (%s); compiling in this process", cache_dir(), error)
    if entry is None:
        return bind(target, *fixed, *rest), tuple(fixed)
    args = tuple(value for value, fixed_here in zip(fixed, constant) if not fixed_here)
    return bind(entry, *args, *rest), args


def generated_kernels(body: str, kernels: dict[str, Dispatcher], constants: dict[str, Any], options: dict[str, Any]
                      ) -> Any:
    """The kernels ``body`` defines (source of ``@njit(**OPTIONS)`` functions that call ``kernels`` and read
    ``constants`` by name), as attributes: from a generated module that Numba caches on disk when every kernel can
    be named, else compiled in this process (closures over the kernels, as before caching).

    >>> import numpy as np
    >>> from leanlstm.runtime import kernels
    >>> body = '''
    ... @njit(**OPTIONS)
    ... def twice(arrays, x, out, flip):
    ...     for _ in range(TIMES):
    ...         once(arrays, x, out, flip)
    ... '''
    >>> op = kernels.dense_op(np.eye(2, dtype=np.float32))
    >>> composed = generated_kernels(body, {"once": op.matvec}, {"TIMES": 2}, kernels.JIT)
    >>> out = np.zeros(2, np.float32); composed.twice(op.arrays, np.ones(2, np.float32), out, False); out.tolist()
    [2.0, 2.0]
    """
    names = {alias: _importable(kernel) for alias, kernel in kernels.items()}
    if None not in names.values():
        source = "\n".join([
            '"""Generated by leanlstm.runtime.entry_points: kernels composed of other kernels. Do not edit."""',
            "from numba import njit", *(f"from {m} import {n} as {alias}" for alias, (m, n) in names.items()), "",
            *(f"{name} = {value!r}" for name, value in constants.items()),
            f"OPTIONS = {options | {'cache': True}!r}", "", "", body])
        try:
            return _load(source, tuple(sorted({m for m, _ in names.values()})))
        except OSError as error:
            log.debug("kernel cache %s not usable (%s); compiling in this process", cache_dir(), error)
    namespace = {"njit": numba.njit, "OPTIONS": {k: v for k, v in options.items() if k != "cache"}, **kernels,
                 **constants}
    exec(body, namespace)     # noqa: S102 - our own kernel source, with our own kernels bound
    return SimpleNamespace(**namespace)


def _importable(kernel: Any) -> tuple[str, str] | None:
    """``(module, name)`` under which a fresh process imports ``kernel``, or None (closures, ``__main__``)."""
    function = getattr(kernel, "py_func", None)
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if module in (None, "__main__") or "." in name or "<" in name:
        return None
    return (module, name) if getattr(sys.modules.get(module), name, None) is kernel else None


def _entry_point(target: Dispatcher, fixed: tuple, constant: tuple[bool, ...]) -> Dispatcher:
    """The generated entry point: ``target``'s own code with its constant kernel parameters turned into globals
    (a kernel passed as a value would embed a process address, which Numba refuses to cache)."""
    module, name = _importable(target)
    tree = ast.parse(textwrap.dedent(inspect.getsource(target.py_func)))
    function = tree.body[0]
    parameters = function.args.args
    aliases: dict[tuple[str, str], str] = {}          # (module, name) of each distinct kernel -> its name here
    assignments = []
    for parameter, value, fixed_here in zip(parameters, fixed, constant):
        if fixed_here:
            alias = aliases.setdefault(_importable(value), f"kernel_{len(aliases)}")
            assignments.append(f"{parameter.arg} = {alias}")
    function.args.args = [p for p, fixed_here in zip(parameters, constant + (False,) * len(parameters))
                          if not fixed_here]
    function.name, function.decorator_list = "entry", []
    imports = [f"from {m} import {n} as {alias}" for (m, n), alias in aliases.items()]
    source = "\n".join([
        f'"""Generated by leanlstm.runtime.entry_points: {module}.{name} with fixed kernels. Do not edit."""',
        "import importlib", "", "from numba import njit", *imports, "",
        f"globals().update({{k: v for k, v in vars(importlib.import_module({module!r})).items() "
        f"if not k.startswith('__')}})", *assignments, "", "",
        f"@njit({_options(target)})", ast.unparse(function), ""])
    return _load(source, tuple(sorted({module, *(m for m, _ in aliases)}))).entry


def _options(target: Dispatcher) -> str:
    """The target's own compiler options (fastmath, error model, ...), plus ``cache=True``."""
    options = {k: v for k, v in target.targetoptions.items() if k != "nopython" and isinstance(v, (bool, str, int))}
    return ", ".join(f"{k}={v!r}" for k, v in sorted((options | {"cache": True}).items()))


@lru_cache(maxsize=None)
def _load(source: str, modules: tuple[str, ...]) -> ModuleType:
    digest = hashlib.sha256(source.encode())
    digest.update(_sources_digest(tuple(modules)).encode())
    name = f"entry_{digest.hexdigest()[:24]}"
    path = cache_dir() / f"{name}.py"
    if not path.is_file():
        atomic_write(path, lambda handle: handle.write(source.encode()))
    spec = importlib.util.spec_from_file_location(f"leanlstm_{name}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded     # Numba's cache re-imports the module of what it loads, by name
    spec.loader.exec_module(loaded)
    return loaded


@lru_cache(maxsize=None)
def _sources_digest(modules: tuple[str, ...]) -> str:
    """Digest of the package's kernel source with the compiler versions (``kernel_cache.kernel_digest``) and of the
    given modules' source (a kernel may come from outside the package)."""
    digest = hashlib.sha256(kernel_digest().encode())
    for module in modules:
        digest.update(Path(sys.modules[module].__file__).read_bytes())
    return digest.hexdigest()
