"""Checks shared by the tests of the engine's weight products (``RuntimeOp``)."""
import numpy as np


def assert_strided_outputs_equal(op, rows: int, x: np.ndarray, xs: np.ndarray) -> None:
    """``op`` (``rows`` outputs) writes the same numbers into an output with gaps between its values (a column of a
    wider array, which the kernels' vector epilogues must not write through) as into a contiguous one, for one step
    and for a sequence."""
    out, strided = np.zeros(rows, np.float32), np.zeros((rows, 2), np.float32)
    op.matvec(op.arrays, x, out, False)
    op.matvec(op.arrays, x, strided[:, 0], False)
    np.testing.assert_array_equal(strided[:, 0], out)
    outs, wide = np.zeros((len(xs), rows), np.float32), np.zeros((len(xs), 2 * rows), np.float32)
    op.matmat(op.arrays, xs, outs)
    op.matmat(op.arrays, xs, wide[:, ::2])
    np.testing.assert_array_equal(wide[:, ::2], outs)
    assert not wide[:, 1::2].any()
