"""The LSTM substrate: cells and stacks whose weight matrices are pluggable weight forms."""
from .forms import FORMS, Dense, Kronecker, LowRank, MaskedSparse, WeightForm
from .gates import gate_rows, split_gates
from .lstm import LSTM, LSTMLayer

__all__ = ["FORMS", "Dense", "Kronecker", "LowRank", "MaskedSparse", "WeightForm", "LSTM", "LSTMLayer",
           "gate_rows", "split_gates"]
