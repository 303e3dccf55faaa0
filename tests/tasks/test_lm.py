import pytest
import torch

from leanlstm.tasks.lm import LMConfig, WordLM


def test_set_dropout_applies_everywhere_and_is_recorded():
    torch.manual_seed(0)
    shared = LMConfig(vocab_size=30, embed_size=6, hidden_sizes=[8, 8], dropout=0.0)   # e.g. a preset's
    model = WordLM(shared).train()
    tokens = torch.randint(0, 30, (5, 2))
    assert torch.equal(model(tokens)[0], model(tokens)[0])      # no dropout: training passes agree
    model.set_dropout(0.4)
    assert model.dropout.p == 0.4 and model.lstm.dropout == 0.4 and shared.dropout == 0.0
    assert not torch.equal(model(tokens)[0], model(tokens)[0])  # now the masks differ between passes
    rebuilt = WordLM.from_model_config(model.model_config())
    assert rebuilt.config.dropout == 0.4 and rebuilt.dropout.p == 0.4 and rebuilt.lstm.dropout == 0.4
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout"):
            model.set_dropout(bad)


def test_the_hlstm_small_preset_matches_the_small_lstms_parameters():
    from leanlstm.runs import lstm_numbers
    from leanlstm.tasks.ptb import PRESETS

    count = {name: lstm_numbers(WordLM(PRESETS[name].model))["lstm_params"] for name in ("small", "hlstm-small")}
    assert abs(count["hlstm-small"] / count["small"] - 1) < 0.005


def test_the_cell_comes_from_the_config_and_survives_the_round_trip():
    from leanlstm.tasks.ptb import PRESETS

    assert PRESETS["hlstm-medium-cpu"].model.cell == "hlstm" and PRESETS["medium-cpu"].model.cell == "lstm"
    config = LMConfig(vocab_size=30, embed_size=6, hidden_sizes=[8, 5], cell="hlstm", cell_options={"gate_hidden": 3})
    model = WordLM(config)
    assert [layer.cell for layer in model.lstm.layers] == ["hlstm", "hlstm"] and model.decoder.in_features == 5
    rebuilt = WordLM.from_model_config(model.model_config())
    assert [layer.widths for layer in rebuilt.lstm.layers] == [(3,) * 4] * 2
    tokens = torch.randint(0, 30, (4, 2))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(tokens)[0], rebuilt.eval()(tokens)[0])


def test_a_compressed_decoder_is_part_of_the_saved_structure():
    from leanlstm.nn import FormLinear
    from leanlstm.nn.forms import BlockSparse

    torch.manual_seed(1)
    model = WordLM(LMConfig(vocab_size=40, embed_size=6, hidden_sizes=[8])).eval()
    assert "decoder" not in model.model_config()                  # a dense decoder: the format as it always was
    model.decoder = FormLinear.from_linear(model.decoder, BlockSparse.from_dense(
        model.decoder.weight.detach(), density=0.5, block_rows=8, block_cols=4))
    rebuilt = WordLM.from_model_config(model.model_config())
    rebuilt.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 40, (5, 2))
    assert isinstance(rebuilt.decoder.form, BlockSparse)
    assert torch.equal(rebuilt.eval()(tokens)[0], model(tokens)[0])
