"""The shape every compression method has.

A method is a pure transform plus training callbacks, in up to two phases:

    compress:  prepare(model) -> model        e.g. convert weights to doped Kronecker forms
               callbacks()                     e.g. a group-Lasso term, a sparsity schedule
    finetune:  finalize(model) -> model        e.g. remove dead hidden units (a smaller dense LSTM)
               finetune_callbacks()            e.g. keep the zero structure frozen

``leanlstm compress`` runs both phases with checkpoints; a user's own loop calls the same pieces.
Methods register by ``name``; adding one is a new file in ``leanlstm/methods/``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..train import Callback

METHODS: dict[str, type["Method"]] = {}


def parse_settings(pairs: Iterable[str]) -> dict[str, str]:
    """Method options as text, for ``MethodConfig.from_strings``; dashes in keys read as underscores.

    >>> parse_settings(["doping_share=0.75", "anneal-end = 0.5"])
    {'doping_share': '0.75', 'anneal_end': '0.5'}
    """
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {pair!r}")
        settings[key.strip().replace("-", "_")] = text.strip()
    return settings


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's configuration; fields need defaults that work. Numbers must be finite and >= 0."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"option {field.name} must be a finite number >= 0, got {value}")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "MethodConfig":
        """Build from ``KEY=VALUE`` strings of the command line, converting by each field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {', '.join(unknown)}; options: {', '.join(fields)}")
        defaults = cls()
        parsed = {name: _parse(text, type(getattr(defaults, name)), name) for name, text in values.items()}
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(text: str, kind: type, name: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option {name} expects true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"option {name} expects a {kind.__name__}, got {text!r}") from None
    if kind in (list, tuple):
        return [float(v) if "." in v else int(v) for v in text.split(",")]
    return text


class Method:
    """A compression method. Subclasses set ``name`` and ``Config`` and override what they need."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    has_finetune: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in METHODS:
                raise ValueError(f"method name {cls.name!r} is already registered")
            METHODS[cls.name] = cls

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Transform a (trained or fresh) model before the compression phase."""
        return model

    def callbacks(self) -> list[Callback]:
        """Hooks for the compression phase."""
        return []

    def finalize(self, model: nn.Module) -> nn.Module:
        """Transform the model after the compression phase, before fine-tuning."""
        return model

    def finetune_callbacks(self) -> list[Callback]:
        """Hooks for the fine-tuning phase."""
        return []

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific numbers for ``metrics.json``."""
        return {}

    def on_run_end(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Called once ``metrics.json`` is written (main process only), e.g. to draw plots into ``run_dir``."""


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS)) or 'none'}") from None
