"""Finding a model's recurrent stacks, what feeds them and what reads their output, from the module graph.

Nothing in leanlstm looks a part up by attribute name: a user's keyword spotter (``self.rnn``, ``self.fc``),
PyTorch's ``word_language_model`` (``self.encoder``, ``self.rnn``, ``self.decoder``) and leanlstm's own models
are all read the same way. ``find_lstms`` walks the module tree; ``trace`` writes the forward pass as a
``torch.fx`` graph in which recurrent stacks and every ``torch.nn`` module are single nodes; ``consumers`` and
``producers`` follow that graph through the operations that keep a tensor's channels (dropout, activations,
views, slicing over time) to the modules on either side.

Tracing is symbolic (no input is needed). Arguments of ``forward`` whose default is ``None`` (an optional
state, optional targets) are traced as ``None``, the inference path.
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .nn import LSTM, FormLinear, WeightForm

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, LSTM)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, FormLinear)   # a head: x @ W.T + b, W dense or a form

FilterFn = Callable[[nn.Module, str], bool]


class GraphError(ValueError):
    """The model's structure cannot be read or changed as asked; the message says which part and why."""


# --- the module tree -------------------------------------------------------------------------------------------
def find_lstms(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` of every recurrent stack in ``model`` (itself included, named ``""``), outermost
    first; ``filter_fn(module, name)`` selects among them, as in torchao's ``quantize_``.

    >>> class Spotter(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn, self.fc = nn.LSTM(40, 64, 2, batch_first=True), nn.Linear(64, 12)
    >>> [name for name, _ in find_lstms(Spotter())]
    ['rnn']
    """
    found = []
    for name, module in _outer_modules(model, ""):
        if isinstance(module, RECURRENT_TYPES) and (filter_fn is None or filter_fn(module, name)):
            found.append((name, module))
    return found


def _outer_modules(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Every module, but not the inside of a recurrent stack (its cell layers and forms are not separate parts)."""
    yield prefix, module
    if isinstance(module, RECURRENT_TYPES):
        return
    for name, child in module.named_children():
        yield from _outer_modules(child, f"{prefix}.{name}" if prefix else name)


def lstm_forms(model: nn.Module, filter_fn: FilterFn | None = None) -> Iterator[tuple[str, WeightForm]]:
    """``(qualified_name, form)`` of every weight matrix of every ``leanlstm.LSTM`` in ``model``.

    >>> [name for name, _ in lstm_forms(nn.ModuleDict({"rnn": LSTM(3, 4)}))]
    ['rnn.layers.0.weight_ih', 'rnn.layers.0.weight_hh']
    """
    for name, lstm in find_lstms(model, filter_fn):
        if isinstance(lstm, LSTM):
            for form_name, form in lstm.forms():
                yield (f"{name}.{form_name}" if name else form_name), form


def find_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` of every ``nn.Linear`` or ``FormLinear`` outside the recurrent stacks: the heads
    and decoders a method may compress beside the LSTMs.

    >>> [name for name, _ in find_heads(nn.ModuleDict({"rnn": LSTM(3, 4), "fc": nn.Linear(4, 2)}))]
    ['fc']
    """
    return [(name, module) for name, module in _outer_modules(model, "") if isinstance(module, LINEAR_TYPES)]


def head_forms(model: nn.Module) -> Iterator[tuple[str, WeightForm]]:
    """``(qualified_name, form)`` of the weight of every ``FormLinear`` head (``"decoder.weight"``)."""
    for name, module in find_heads(model):
        if isinstance(module, FormLinear):
            yield (f"{name}.weight" if name else "weight"), module.form


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is, in place."""
    if not name:
        raise GraphError("cannot replace the model itself in place; use the returned module instead")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise GraphError(f"the model has no submodule {name!r}")
    setattr(parent, child, new)


# --- the forward graph -----------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Recurrent stacks, heads and every ``torch.nn`` module are leaves (single ``call_module`` nodes)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, RECURRENT_TYPES + LINEAR_TYPES) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """The forward pass of ``model`` as a ``torch.fx`` graph (recurrent stacks and ``torch.nn`` modules as nodes).

    >>> graph = trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    >>> [node.op for node in graph.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, RECURRENT_TYPES):
        raise GraphError(f"{type(model).__name__} is a recurrent stack itself: there is no graph around it to trace")
    concrete = {name: None for name, parameter in inspect.signature(model.forward).parameters.items()
                if parameter.default is None}
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as error:  # fx raises many kinds; all mean the same thing to a user
        raise GraphError(f"cannot trace {type(model).__name__}.forward symbolically ({type(error).__name__}: "
                         f"{error}). leanlstm reads a model's structure with torch.fx: keep Python control flow "
                         f"on tensors out of forward (wrap such a helper with torch.fx.wrap), or apply leanlstm to "
                         f"the recurrent module itself") from None
    return fx.GraphModule(model, graph)


# Operations that keep a tensor's channels (its last axis) where they are: the modules on either side of them are
# still connected channel by channel.
_KEEP_MODULES = (nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU)
_KEEP_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.dropout,
                   nn.functional.gelu, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose,
                   nn.functional.leaky_relu, nn.functional.silu, nn.functional.elu}
_KEEP_METHODS = {"view", "reshape", "contiguous", "transpose", "squeeze", "unsqueeze", "flatten", "relu", "tanh",
                 "sigmoid", "float", "to", "clone", "detach", "permute"}


@dataclass
class Link:
    """A module on the other side of a recurrent stack: ``how`` it is connected and the operations in between.

    ``how``: ``"per_step"`` (reads the output at every step), ``"last_step"`` (reads one time step of it, e.g.
    ``out[:, -1]``), ``"state"`` (reads the returned state), ``"input"`` / ``"output"`` (the model's own input or
    output), or ``"opaque"`` (some other operation, named in ``ops``, mixes the channels).
    """

    name: str
    module: nn.Module | None
    how: str
    ops: list[str] = field(default_factory=list)


def consumers(model: nn.Module, name: str, graph: fx.GraphModule | None = None) -> list[Link]:
    """The modules that read the output of submodule ``name``, through channel-keeping operations.

    >>> class Spotter(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn, self.fc = nn.LSTM(40, 64, 2, batch_first=True), nn.Linear(64, 12)
    ...     def forward(self, x):
    ...         out, _ = self.rnn(x)
    ...         return self.fc(out[:, -1])
    >>> [(link.name, link.how) for link in consumers(Spotter(), "rnn")]
    [('fc', 'last_step')]
    """
    if not name:
        return [Link("", None, "output")]         # the model is the module: its output is the model's
    graph = graph if graph is not None else trace(model)
    node = _module_node(graph, name)
    links = [_link(graph, user, ops, "output") for user, ops in _follow(node, _forward_users)]
    return sorted(links, key=lambda link: (link.name, link.how))


def producers(model: nn.Module, name: str, graph: fx.GraphModule | None = None) -> list[Link]:
    """The modules whose output feeds submodule ``name``'s first input, through channel-keeping operations."""
    if not name:
        return [Link("", None, "input")]
    graph = graph if graph is not None else trace(model)
    node = _module_node(graph, name)
    if not node.args or not isinstance(node.args[0], fx.Node):
        return []
    return [_link(graph, source, ops, "input") for source, ops in _follow(node.args[0], _backward_inputs, first=True)]


def node_module(graph: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph.get_submodule(node.target) if node.op == "call_module" else None


def _module_node(graph: fx.GraphModule, name: str) -> fx.Node:
    calls = [node for node in graph.graph.nodes if node.op == "call_module" and node.target == name]
    if not calls:
        raise GraphError(f"the forward pass never calls submodule {name!r}")
    if len(calls) > 1:
        raise GraphError(f"the forward pass calls submodule {name!r} {len(calls)} times; leanlstm handles a module "
                         f"used once")
    return calls[0]


def _forward_users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _backward_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.args[:1] if isinstance(arg, fx.Node)]


def _follow(start: fx.Node, step: Callable[[fx.Node], list[fx.Node]], first: bool = False
            ) -> list[tuple[fx.Node, list[str]]]:
    """Walk from ``start`` through channel-keeping nodes; returns the boundary nodes reached, each with the
    operations passed on the way (``item[k]`` for a part of a returned tuple, ``last_step`` for one time step)."""
    found, stack = [], [(node, []) for node in ([start] if first else step(start))]
    while stack:
        node, ops = stack.pop()
        kind = _classify(node)
        if kind is None:
            found.append((node, ops))
            continue
        stack.extend((nxt, ops + [kind]) for nxt in step(node))
    return found


def _classify(node: fx.Node) -> str | None:
    """The channel-keeping operation a node is (its name), or None for a boundary (a module, an output, an
    operation that mixes channels)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem_kind(node)
    if node.op == "call_function" and node.target in _KEEP_FUNCTIONS:
        return node.target.__name__
    if node.op == "call_method" and node.target in _KEEP_METHODS:
        return node.target
    if node.op == "call_module" and _is_keep_module(node):
        return "module"
    return None


def _is_keep_module(node: fx.Node) -> bool:
    root = node.graph.owning_module
    return root is not None and isinstance(root.get_submodule(node.target), _KEEP_MODULES)


def _getitem_kind(node: fx.Node) -> str | None:
    """``item[k]``: part k of a tuple a module returned ((output, state) of a recurrent stack); ``last_step``: an
    integer index before the channel axis (``out[-1]``, ``out[:, -1]``); ``slice``: slices only. An integer index
    on the channel axis (``out[..., 3]``) mixes nothing but drops channels: a boundary."""
    source, index = node.args
    if isinstance(source, fx.Node) and source.op == "call_module" and isinstance(index, int):
        return f"item[{index}]"
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index) and isinstance(index[-1], int):
        return None
    if any(isinstance(i, int) for i in index):
        return "last_step"
    return "slice"


def _link(graph: fx.GraphModule, node: fx.Node, ops: list[str], end: str) -> Link:
    module = node_module(graph, node)
    name = "" if node.op == "output" else (str(node.target) if node.op in ("call_module", "placeholder")
                                           else _describe(node))
    if _via_state(ops):
        return Link(name, module, "state", ops)
    if node.op in ("output", "placeholder"):
        return Link(name, None, end, ops)
    if module is None:
        return Link(name, None, "opaque", ops + [name])
    return Link(name, module, "last_step" if "last_step" in ops else "per_step", ops)


def _via_state(ops: list[str]) -> bool:
    """Whether the path left a recurrent stack through its returned state (``item[1]``), not its output."""
    return bool(ops) and ops[0].startswith("item[") and ops[0] != "item[0]"


def _describe(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))
