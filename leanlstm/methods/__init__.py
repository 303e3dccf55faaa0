"""Compression methods, one module each: a public config (the noun a user writes) and a ``base.Method``.

    leanlstm.compress_(model, leanlstm.ISS(strength=0.002))
    leanlstm.compress_(model, leanlstm.Prune(compression=20, total_steps=N))
    leanlstm.compress_(model, leanlstm.Doped("kronecker", compression=20, total_steps=N))
    leanlstm.compress_(model, leanlstm.Structured("lowrank", compression=20))
    leanlstm.compress_(model, leanlstm.GrowPrune(compression=10, total_steps=N))
    leanlstm.compress_(model, leanlstm.AntMan(reduction=10))
    leanlstm.compress_(model, leanlstm.Int8())
    leanlstm.compress_(model, leanlstm.ADMM(compression=60, total_steps=N))
    leanlstm.compress_(model, leanlstm.Symbiotic(latency_budget_us=40, backend="leanlstm", total_steps=N))
"""
from . import admm, antman, doping, growprune, iss, pruning, quantize, symbiotic  # noqa: F401  (register them)
from .admm import ADMM
from .antman import AntMan
from .base import METHODS, Method, MethodConfig, config_for, get_method, method_for
from .doping import Doped, Structured
from .growprune import GrowPrune
from .iss import ISS
from .pruning import Prune
from .quantize import Int8
from .symbiotic import Symbiotic

__all__ = ["METHODS", "Method", "MethodConfig", "config_for", "get_method", "method_for", "ISS", "Prune", "Doped",
           "Structured", "GrowPrune", "AntMan", "Int8", "ADMM", "Symbiotic"]
