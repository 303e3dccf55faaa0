"""The LSTM substrate: cells and stacks whose weight matrices are pluggable weight forms."""
from .cells import CELLS, LSTMLayer, RecurrentLayer, UnitGroup
from .forms import FORMS, Dense, Kronecker, LowRank, MaskedSparse, WeightForm
from .gates import gate_rows, split_gates
from .hlstm import HLSTMLayer
from .linear import FormLinear
from .lstm import LSTM

__all__ = ["CELLS", "FORMS", "Dense", "FormLinear", "Kronecker", "LowRank", "MaskedSparse", "WeightForm", "LSTM",
           "LSTMLayer", "HLSTMLayer", "RecurrentLayer", "UnitGroup", "gate_rows", "split_gates"]
