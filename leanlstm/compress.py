"""``leanlstm.compress_``: compress the LSTMs of any model in place, then drive the method from any loop.

In the shape of torchao's ``quantize_``: one in-place entry point, one config type per method. Every
``torch.nn.LSTM`` (or ``leanlstm.LSTM``) that ``filter_fn`` accepts becomes a ``leanlstm.LSTM`` carrying the
method's weight forms; the returned ``Compression`` handle holds the method's training hooks, which a user calls
from their own loop and ``leanlstm.train.Trainer`` calls through ``handle.callbacks()``::

    model = KeywordSpotter()                                   # self.rnn = nn.LSTM(...), self.fc = nn.Linear(...)
    handle = leanlstm.compress_(model, leanlstm.ISS(strength=0.002))
    optimizer = torch.optim.Adam(model.parameters())           # after compress_: the LSTM's parameters are new
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + handle.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        handle.after_step()
    handle.finalize()                                          # dead units leave rnn and fc, in place
    config = leanlstm.compressed_config(model)                 # JSON: sizes and forms, to rebuild the structure

and later ``leanlstm.restore_(KeywordSpotter(), config).load_state_dict(state)`` gives the same model back.
Modules are found from the module graph (``leanlstm.graph``), never by attribute name.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .graph import FilterFn, find_lstms, head_forms, replace_module
from .methods import Doped, ISS, Prune, Structured
from .methods.base import Method, MethodConfig, method_for, qualified
from .nn import LSTM, FormLinear, WeightForm
from .train import Callback

log = logging.getLogger(__name__)
FORMAT = 1    # of compressed_config() and Compression.state_dict()

__all__ = ["compress_", "Compression", "CompressionCallback", "CompressError", "compressed_config", "restore_",
           "ISS", "Prune", "Doped", "Structured"]


class CompressError(ValueError):
    """A model, a filter or a handle that compression cannot work with; the message says which and why."""


# --- the entry point ----------------------------------------------------------------------------------------
def compress_(model: nn.Module, config: MethodConfig, filter_fn: FilterFn | None = None) -> "Compression":
    """Compress every LSTM of ``model`` that ``filter_fn(module, name)`` accepts (all by default), in place.

    ``torch.nn.LSTM`` modules become ``leanlstm.LSTM`` (same function) carrying the method's forms; every check
    runs before anything changes. Build the optimizer afterwards: converted LSTMs have new parameters.

    >>> model = nn.Sequential(nn.LSTM(8, 16))
    >>> handle = compress_(model, Prune(compression=4, total_steps=100))
    >>> type(model[0]).__name__, type(model[0].layers[0].weight_hh).__name__
    ('LSTM', 'MaskedSparse')
    """
    return attach(model, method_for(config)(config), filter_fn)


def attach(model: nn.Module, method: Method, filter_fn: FilterFn | None = None,
           state: dict[str, Any] | None = None) -> "Compression":
    """``compress_`` with a given method object; with ``state`` (a handle's ``state_dict()``) it continues that
    handle on a model restored from its checkpoint (how ``leanlstm.runs`` resumes): a finalized handle's model is
    not converted again, and matrices already in the method's forms are kept as they are."""
    if not isinstance(model, nn.Module):
        raise CompressError(f"compress_ takes an nn.Module, got {type(model).__name__}")
    found = _lstms(model, filter_fn)
    lstms = {name: _converted(name, module) for name, module in found}
    handle = Compression(model, method, lstms, filter_fn)
    if state:
        method.resume(state["method"])
    method.check(handle)          # raises before anything in the model changes
    if not (state or {}).get("finalized"):
        plan_speed(handle, state)
        method.convert(handle)
    for name, lstm in handle.lstms.items():      # as convert left them (a method may have installed new ones)
        if name and model.get_submodule(name) is not lstm:
            replace_module(model, name, lstm)
    method.start(handle)
    if state:
        handle.load_state_dict(state)
    return handle


def _lstms(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    every = find_lstms(model)
    if not every:
        raise CompressError(f"{type(model).__name__} holds no LSTM: compress_ compresses torch.nn.LSTM and "
                            f"leanlstm.LSTM modules (anywhere in the module tree)")
    if filter_fn is None:
        return every
    chosen = find_lstms(model, filter_fn)
    if not chosen:
        names = ", ".join(repr(name) for name, _ in every)
        raise CompressError(f"filter_fn accepted none of the model's LSTMs ({names}); it is called as "
                            f"filter_fn(module, name)")
    return chosen


def _converted(name: str, module: nn.Module) -> LSTM:
    if isinstance(module, LSTM):
        return module
    if not name:
        raise CompressError("the model itself is a torch.nn.LSTM, which compress_ cannot replace in place: "
                            "convert it first (lstm = leanlstm.LSTM.from_torch(lstm)) or compress the module "
                            "that holds it")
    return LSTM.from_torch(module)


# --- no silent slow-downs (leanlstm.runtime.speed_check) -------------------------------------------------------
def speed_options(config: MethodConfig) -> tuple[bool, bool]:
    """``(speed_check, keep_slow_dense)`` of a config; configs without the fields are checked, never changed."""
    return bool(getattr(config, "speed_check", True)), bool(getattr(config, "keep_slow_dense", False))


def plan_speed(handle: "Compression", state: dict[str, Any] | None = None) -> None:
    """Before converting: time the forms the method will leave (``planned_forms``) and warn about each slower than
    dense; with ``keep_slow_dense`` those stay dense (``method.kept_dense``). A resumed handle takes the saved
    choice instead of measuring again (timing noise must not change a model's structure mid-run)."""
    from .runtime.speed_check import check_forms

    method, (check, keep) = handle.method, speed_options(handle.config)
    if state is not None and "kept_dense" in state:
        method.kept_dense = set(state["kept_dense"])
        return
    planned = method.planned_forms(handle) if check else None
    if not planned:
        return
    handle.slow_downs = check_forms(planned, warn=False)
    for slow in handle.slow_downs:
        log.warning("%s once compressed (timed on its final form before training); %s", slow,
                    "it stays dense (keep_slow_dense)" if keep else "keep_slow_dense=True keeps it dense")
    if keep:
        method.kept_dense = {slow.name for slow in handle.slow_downs}


def guard_speed(handle: "Compression") -> None:
    """After the method's final step: time every compressed matrix as it now is; warn about each slower than
    dense, or with ``keep_slow_dense`` make it dense (the same matrix, so the same outputs)."""
    from .runtime.speed_check import check_forms, keep_dense_

    check, keep = speed_options(handle.config)
    if not check:
        return
    warned = {slow.name for slow in handle.slow_downs}       # before training, on the planned forms
    handle.slow_downs = check_forms(handle.forms() + handle.head_forms(), warn=False)
    for slow in handle.slow_downs:
        if keep or slow.name not in warned:
            log.warning("%s; %s", slow, "made dense (keep_slow_dense)" if keep else
                        "keep_slow_dense=True keeps it dense")
    if keep and handle.slow_downs:
        changed = keep_dense_(handle.model, handle.slow_downs)
        handle.method.kept_dense |= set(changed)


# --- the handle -----------------------------------------------------------------------------------------------
class Compression:
    """What ``compress_`` returns: the method's hooks for one model, called from the user's loop.

    ``penalty()`` after the forward pass (add it to the loss), ``after_step()`` after ``optimizer.step()``,
    ``on_epoch_end()`` at each epoch's end, ``finalize()`` once when training with the method is done (then build
    a new optimizer and fine-tune, calling ``after_step()`` still). ``state_dict()`` / ``load_state_dict()`` for
    checkpoints, ``summary()`` for numbers, ``callbacks()`` for ``leanlstm.train.Trainer``.

    Each hook may be given the model (``handle.after_step(model)``); the handle refuses any model but its own,
    and refuses its own once the compressed LSTMs are no longer in it.
    """

    def __init__(self, model: nn.Module, method: Method, lstms: dict[str, LSTM],
                 filter_fn: FilterFn | None = None) -> None:
        self.model, self.method, self.lstms, self.filter_fn = model, method, dict(lstms), filter_fn
        self.config = method.config
        self.step = 0                 # optimiser steps seen (after_step calls)
        self.epoch = 0                # epochs ended in the current phase
        self.finalized = False
        self.schedule_steps = 0       # the schedule's length when the config gives none (Trainer sets it)
        self.slow_downs: list = []    # the speed guard's last findings (runtime.speed_check.SlowDown)

    # --- what the method sees ---------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return "finetune" if self.finalized else "compress"

    @property
    def total_steps(self) -> int:
        """Steps a schedule spans: the config's ``total_steps``, else the Trainer phase's length (0: unknown)."""
        return getattr(self.config, "total_steps", 0) or self.schedule_steps

    def module(self, name: str) -> nn.Module:
        """Submodule ``name`` as compression sees it (a converted LSTM before it is put in place)."""
        return self.lstms[name] if name in self.lstms else self.model.get_submodule(name)

    def forms(self) -> list[tuple[str, WeightForm]]:
        """``("rnn.layers.0.weight_ih", form), ...`` for every matrix of every compressed LSTM."""
        return [(qualified(name, matrix), form) for name, lstm in self.lstms.items()
                for matrix, form in lstm.forms()]

    def head_forms(self) -> list[tuple[str, WeightForm]]:
        """``("decoder.weight", form), ...`` for every ``FormLinear`` head of the model (a method that compresses
        heads, e.g. ``Prune(heads=4)``, makes them)."""
        return list(head_forms(self.model))

    def install(self, modules: dict[str, nn.Module]) -> None:
        """Put ``modules`` in place of the named submodules (``""``: the model itself, for a bare LSTM) and
        follow them."""
        for name, new in modules.items():
            if name:
                replace_module(self.model, name, new)
            else:
                self.model = new
            if name in self.lstms:
                self.lstms[name] = new

    def _own(self, model: nn.Module | None) -> None:
        if model is not None and model is not self.model:
            raise CompressError(f"this handle belongs to the {type(self.model).__name__} that compress_ was given "
                                f"(id {id(self.model):#x}), not to this {type(model).__name__} (id {id(model):#x}); "
                                f"call leanlstm.compress_ on that model for a handle of its own")
        for name, lstm in self.lstms.items():
            present = self.model if not name else _find(self.model, name)
            if present is not lstm:
                raise CompressError(f"the model's LSTM {name!r} is no longer the one this handle compressed (it was "
                                    f"replaced or the model was rebuilt); call leanlstm.compress_ on the model again, "
                                    f"or restore the handle's structure with handle.load_state_dict(state)")

    # --- the loop's hooks ---------------------------------------------------------------------------------
    def penalty(self, model: nn.Module | None = None) -> torch.Tensor | float:
        """The method's extra loss term (add it to the loss before ``backward()``): a tensor, or 0."""
        self._own(model)
        term = self.method.penalty(self)
        return 0.0 if term is None else term

    extra_loss = penalty

    def after_step(self, model: nn.Module | None = None) -> None:
        """Call after every ``optimizer.step()``: counts the step, then e.g. prunes on schedule or thresholds."""
        self._own(model)
        self.step += 1
        self.method.after_step(self)

    def on_epoch_end(self, model: nn.Module | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Call at each epoch's end; returns the method's numbers for it. ``"new_parameters": True`` in them means
        the model's parameters were replaced (ISS ``shrink_each_epoch``): make a new optimizer."""
        self._own(model)
        self.epoch = self.epoch + 1 if epoch is None else epoch
        return self.method.on_epoch_end(self)

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """The method's final step, once, in place (ISS: remove dead units from the LSTMs and their readers;
        pruning: masks at their final density). Returns the model; make a new optimizer for fine-tuning."""
        self._own(model)
        if self.finalized:
            raise CompressError(f"finalize() was already called on this handle (after step {self.step}); it runs "
                                f"once. To compress the model further, call leanlstm.compress_ on it again")
        self.method.finish(self)
        guard_speed(self)
        self.finalized, self.epoch = True, 0
        self.method.start(self)
        return self.model

    # --- checkpoints, numbers, Trainer --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The handle's state (plain values and tensors; no modules). Save it beside ``model.state_dict()``."""
        return {"format": FORMAT, "config_type": type(self.config).__name__, "config": self.config.to_dict(),
                "step": self.step, "epoch": self.epoch, "finalized": self.finalized,
                "schedule_steps": self.schedule_steps, "structure": compressed_config(self.model),
                "kept_dense": sorted(self.method.kept_dense), "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``. Load it *before* the model's state dict: it first gives the model the
        saved structure (e.g. ISS's smaller sizes), which the model's weights need."""
        self._own(None)
        if state.get("format") != FORMAT:
            raise CompressError(f"not a compression state of format {FORMAT} (got {state.get('format')!r})")
        if state["config_type"] != type(self.config).__name__:
            raise CompressError(f"this state is from a {state['config_type']} handle; this handle is "
                                f"{type(self.config).__name__}")
        if state["config"] != self.config.to_dict():
            log.warning("loading the state of a handle made with %s into one made with %s", state["config"],
                        self.config.to_dict())
        if compressed_config(self.model)["modules"] != state["structure"]["modules"]:
            self.install(_restored_modules(self.model, state["structure"]))
        self.step, self.epoch, self.finalized = state["step"], state["epoch"], state["finalized"]
        self.schedule_steps = state["schedule_steps"]
        self.method.kept_dense = set(state.get("kept_dense", ()))
        self.method.load_state_dict(state["method"], self)
        self.method.start(self)

    def summary(self) -> dict[str, Any]:
        """What was compressed and the method's numbers (e.g. ISS's sizes, pruning's densities)."""
        self._own(None)
        lstms = {name or "(model)": {"hidden_sizes": list(lstm.hidden_sizes), "proj_size": lstm.proj_size,
                                     "stored_params": lstm.stored_params(), "dense_params": lstm.dense_params()}
                 for name, lstm in self.lstms.items()}
        return {"method": type(self.config).__name__, "config": self.config.to_dict(), "step": self.step,
                "finalized": self.finalized, "lstms": lstms, "kept_dense": sorted(self.method.kept_dense),
                "slow_downs": [slow.to_dict() for slow in self.slow_downs]} | self.method.summarize(self)

    def callbacks(self) -> list[Callback]:
        """The same hooks for ``leanlstm.train.Trainer(model, task, config, callbacks=handle.callbacks())``."""
        return [CompressionCallback(self)]

    def __repr__(self) -> str:
        return f"Compression({self.config!r}, lstms={list(self.lstms)}, step={self.step}, finalized={self.finalized})"


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# --- Trainer ----------------------------------------------------------------------------------------------------
def phase_length(trainer) -> int:
    """Optimiser steps the trainer's phase will take in all."""
    per_epoch = trainer.task.num_train_batches()
    if trainer.config.max_batches is not None:
        per_epoch = min(per_epoch, trainer.config.max_batches)
    return trainer.config.epochs * per_epoch


class CompressionCallback(Callback):
    """A handle's hooks for ``leanlstm.train.Trainer``: the calls a user's loop makes, made by the Trainer.

    Given ``attach`` instead of a handle (``leanlstm.runs``), it makes the handle from the trainer's model when the
    phase starts (a resumed run: the restored model), then loads any state the checkpoint held for it.
    """

    def __init__(self, handle: Compression | None = None, attach=None) -> None:
        self.handle, self.attach, self.pending = handle, attach, None

    def bind(self, model: nn.Module) -> Compression:
        if self.handle is None:
            if self.attach is None:
                raise CompressError("this callback has no handle")
            self.handle, self.pending = self.attach(model, self.pending), None
        self.handle._own(model)
        return self.handle

    def on_train_begin(self, trainer) -> None:
        handle = self.bind(trainer.model)
        if not handle.finalized:
            handle.schedule_steps = phase_length(trainer)
        handle.method.on_train_begin(handle, trainer.config.lr)

    def extra_loss(self, trainer) -> torch.Tensor | None:
        term = self.bind(trainer.model).penalty(trainer.model)
        return term if isinstance(term, torch.Tensor) else None

    def after_step(self, trainer) -> None:
        self.bind(trainer.model).after_step(trainer.model)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, Any]) -> None:
        numbers = self.bind(trainer.model).on_epoch_end(trainer.model, epoch)
        if numbers.pop("new_parameters", False):
            trainer.replace_model(trainer.model)   # same module, new parameters: a new optimizer over them
        metrics.update(numbers)

    def state_dict(self) -> dict[str, Any]:
        return self.handle.state_dict() if self.handle is not None else dict(self.pending or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and "format" not in state:
            log.warning("ignoring a method state from before leanlstm.compress_ (no 'format'): %s", sorted(state))
            return
        if self.handle is None:
            self.pending = state
        elif state:
            self.handle.load_state_dict(state)


class RunDriver:
    """How ``leanlstm.runs`` drives one method's handle through its Trainer phases (``Method.prepare`` ...)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.callback = CompressionCallback(attach=lambda model, state: attach(model, method, state=state))

    def prepare(self, model: nn.Module) -> nn.Module:
        self.callback.handle = attach(model, self.method)
        return self.callback.handle.model

    def bind(self, model: nn.Module) -> Compression:
        return self.callback.bind(model)

    def finalize(self, model: nn.Module) -> nn.Module:
        return self.bind(model).finalize(model)


# --- structure: save and rebuild ------------------------------------------------------------------------------
def compressed_config(model: nn.Module) -> dict[str, Any]:
    """The structure compression gives a model, as JSON-ready values: every LSTM's sizes and weight forms and
    every ``nn.Linear``'s shape, by qualified name. ``restore_`` puts it back onto a freshly built model.

    >>> config = compressed_config(nn.Sequential(LSTM(8, [6, 4]), nn.Linear(4, 2)))
    >>> sorted(config["modules"]), config["modules"]["1"]
    (['0', '1'], {'type': 'torch.nn.Linear', 'in_features': 4, 'out_features': 2, 'bias': True})
    """
    modules = {}
    for name, module in _outer(model, ""):
        entry = _describe(module)
        if entry is not None:
            modules[name] = entry
    return {"format": FORMAT, "modules": modules}


def restore_(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Give a freshly built ``model`` the structure of ``compressed_config``, in place (weights uninitialised:
    load the state dict next). Returns the model.

    >>> model = nn.Sequential(nn.LSTM(8, 16))
    >>> _ = compress_(model, Structured("lowrank", compression=4))
    >>> fresh = restore_(nn.Sequential(nn.LSTM(8, 16)), compressed_config(model))
    >>> fresh.load_state_dict(model.state_dict())
    <All keys matched successfully>
    """
    modules = _restored_modules(model, config)
    if "" in modules:
        raise CompressError("the config changes the model itself (a bare LSTM), which cannot be done in place: "
                            "build it with leanlstm.LSTM.from_config(config['modules']['']['config'])")
    for name, new in modules.items():
        replace_module(model, name, new)
    return model


def _restored_modules(model: nn.Module, config: dict[str, Any]) -> dict[str, nn.Module]:
    """The modules (by name) that differ from ``config``'s, rebuilt to it; every name and type checked first."""
    if not isinstance(config, dict) or config.get("format") != FORMAT or "modules" not in config:
        raise CompressError(f"not a compressed_config of format {FORMAT}: expected {{'format': {FORMAT}, "
                            f"'modules': ...}}")
    plan = []
    for name, entry in config["modules"].items():
        present = model if not name else _find(model, name)
        if present is None:
            raise CompressError(f"the config describes a module {name!r} that this {type(model).__name__} does "
                                f"not have: restore onto the same kind of model it was saved from")
        kinds = _COMPATIBLE.get(entry.get("type"))
        if kinds is None:
            raise CompressError(f"module {name!r} has an unknown type {entry.get('type')!r} in the config")
        if not isinstance(present, kinds):
            raise CompressError(f"module {name!r} is a {type(present).__name__} here but a {entry['type']} in the "
                                f"config: restore onto the same kind of model it was saved from")
        if _describe(present) != entry:
            plan.append((name, present, entry))
    return {name: _build(entry, present) for name, present, entry in plan}


_COMPATIBLE = {"leanlstm.LSTM": (nn.LSTM, LSTM), "torch.nn.LSTM": (nn.LSTM,), "torch.nn.Linear": (nn.Linear,),
               "leanlstm.FormLinear": (nn.Linear, FormLinear)}


def _outer(module: nn.Module, prefix: str):
    """Every module, but not the inside of an LSTM."""
    yield prefix, module
    if isinstance(module, (nn.LSTM, LSTM)):
        return
    for name, child in module.named_children():
        yield from _outer(child, qualified(prefix, name))


def _describe(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, LSTM):
        return {"type": "leanlstm.LSTM", "config": copy.deepcopy(module.config())}
    if isinstance(module, nn.LSTM):
        return {"type": "torch.nn.LSTM", "input_size": module.input_size, "hidden_size": module.hidden_size,
                "num_layers": module.num_layers, "bias": module.bias, "batch_first": module.batch_first,
                "dropout": float(module.dropout), "bidirectional": module.bidirectional,
                "proj_size": module.proj_size}
    if isinstance(module, FormLinear):
        return {"type": "leanlstm.FormLinear", "config": copy.deepcopy(module.config())}
    if isinstance(module, nn.Linear):
        return {"type": "torch.nn.Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return None


def _build(entry: dict[str, Any], like: nn.Module) -> nn.Module:
    """A module of ``entry``'s structure on ``like``'s device and dtype, in its train/eval mode."""
    reference = next(like.parameters(), None)
    where = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    arguments = {k: v for k, v in entry.items() if k != "type"}
    if entry["type"] == "leanlstm.LSTM":
        new = LSTM.from_config(entry["config"]).to(**where)
    elif entry["type"] == "torch.nn.LSTM":
        new = nn.LSTM(**arguments, **where)
    elif entry["type"] == "leanlstm.FormLinear":
        new = FormLinear.from_config(entry["config"]).to(**where)
    else:
        new = nn.Linear(**arguments, **where)
    return new.train(like.training)
