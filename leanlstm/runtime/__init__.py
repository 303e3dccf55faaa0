"""Inference runtimes and exporters: what turns a compressed LSTM model into measured latency."""
from .cells import ExportError, register_cell
from .engine import Engine, EngineError, Stream, compile
from .kernels import RuntimeOp
from .latency import latency, measure, stack_and_model
from .pipeline import Pipeline, pipeline_of
from .profile import LatencyTable, ProfileSettings, profile
from .speed_check import SlowDown, check_speed, keep_dense_

__all__ = ["Engine", "EngineError", "ExportError", "Pipeline", "Stream", "compile", "RuntimeOp", "latency", "measure",
           "pipeline_of", "register_cell", "stack_and_model", "LatencyTable", "ProfileSettings", "profile",
           "SlowDown", "check_speed", "keep_dense_"]
