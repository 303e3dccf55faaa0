"""Compression methods, one module each, all with the shape of ``base.Method``."""
from . import doping, iss, pruning  # noqa: F401  (register their methods)
from .base import METHODS, Method, MethodConfig, get_method

__all__ = ["METHODS", "Method", "MethodConfig", "get_method"]
