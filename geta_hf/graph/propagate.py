"""Propagate index spaces through an exported ATen graph (see `spaces.py` for the algebra).

Each op either relates the index spaces of its inputs and outputs (element-wise ops unify them,
reshapes split/merge them, slices and ``cat`` cut/concatenate them, linear layers and matmuls
pass them through and contract the inner one, attention ties query/key/value heads together),
or *pins* them: a norm or softmax reduces over them, an embedding lookup indexes them, the model
outputs them, or the op is not understood. Unknown ops are recorded so that an empty search
space can be explained.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from .capture import CapturedGraph
from .spaces import SpaceAlgebra

__all__ = ["Propagator", "register_op", "OP_RULES"]

from .fxutil import (Dims, _ALONG_DIM, _CREATE_FREE, _CREATE_PINNED, _IGNORE, _POINTWISE_EXTRA,
                     _RESHAPE, _REDUCE, _SAME, _TRANSPARENT, _module_of, _packet, _shape, aten)
from .rules import ComputeRules, LayoutRules


class Propagator(LayoutRules, ComputeRules):
    """Runs the index-space analysis over a captured graph."""

    def __init__(self, captured: CapturedGraph) -> None:
        self.cap = captured
        self.graph = captured.program.graph
        self.S = SpaceAlgebra()
        self.dims: Dict[fx.Node, Any] = {}
        self.param_atoms: Dict[Tuple[str, int], int] = {}
        self.param_shapes: Dict[str, Tuple[int, ...]] = {}
        self.param_nodes: Dict[fx.Node, str] = {}
        self.unknown: List[Tuple[str, str]] = []

    # ------------------------------------------------------------------ helpers
    def fresh(self, shape: Sequence[int], pin: Optional[str] = None, tag: Optional[str] = None) -> Dims:
        """New independent index spaces, one per dimension of size > 1."""
        return [[self.S.new(s, pin=pin, tag=tag)] if s > 1 else [] for s in shape]

    def D(self, node) -> Dims:
        """The index spaces of a tensor-valued node (``KeyError`` if it has none)."""
        d = self.dims.get(node)
        if d is None or (isinstance(d, tuple) and d and d[0] == "tuple"):
            raise KeyError(node)
        return d

    def tensor_args(self, node: fx.Node) -> List[fx.Node]:
        """The node's tensor arguments that carry index spaces, flattened in order."""
        out: List[fx.Node] = []

        def visit(a):
            if isinstance(a, fx.Node):
                if isinstance(a.meta.get("val"), torch.Tensor) and a in self.dims:
                    out.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)

        for a in node.args:
            visit(a)
        for a in node.kwargs.values():
            visit(a)
        return out

    def pin_node(self, node: fx.Node, reason: str) -> None:
        """Make every index space of ``node``'s output unprunable, recording ``reason``."""
        d = self.dims.get(node)
        if d is None:
            return
        groups = d[1] if isinstance(d, tuple) else [d]
        for dims in groups:
            for dim in dims:
                self.S.pin_all(dim, reason)

    def _fresh_like(self, node: fx.Node, pin: str):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return self.fresh(val.shape, pin=pin)
        if isinstance(val, (list, tuple)):
            return ("tuple", [self.fresh(v.shape, pin=pin) if isinstance(v, torch.Tensor) else None
                              for v in val])
        return None

    def broadcast_into(self, out: List[Optional[List[int]]], out_shape: Sequence[int],
                       in_dims: Dims, in_shape: Sequence[int]) -> None:
        """Merge an input's spaces into the output's under broadcasting (size-1 dims skipped)."""
        off = len(out_shape) - len(in_shape)
        for k, s in enumerate(in_shape):
            j = k + off
            if j < 0 or s <= 1 or s != out_shape[j]:
                continue
            if out[j] is None:
                out[j] = list(in_dims[k])
            else:
                self.S.align(out[j], in_dims[k])

    def finish(self, out: List[Optional[List[int]]], shape: Sequence[int], tag: str) -> Dims:
        """Output spaces: the merged ones, and fresh spaces tagged ``tag`` where none was set."""
        return [d if d is not None else ([self.S.new(s, tag=tag)] if s > 1 else [])
                for d, s in zip(out, shape)]

    # ------------------------------------------------------------------ driver
    def run(self) -> "Propagator":
        """Propagate index spaces through every node of the graph; returns ``self``."""
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "call_function":
                try:
                    self._call(node)
                except KeyError:
                    # an input we could not describe: treat the op as unknown
                    self._unknown(node, "input without index-space information")
            elif node.op == "output":
                for a in _flatten(node.args):
                    if isinstance(a, fx.Node) and a in self.dims:
                        self.pin_node(a, "the model outputs it")
        return self

    def _placeholder(self, node: fx.Node) -> None:
        shape = _shape(node)
        if shape is None:
            return
        name = self.cap.param_of.get(node.name)
        if name is not None and not node.users:
            return  # a parameter the forward does not use (e.g. a PEFT adapter held aside)
        if name is not None:
            self.param_nodes[node] = name
            self.param_shapes[name] = shape
            dims = self.fresh(shape)
            for k, d in enumerate(dims):
                if d:
                    self.param_atoms[(name, k)] = d[0]
            self.dims[node] = dims
        else:
            what = self.cap.non_param_inputs.get(node.name, f"input {node.name}")
            self.dims[node] = self.fresh(shape, pin=f"comes from {what}")

    def _unknown(self, node: fx.Node, why: str = "") -> None:
        name = str(node.target)
        self.unknown.append((name, _module_of(node)))
        reason = f"unsupported op {name} in {_module_of(node)}" + (f" ({why})" if why else "")
        for a in self.tensor_args(node):
            self.pin_node(a, reason)
        self.dims[node] = self._fresh_like(node, pin=reason)

    def _call(self, node: fx.Node) -> None:
        t = node.target
        if t is operator.getitem:
            src, i = node.args
            d = self.dims.get(src)
            if isinstance(d, tuple) and d[0] == "tuple" and i < len(d[1]) and d[1][i] is not None:
                self.dims[node] = d[1][i]
            elif _shape(node) is not None:
                self._unknown(node, "item of an unknown tuple")
            return
        pk = _packet(t)
        if pk is None:  # higher-order ops and Python callables
            self._unknown(node)
            return
        custom = _REGISTERED.get(pk)
        if custom is not None:  # register_op: the user's rule wins over the built-in one
            custom(self, node)
            return
        if pk in _IGNORE:
            return
        shape = _shape(node)
        if pk in _SAME:
            self._same(node)
            return
        if torch.Tag.pointwise in getattr(t, "tags", ()) or pk in _POINTWISE_EXTRA:
            self._pointwise(node)
            return
        handler = _HANDLERS.get(pk)
        if handler is None:
            if pk in _CREATE_FREE:
                self.dims[node] = self.fresh(shape, tag="constant") if shape is not None else None
            elif pk in _CREATE_PINNED:
                self.dims[node] = self._fresh_like(node, pin=f"created by {t}")
            elif pk in _REDUCE:
                self._reduce(node)
            elif pk in _ALONG_DIM:
                self._along_dim(node)
            else:
                self._unknown(node)
            return
        handler(self, node)

_HANDLERS = {
    aten.linear: Propagator._linear,
    aten.addmm: Propagator._addmm,
    aten.mm: lambda self, n: self.dims.__setitem__(n, self._mm(n, n.args[0], n.args[1])),
    aten.bmm: Propagator._matmul,
    aten.matmul: Propagator._matmul,
    aten.baddbmm: Propagator._matmul,
    aten.einsum: Propagator._einsum,
    aten.scaled_dot_product_attention: Propagator._sdpa,
    aten.embedding: Propagator._embedding,
    aten.layer_norm: Propagator._layer_norm,
    aten.native_layer_norm: Propagator._layer_norm,
    aten.rms_norm: Propagator._layer_norm,
    aten.expand: Propagator._expand,
    aten.expand_as: Propagator._expand,
    aten.slice: Propagator._slice,
    aten.narrow: Propagator._narrow,
    aten.select: Propagator._select,
    aten.split: Propagator._split,
    aten.split_with_sizes: Propagator._split,
    aten.chunk: Propagator._split,
    aten.unbind: Propagator._split,
    aten.cat: Propagator._cat,
    aten.concat: Propagator._cat,
    aten.stack: Propagator._stack,
    aten.permute: Propagator._permute,
    aten.transpose: Propagator._permute,
    aten.swapaxes: Propagator._permute,
    aten.t: Propagator._permute,
    aten.numpy_T: Propagator._permute,
    aten.movedim: Propagator._permute,
}
for _op in _RESHAPE:
    _HANDLERS[_op] = Propagator._reshape


# ---------------------------------------------------------------------------- extension point
#: the built-in rules :func:`register_op` accepts by name
OP_RULES = {
    "same": Propagator._same,            # output dims = first input's (clone-like)
    "pointwise": Propagator._pointwise,  # element-wise with broadcasting
    "along_dim": Propagator._along_dim,  # mixes values along args[1] (softmax, sort, topk)
    "reshape": Propagator._reshape,      # view/reshape: spaces split and merge with the shape
    "permute": Propagator._permute,      # reorders dims
    "unsupported": Propagator._unknown,  # pins every space it touches (the safe default)
}
_REGISTERED: Dict[Any, Callable[["Propagator", fx.Node], None]] = {}


def register_op(op, rule: Union[str, Callable[["Propagator", fx.Node], None]], *,
                contracts: Optional[Mapping[int, int]] = None) -> None:
    """Teach the graph analysis an ATen op it does not know (or override a built-in rule).

    Args:
        op: the op as it appears in exported graphs, e.g. ``torch.ops.aten.sort`` (an overload
            packet; an overload such as ``aten.sort.default`` stands for its packet).
        rule: how index spaces flow from the op's inputs to its outputs: a name in
            :data:`OP_RULES`, or a function ``rule(propagator, node)`` that sets
            ``propagator.dims[node]`` from ``propagator.D(arg)`` of its arguments (see
            :class:`Propagator`: ``fresh``, ``pin_node``, ``broadcast_into``, ``finish``).
        contracts: for ops that multiply by a weight: ``{argument position: contracted dim}``
            (negative dims count from the end), as ``aten.linear``'s ``{1: -1}``. A weight dim
            that every use contracts is a consumer's input columns, removed with the unit.

    Unknown ops pin every space they touch (so they never produce a wrong unit); registering
    a rule can only make more units prunable, so the rule must be right: e.g. an op that mixes
    values along a dim must pin it (``"along_dim"``).
    """
    pk = _packet(op) or op
    if isinstance(rule, str):
        if rule not in OP_RULES:
            raise ValueError(f"register_op: rule {rule!r} is unknown; allowed: one of "
                             f"{sorted(OP_RULES)} or a callable (propagator, node)")
        rule = OP_RULES[rule]
    elif not callable(rule):
        raise ValueError(f"register_op: rule must be a name in {sorted(OP_RULES)} or a "
                         f"callable (propagator, node); got {type(rule).__name__}")
    if contracts is not None:
        if not isinstance(contracts, Mapping) or not all(
                isinstance(k, int) and isinstance(v, int) for k, v in contracts.items()):
            raise ValueError("register_op: contracts must map argument positions (int) to "
                             "contracted dims (int)")
        _CONTRACTS[pk] = dict(contracts)
    _REGISTERED[pk] = rule


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


# ---------------------------------------------------------------------------- weight roles
_CONTRACTS = {
    # op packet -> {argument position: contracted dim (negative = from the end)}
    aten.linear: {1: -1},
    aten.addmm: {1: -1, 2: -2},
    aten.mm: {0: -1, 1: -2},
    aten.bmm: {0: -1, 1: -2},
    aten.matmul: {0: -1, 1: -2},
    aten.baddbmm: {1: -1, 2: -2},
}


def contracted_param_dims(graph: fx.Graph, param_nodes: Dict[fx.Node, str],
                          param_shapes: Dict[str, Tuple[int, ...]]) -> Dict[Tuple[str, int], bool]:
    """For every (parameter, dim): True iff *every* use of the parameter contracts that dim.

    Contracted dims are the input columns of consumer layers (a linear's weight dim 1, a
    Conv1D's dim 0): GETA removes them at export but does not include them in the group.
    """
    uses: Dict[Tuple[str, int], List[bool]] = defaultdict(list)

    def walk(node: fx.Node, name: str, dim_map: List[int]):
        for user in node.users:
            pk = _packet(user.target) if user.op == "call_function" else None
            if pk in _TRANSPARENT:
                walk(user, name, dim_map)
                continue
            if pk in (aten.t, aten.transpose, aten.permute, aten.numpy_T) and len(dim_map) == 2:
                walk(user, name, dim_map[::-1])
                continue
            contracted = set()
            spec = _CONTRACTS.get(pk, {})
            for pos, a in enumerate(user.args):
                if a is node and pos in spec:
                    nd = len(dim_map)
                    cd = spec[pos] + nd if spec[pos] < 0 else spec[pos]
                    if nd == 1:
                        cd = 0
                    contracted.add(dim_map[cd])
            if pk is aten.einsum and node in list(user.args[1]):
                lhs, _, rhs = user.args[0].replace(" ", "").partition("->")
                term = lhs.split(",")[list(user.args[1]).index(node)]
                contracted |= {dim_map[i] for i, ch in enumerate(term) if ch not in rhs}
            for d in range(len(dim_map)):
                uses[(name, d)].append(d in contracted)

    for node, name in param_nodes.items():
        walk(node, name, list(range(len(param_shapes[name]))))
    return {k: bool(v) and all(v) for k, v in uses.items()}
