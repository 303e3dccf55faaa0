"""leanlstm: compact, accurate and genuinely faster LSTMs."""
from .nn import LSTM, Dense, Kronecker, LowRank, MaskedSparse, WeightForm
from .compress import Compression, compress_, compressed_config, restore_  # noqa: E402 (needs nn first)
from .methods import ADMM, ISS, AntMan, Doped, GrowPrune, Int8, Prune, Structured, Symbiotic  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LSTM", "Dense", "Kronecker", "LowRank", "MaskedSparse", "WeightForm", "Compression", "compress_",
           "compressed_config", "restore_", "ADMM", "ISS", "AntMan", "Int8", "Doped", "GrowPrune", "Prune", "Structured", "Symbiotic", "__version__"]
