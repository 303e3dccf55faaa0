"""A fresh process loads the engine's layer loops from the disk cache instead of compiling them again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leanlstm.runtime import kernels
from leanlstm.runtime.entry_points import generated_kernels, specialise

REPO = Path(__file__).resolve().parents[2]

# A stack with a dense, a sparse and a doped (composed Kronecker + sparse kernels) matrix; prints the first
# call's time and the Numba cache hits and misses of every generated entry point and composed kernel.
CHILD = r"""
import json, sys, time
import numpy as np, torch
from leanlstm.nn import LSTM
from leanlstm.nn.forms import Doped, MaskedSparse
from leanlstm import runtime

torch.manual_seed(0)
lstm = LSTM(16, 32, 2).eval()
layer = lstm.layers[1]
layer.weight_ih = MaskedSparse.from_dense(layer.weight_ih.materialize().detach(), density=0.2)
layer.weight_hh = Doped.from_dense(layer.weight_hh.materialize().detach(), "kronecker", density=0.05)
x = np.ones((5, 16), np.float32)
start = time.perf_counter()
engine = runtime.compile(lstm)
y, _ = engine.run(x)
stream = engine.stream()
stream.step(x[0])
seconds = time.perf_counter() - start
dispatchers = [k for name, m in list(sys.modules.items()) if name.startswith("leanlstm_entry_")
               for k in vars(m).values() if hasattr(k, "stats") and k.py_func.__module__ == name]
hits = sum(sum(d.stats.cache_hits.values()) for d in dispatchers)
misses = sum(sum(d.stats.cache_misses.values()) for d in dispatchers)
print(json.dumps({"seconds": seconds, "hits": hits, "misses": misses, "kernels": len(dispatchers),
                  "y": y[-1].tolist()}))
"""


def _fresh_process(cache: Path) -> dict:
    env = dict(os.environ, LEANLSTM_KERNEL_CACHE=str(cache), NUMBA_CACHE_DIR=str(cache / "numba"))
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NumbaWarning" not in done.stderr, done.stderr[-2000:]    # e.g. "Cannot cache compiled function"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_fresh_process_loads_every_layer_kernel_from_the_cache(tmp_path):
    first = _fresh_process(tmp_path)
    second = _fresh_process(tmp_path)
    # run and step of 2 layers, plus the doped matrix's composed matvec and matmat
    assert first["kernels"] == second["kernels"] == 6
    assert first["misses"] >= 4 and first["hits"] == 0
    # the 4 layer entry points load; the composed kernels are compiled into them, so nothing else is asked for
    assert second["misses"] == 0 and second["hits"] == 4
    assert second["y"] == first["y"]
    assert second["seconds"] < first["seconds"] / 2
    assert list(tmp_path.glob("entry_*.py")) and list((tmp_path / "numba").rglob("entry_*.nbi"))


def test_entry_points_compute_what_the_layer_loop_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLSTM_KERNEL_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    ih, hh = (kernels.dense_op(rng.standard_normal((32, n)).astype(np.float32)) for n in (4, 8))
    fixed = (ih.matvec, ih.matmat, ih.arrays, hh.matvec, hh.arrays, None, (), np.zeros(32, np.float32))
    xs = rng.standard_normal((6, 4)).astype(np.float32)
    outs = []
    for call, args in (specialise(kernels.layer_run, fixed, xs, *_state(), np.empty((6, 8), np.float32), False),
                       (kernels.layer_run, fixed)):
        h, c = _state()
        out = np.empty((6, 8), np.float32)
        call(*args, xs, h, c, out, False)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len(specialise(kernels.layer_run, fixed, xs, *_state(), outs[0], False)[1]) == 5   # kernels fixed


def test_kernels_that_cannot_be_named_compile_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLSTM_KERNEL_CACHE", str(tmp_path))
    op = kernels.dense_op(np.eye(2, dtype=np.float32))
    closure = kernels.njit(lambda arrays, x, out, flip: kernels.dense_matvec(arrays, x, out, flip))
    made = generated_kernels("@njit(**OPTIONS)\ndef twice(arrays, x, out, flip):\n    once(arrays, x, out, flip)\n"
                             "    once(arrays, x, out, flip)\n", {"once": closure}, {}, kernels.JIT)
    out = np.zeros(2, np.float32)
    made.twice(op.arrays, np.ones(2, np.float32), out, False)
    assert out.tolist() == [2.0, 2.0] and not list(tmp_path.glob("entry_*.py"))
    fixed = (closure, op.arrays, op.matvec, op.arrays, None, (), np.zeros(8, np.float32))
    call, args = specialise(kernels.layer_step, fixed, np.ones(2, np.float32), *_state())
    assert args == fixed                                                   # the kernels stay arguments
    assert not list(tmp_path.glob("entry_*.py"))


def _state():
    return np.zeros(8, np.float32), np.zeros(8, np.float32)


@pytest.fixture(autouse=True)
def _fresh_loads(monkeypatch):
    from leanlstm.runtime import entry_points

    entry_points._load.cache_clear()       # generated modules are memoised per source; tests use their own folders
    yield
    entry_points._load.cache_clear()
