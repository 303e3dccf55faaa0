"""The substrate's docstring examples run and hold."""
import doctest
import importlib

import pytest

MODULES = ["leanlstm.nn.cells", "leanlstm.nn.lstm", "leanlstm.nn.hlstm", "leanlstm.nn.gates", "leanlstm.graph"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
