import pytest
import torch
from torch import nn

import leanlstm
from leanlstm.graph import GraphError, consumers, find_lstms, producers, replace_module, trace
from tests.user_models import KeywordSpotter, RNNModel, Tagger


def test_find_lstms_in_user_models_whatever_they_are_called():
    assert [name for name, _ in find_lstms(KeywordSpotter())] == ["rnn"]
    assert [name for name, _ in find_lstms(RNNModel())] == ["rnn"]
    lstm = leanlstm.LSTM(4, 8)
    assert find_lstms(lstm) == [("", lstm)]
    nested = nn.Sequential(nn.ModuleDict({"a": nn.LSTM(3, 4), "b": leanlstm.LSTM(4, 5)}))
    assert [name for name, _ in find_lstms(nested)] == ["0.a", "0.b"]
    assert [name for name, _ in find_lstms(nested, lambda module, name: name.endswith("b"))] == ["0.b"]
    assert find_lstms(nn.Linear(3, 4)) == []


def test_consumers_and_producers_of_user_models():
    spotter = KeywordSpotter()
    assert [(link.name, link.how) for link in consumers(spotter, "rnn")] == [("fc", "last_step")]
    assert [(link.name, link.how) for link in producers(spotter, "rnn")] == [("x", "input")]
    word = RNNModel()
    assert [(link.name, link.how) for link in consumers(word, "rnn")] == [("", "state"), ("decoder", "per_step")]
    assert [(link.name, link.module) for link in producers(word, "rnn")] == [("encoder", word.encoder)]
    tagger = Tagger()
    assert [(link.name, link.how) for link in consumers(tagger, "lstm")] == [("tags", "per_step")]


def test_stacked_recurrent_modules_and_state_readers():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.LSTM(3, 6), leanlstm.LSTM(6, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            y, _ = self.first(x)
            _, (h, _) = self.second(torch.relu(y))
            return self.head(h[-1])

    model = TwoStacks()
    assert [(link.name, link.how) for link in consumers(model, "first")] == [("second", "per_step")]
    assert [(link.name, link.how) for link in consumers(model, "second")] == [("head", "state")]


def test_channel_mixing_operations_are_reported_as_opaque():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 4), nn.Linear(8, 2)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(torch.cat([y, y], -1))

    [link] = consumers(Mixed(), "rnn")
    assert link.how == "opaque" and link.module is None and "cat" in link.ops[-1]
    [link] = consumers(leanlstm.LSTM(3, 4), "")
    assert link.how == "output"


def test_untraceable_models_get_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4)

        def forward(self, x):
            if x.sum() > 0:            # control flow on a tensor's value
                return self.rnn(x)[0]
            return x

    with pytest.raises(GraphError, match="cannot trace Branchy.forward"):
        trace(Branchy())
    with pytest.raises(GraphError, match="never calls submodule 'nothing'"):
        consumers(KeywordSpotter(), "nothing")


def test_replace_module_in_place():
    model = KeywordSpotter()
    lean = leanlstm.LSTM.from_torch(model.rnn)
    replace_module(model, "rnn", lean)
    assert model.rnn is lean
    with pytest.raises(GraphError, match="cannot replace the model itself"):
        replace_module(model, "", lean)


def test_leanlstm_language_model_traces():
    from leanlstm.tasks.lm import LMConfig, WordLM

    model = WordLM(LMConfig(100, 8, [8, 8]))
    assert [(link.name, link.how) for link in consumers(model, "lstm")] == [("_per_layer", "state"),
                                                                           ("decoder", "per_step")]
    assert [link.module for link in producers(model, "lstm")] == [model.embedding]
