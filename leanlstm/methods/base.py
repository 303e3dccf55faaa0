"""The shape every compression method has.

A method has a public ``@dataclass`` config (``leanlstm.ISS``, ``leanlstm.Prune``, ...: the nouns a user writes)
and a ``Method`` class that says what it does to a model. ``leanlstm.compress_(model, config)`` finds the method
for a config type (``method_for``, as torchao's ``quantize_`` finds its handler), converts the model and returns a
handle (``leanlstm.compress.Compression``) that calls the method's hooks from the user's loop or from
``leanlstm.train.Trainer``:

    check(handle)          raise, naming the problem, before anything in the model changes
    convert(handle)        e.g. every matrix to a doped Kronecker form            (once, by compress_)
    planned_forms(handle)  the forms the matrices will end in, to time before converting (speed guard)
    penalty(handle)        e.g. ISS's group-Lasso term                             (every step, with the loss)
    after_step(handle)     e.g. a pruning schedule, thresholding                   (after optimizer.step())
    on_epoch_end(handle)   e.g. record surviving units                             (every epoch)
    finish(handle)         e.g. ISS's shrink: remove dead units                    (handle.finalize())

Methods register by ``name`` (the CLI's ``--method``); adding one is a new file in ``leanlstm/methods/``.

No silent slow-downs: the handle times every matrix a method leaves non-dense against the dense product of its
shape on the leanlstm engine (``leanlstm.runtime.speed_check``), once before converting (on ``planned_forms``,
when a method knows them) and once at ``finalize()``, and logs a warning for each that is slower. A config with
``keep_slow_dense=True`` keeps those matrices dense instead; ``speed_check=False`` skips the timing. Configs
without these fields (``getattr`` defaults) are checked and warned about, never changed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..graph import lstm_forms
from ..nn import LSTM, WeightForm  # noqa: F401  (LSTM: the docstring examples)
from ..train import Callback, ConfigError, Range, check_ranges

if TYPE_CHECKING:
    from ..compress import Compression

METHODS: dict[str, type["Method"]] = {}                    # CLI name -> method
HANDLERS: dict[type["MethodConfig"], type["Method"]] = {}  # config type -> method (the first to declare it)


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


UNIT = Range(0, 1)                           # shares, fractions, densities
SHARE = Range(0, 1, low_open=True, high_open=True)
COMPRESSION = Range(1, 1e6)                  # beyond this not one value of a matrix would be left
STEPS = Range(0, 10**12, integer=True)


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's configuration; fields need defaults that work. Every numeric field is checked on
    construction against ``ranges`` (fields without one: finite and >= 0); ``choices`` name the allowed words of
    text fields. Errors name the option, its value and its range:

    >>> from leanlstm.methods import ISS
    >>> ISS(threshold=1e308)
    Traceback (most recent call last):
    ...
    leanlstm.train.ConfigError: threshold must lie in [0, 1] (...), got 1e+308
    """

    ranges: ClassVar[dict[str, Range]] = {}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):      # what every method's numbers share, checked first
            value = getattr(self, field.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not Range(0).contains(value):
                raise ConfigError(f"option {field.name}", value, "be a finite number >= 0")
        check_ranges(self, self.ranges)
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"be one of {', '.join(map(str, allowed))}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """The config of ``to_dict()`` (a run's ``method_config``); unknown keys are refused by name.

        >>> from leanlstm.methods import Prune
        >>> Prune.from_dict(Prune(compression=10).to_dict()) == Prune(compression=10)
        True
        """
        _check_known(cls, values)
        return cls(**values)

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "MethodConfig":
        """Build from ``KEY=VALUE`` strings of the command line, converting by each field's type."""
        _check_known(cls, values)
        defaults = cls()
        parsed = {name: _parse(text, type(getattr(defaults, name)), name) for name, text in values.items()}
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Preset:
    """The config type of a CLI name that fixes some of a public config's defaults: ``doped-kp`` is
    ``Doped`` with ``structure="kronecker"``. Calls, ``from_dict`` and ``from_strings`` give the public type.

    >>> from leanlstm.methods import Doped
    >>> Preset(Doped, structure="lowrank")(compression=10) == Doped("lowrank", compression=10)
    True
    """

    def __init__(self, base: type[MethodConfig], **defaults: Any) -> None:
        self.base, self.defaults = base, defaults
        self.__name__ = base.__name__

    def __call__(self, **values: Any) -> MethodConfig:
        return self.base(**(self.defaults | values))

    def from_dict(self, values: dict[str, Any]) -> MethodConfig:
        _check_known(self.base, values)
        return self(**values)

    def from_strings(self, values: dict[str, str]) -> MethodConfig:
        _check_known(self.base, values)
        defaults = self()
        return self(**{name: _parse(text, type(getattr(defaults, name)), name) for name, text in values.items()})

    def __repr__(self) -> str:
        return f"Preset({self.base.__name__}, {', '.join(f'{k}={v!r}' for k, v in self.defaults.items())})"


def _check_known(cls: type[MethodConfig], values: dict[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {', '.join(unknown)}; options: {', '.join(fields)}")


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
    """A compression method: hooks that ``leanlstm.compress.Compression`` calls. Every hook is optional.

    Subclasses set ``Config`` (the public config type they handle) and, to be reachable from the CLI, ``name``.
    The second half (``prepare`` ... ``on_run_end``) is how ``leanlstm.runs`` drives the same handle through
    ``Trainer`` phases; methods do not override it.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig] | Preset] = MethodConfig
    has_finetune: ClassVar[bool] = True   # whether a run fine-tunes after finish() (the CLI's second phase)
    compress_epochs: ClassVar[int | None] = None   # a run's compression-phase epochs unless --epochs (None: preset's)
    finetune_epochs: ClassVar[int] = 3             # a run's fine-tuning epochs unless --finetune-epochs
    # backends a run times the result and its dense start on, the first giving the speed-ups
    latency_backends: ClassVar[tuple[str, ...]] = ("leanlstm", "onnxruntime")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in METHODS:
                raise ValueError(f"method name {cls.name!r} is already registered")
            METHODS[cls.name] = cls
        if isinstance(cls.__dict__.get("Config"), type):
            HANDLERS.setdefault(cls.Config, cls)

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self._driver = None   # the Trainer-side driver of runs (``prepare`` ...), made when first needed
        self.kept_dense: set[str] = set()   # matrices the speed guard keeps dense (``keep_slow_dense``)

    # --- what the method does (called by the handle) -------------------------------------------------------
    def resume(self, state: dict[str, Any]) -> None:
        """Before ``check``, when the handle continues from a checkpoint (``attach(..., state)``, how runs resume):
        the method's saved ``state_dict()``, for a method whose check would otherwise redo work the checkpoint
        holds. ``load_state_dict`` still follows, after ``convert``."""

    def check(self, handle: "Compression") -> None:
        """Raise a ``ValueError`` naming the problem if the method cannot apply; nothing has changed yet."""

    def planned_forms(self, handle: "Compression") -> list[tuple[str, WeightForm]] | None:
        """The form each matrix (``handle.forms()`` names) will have once compressed, fitted to its current weights,
        so that the speed guard can time it before anything changes; None when not known before ``finish``."""
        return None

    def convert(self, handle: "Compression") -> None:
        """Transform the handle's LSTMs (``handle.lstms``) in place, e.g. to new weight forms. Matrices already in
        the method's form stay as they are, so a model restored from a checkpoint can be compressed again."""

    def start(self, handle: "Compression") -> None:
        """Set what the current phase needs (``handle.finalized``): after convert, finish and loading state."""

    def penalty(self, handle: "Compression") -> torch.Tensor | None:
        """A term to add to the loss, or None."""
        return None

    def after_step(self, handle: "Compression") -> None:
        """After ``optimizer.step()`` (``handle.step`` already counts it)."""

    def on_epoch_end(self, handle: "Compression") -> dict[str, Any]:
        """Numbers for the epoch's record; ``{"new_parameters": True}`` if the model's parameters were replaced."""
        return {}

    def finish(self, handle: "Compression") -> None:
        """The final transform (``handle.finalize()``), e.g. removing dead units."""

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        """Method-specific numbers for ``metrics.json`` and ``handle.summary()``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None: ...

    def on_train_begin(self, handle: "Compression", lr: float) -> None:
        """A ``Trainer`` phase begins at learning rate ``lr`` (user loops never call this)."""

    # --- runs: the same handle driven by Trainer phases (leanlstm.runs; methods do not override these) -----
    @property
    def driver(self):
        if self._driver is None:
            from ..compress import RunDriver

            self._driver = RunDriver(self)
        return self._driver

    def prepare(self, model: nn.Module) -> nn.Module:
        """Opens the compression phase: ``compress_(model, config)``; returns the model."""
        return self.driver.prepare(model)

    def callbacks(self) -> list[Callback]:
        """Hooks for the compression phase: the handle's, bound when the phase starts or resumes."""
        return [self.driver.callback]

    def finalize(self, model: nn.Module) -> nn.Module:
        """Opens fine-tuning: ``handle.finalize()``; returns the model (changed in place)."""
        return self.driver.finalize(model)

    def finetune_callbacks(self) -> list[Callback]:
        """Hooks for the fine-tuning phase: the same handle, now finalized."""
        return [self.driver.callback]

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific numbers for ``metrics.json``."""
        return self.summarize(self.driver.bind(model))

    def on_run_end(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Called once ``metrics.json`` is written (main process only), e.g. to draw plots into ``run_dir``."""


def named_forms(module: nn.Module) -> list[tuple[str, WeightForm]]:
    """``("rnn.layers.0.weight_ih", form), ...`` for every matrix of every ``leanlstm.LSTM`` in ``module`` (a bare
    LSTM's names have no prefix).

    >>> [name for name, _ in named_forms(LSTM(3, 4))]
    ['layers.0.weight_ih', 'layers.0.weight_hh']
    """
    return list(lstm_forms(module))


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS)) or 'none'}") from None


def method_for(config: MethodConfig) -> type[Method]:
    """The method that handles ``config``'s type (or the nearest of its base types)."""
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a method config such as leanlstm.ISS(), leanlstm.Prune(compression=20) or "
                        f"leanlstm.Doped('kronecker', compression=20); got {type(config).__name__}")
    for kind in type(config).__mro__:
        if kind in HANDLERS:
            return HANDLERS[kind]
    raise TypeError(f"no method handles {type(config).__name__}; define a Method subclass with Config = "
                    f"{type(config).__name__}")


def config_for(method: str, options: dict[str, Any] | None = None) -> MethodConfig:
    """The config of the CLI method ``method`` with ``options`` (a run's ``method_config``).

    >>> from leanlstm.methods import Doped
    >>> config_for("doped-kp", {"compression": 10}) == Doped("kronecker", compression=10)
    True
    """
    return get_method(method).Config.from_dict(dict(options or {}))
