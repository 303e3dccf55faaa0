"""Numba's cache of the package's kernels is keyed on the source they are made of, so that a change to a function
or constant a kernel takes from another module recompiles the kernel (Numba's own key, its file's time stamp, does
not)."""
import numpy as np
from numba import njit

from leanlstm.runtime import blocksparse_ops, int8, kernel_cache


def test_a_package_kernel_is_keyed_on_the_digest_of_every_numba_module():
    for kernel in (int8.int8_gemv, blocksparse_ops.int8_blocksparse_gemv):
        locator = kernel._cache._impl._locator
        assert locator.get_source_stamp() == ("leanlstm-kernels", kernel_cache.kernel_digest())


def test_a_function_outside_the_package_keeps_numbas_own_key(tmp_path, monkeypatch):
    source = tmp_path / "user_kernel.py"
    source.write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_kernel
    assert user_kernel.twice(np.float32(2)) == 4
    stamp = user_kernel.twice._cache._impl._locator.get_source_stamp()
    assert stamp[0] != "leanlstm-kernels"
    assert njit(lambda x: x)(1) == 1             # uncached functions are untouched


def test_the_digest_follows_any_numba_module_and_the_kernel_folders_and_ignores_the_others(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "nn").mkdir()
    kernel, helper, plain = package / "k.py", package / "sub" / "h.py", package / "plain.py"
    constants = package / "nn" / "gates.py"
    constants.write_text("NUM_GATES = 4\n")
    kernel.write_text("from numba import njit\n")
    helper.write_text("import numba  # inlined by k\nA = 1\n")
    plain.write_text("B = 1\n")
    monkeypatch.setattr(kernel_cache, "PACKAGE", package)

    digest = kernel_cache.kernel_digest.__wrapped__          # uncached: the package's own digest stays as it is

    first = digest()
    plain.write_text("B = 2\n")
    assert digest() == first                      # no Numba code: no recompilation
    helper.write_text("import numba  # inlined by k\nA = 2\n")
    second = digest()
    assert second != first
    kernel.write_text("from numba import njit  # changed\n")
    third = digest()
    assert third not in (first, second)
    constants.write_text("NUM_GATES = 5\n")            # no Numba there, but kernels compile its constants in
    assert digest() not in (first, second, third)


def test_install_is_idempotent():
    before = list(kernel_cache.caching.CacheImpl._locator_classes)
    kernel_cache.install()
    assert kernel_cache.caching.CacheImpl._locator_classes == before
