"""leanlstm: compact, accurate and genuinely faster LSTMs."""
from .nn import LSTM, Dense, Kronecker, LowRank, MaskedSparse, WeightForm
from .compress import Compression, compress_, compressed_config, restore_  # noqa: E402 (needs nn first)
from .methods import ISS, AntMan, Doped, GrowPrune, Prune, Structured  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LSTM", "Dense", "Kronecker", "LowRank", "MaskedSparse", "WeightForm", "Compression", "compress_",
           "compressed_config", "restore_", "ISS", "AntMan", "Doped", "GrowPrune", "Prune", "Structured", "__version__"]
