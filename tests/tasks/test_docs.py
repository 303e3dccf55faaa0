"""The docstring examples of the task seam, the presets and the report figures run and hold."""
import doctest
import importlib

import pytest

MODULES = ["leanlstm.tasks", "leanlstm.tasks.base", "leanlstm.tasks.ptb", "leanlstm.presets", "leanlstm.report"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
