"""Inference runtimes and exporters: what turns a compressed LSTM model into measured latency."""
from .kernel_cache import install as _install_kernel_cache

_install_kernel_cache()     # before the first kernel is compiled or loaded: cached kernels keyed on all their sources
from .cells import ExportError, register_cell
from .engine import Engine, EngineError, Stream, compile
from .kernels import RuntimeOp
from .latency import latency, measure, stack_and_model
from .pipeline import Pipeline, pipeline_of
from .latency_model import LatencyModel, prediction_error
from .profile import LatencyTable, LayerKey, LayerProfile, LayerSettings, LayerTable, ProfileSettings, profile, profile_layers
from .speed_check import SlowDown, check_speed, keep_dense_

__all__ = ["Engine", "EngineError", "ExportError", "Pipeline", "Stream", "compile", "RuntimeOp", "latency", "measure",
           "pipeline_of", "register_cell", "stack_and_model", "LatencyTable", "ProfileSettings", "profile",
           "SlowDown", "check_speed", "keep_dense_", "LayerKey", "LayerProfile", "LayerSettings", "LayerTable",
           "profile_layers", "LatencyModel", "prediction_error"]
