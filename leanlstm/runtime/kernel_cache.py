"""Numba's on-disk cache for leanlstm's kernels, invalidated by any change to the package's Numba code.

Numba keys a cached function on its own file's modification time and size. A kernel that inlines a function from
another module (every int8 product inlines ``int8._quantise_input``; many kernels inline ``kernels``' helpers)
then keeps running the old machine code after a change to that other module, in every process, until its own file
changes too: an edited or pulled source tree (an editable install, a git checkout) can run stale code with no sign
of it. ``install()`` makes every cached function of the package keyed instead on one digest of the source of the
modules kernels are made of (``kernel_digest``: the Numba and Python versions too), so any change to any of them
recompiles every kernel once. The cache stays where Numba would put it (the module's ``__pycache__``, or
``$NUMBA_CACHE_DIR``); functions outside the package keep Numba's own keys.
"""
from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import numba
from numba.core import caching

PACKAGE = Path(__file__).resolve().parent.parent          # leanlstm/


# where the kernels live and the constants they compile in come from (``nn.gates``' gate count, the forms' block
# shapes): every module under these folders counts, changed or not its own Numba code
KERNEL_FOLDERS = ("runtime", "nn")


@lru_cache(maxsize=None)
def kernel_digest() -> str:
    """Digest of every module under ``KERNEL_FOLDERS`` and of any other module of the package whose source
    mentions Numba, with the Numba and Python versions.

    >>> len(kernel_digest())
    64
    """
    digest = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_bytes()
        name = path.relative_to(PACKAGE)
        if name.parts[0] in KERNEL_FOLDERS or b"numba" in source:
            digest.update(str(name).encode() + b"\0" + source)
    return digest.hexdigest()


def _in_package(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().is_relative_to(PACKAGE)
    except OSError:
        return False


class _PackageStamp:
    """A locator mixin: the package's kernel digest in place of the source file's time stamp."""

    def get_source_stamp(self):
        return "leanlstm-kernels", kernel_digest()


def _keyed_on_digest(locator: type) -> type:
    def from_function(cls, py_func, py_file):
        return locator.from_function.__func__(cls, py_func, py_file) if _in_package(py_file) else None
    return type(f"Leanlstm{locator.__name__}", (_PackageStamp, locator),
                {"from_function": classmethod(from_function)})


def install() -> None:
    """Key the cache of every function the package compiles from now on by ``kernel_digest()`` (idempotent; call
    before the first ``njit(cache=True)`` of the package runs: ``leanlstm.runtime`` does, on import)."""
    impl = caching.CacheImpl
    if any(issubclass(cls, _PackageStamp) for cls in impl._locator_classes):
        return
    if os.environ.get("NUMBA_CACHE_LOCATOR_CLASSES"):
        return                     # the user chose the locators: theirs apply (with Numba's own keys)
    impl._locator_classes = [*(_keyed_on_digest(cls) for cls in impl._locator_classes), *impl._locator_classes]
