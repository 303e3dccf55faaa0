"""leanlstm: compact, accurate and genuinely faster LSTMs."""
from .nn import LSTM, Dense, Kronecker, LowRank, MaskedSparse, WeightForm

__version__ = "0.1.0"
__all__ = ["LSTM", "Dense", "Kronecker", "LowRank", "MaskedSparse", "WeightForm", "__version__"]
