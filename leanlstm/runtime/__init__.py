"""Inference runtimes and exporters: what turns a compressed LSTM into measured latency."""
from .engine import Engine, EngineError, Stream, compile
from .kernels import RuntimeOp
from .latency import latency, measure, stack_and_model
from .profile import LatencyTable, ProfileSettings, profile

__all__ = ["Engine", "EngineError", "Stream", "compile", "RuntimeOp", "latency", "measure", "stack_and_model", "LatencyTable",
           "ProfileSettings", "profile"]
