"""Compression methods, one module each: a public config (the noun a user writes) and a ``base.Method``.

    leanlstm.compress_(model, leanlstm.ISS(strength=0.002))
    leanlstm.compress_(model, leanlstm.Prune(compression=20, total_steps=N))
    leanlstm.compress_(model, leanlstm.Doped("kronecker", compression=20, total_steps=N))
    leanlstm.compress_(model, leanlstm.Structured("lowrank", compression=20))
    leanlstm.compress_(model, leanlstm.GrowPrune(compression=10, total_steps=N))
    leanlstm.compress_(model, leanlstm.AntMan(reduction=10))
"""
from . import antman, doping, growprune, iss, pruning  # noqa: F401  (register their methods)
from .antman import AntMan
from .base import METHODS, Method, MethodConfig, config_for, get_method, method_for
from .doping import Doped, Structured
from .growprune import GrowPrune
from .iss import ISS
from .pruning import Prune

__all__ = ["METHODS", "Method", "MethodConfig", "config_for", "get_method", "method_for", "ISS", "Prune", "Doped",
           "Structured", "GrowPrune", "AntMan"]
