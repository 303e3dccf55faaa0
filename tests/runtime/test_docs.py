"""The runtime's docstring examples run and hold."""
import doctest
import importlib

import pytest

MODULES = ["leanlstm.runtime.engine", "leanlstm.runtime.kernels", "leanlstm.runtime.latency",
           "leanlstm.runtime.pipeline", "leanlstm.runtime.cells", "leanlstm.runtime.onnx",
           "leanlstm.runtime.structured_ops",
           "leanlstm.runtime.profile", "leanlstm.runtime.speed_check", "leanlstm.cli.profile",
           "leanlstm.runtime.amx", "leanlstm.runtime.int8"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
