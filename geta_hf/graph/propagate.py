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

aten = torch.ops.aten

Dims = List[List[int]]


def _ops(*names: str) -> set:
    """The aten op packets among ``names`` that exist in this torch build."""
    return {getattr(aten, n) for n in names if hasattr(aten, n)}

# ops that return a tensor with exactly the input's dimensions (values may differ)
_SAME = _ops("clone", "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "dropout",
    "feature_dropout", "alpha_dropout", "lift_fresh_copy", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "fill_", "zero_", "bernoulli", "bernoulli_", "relu_",
    "requires_grad_", "resolve_conj", "resolve_neg")
# element-wise ops that torch does not tag as pointwise
_POINTWISE_EXTRA = _ops("__and__", "__or__", "__xor__", "__invert__", "copy_", "masked_fill",
    "masked_fill_", "where", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "bitwise_or", "bitwise_not", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isneginf",
    "isposinf", "isfinite", "gelu", "silu", "relu", "hardtanh", "mish", "softplus")
_RESHAPE = _ops("view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "flatten", "unflatten",
    "view_as", "reshape_as", "squeeze_", "unsqueeze_")
# constant-valued creation: their spaces can be resized freely (the code recreates them)
_CREATE_FREE = _ops("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full",
    "new_empty", "empty_strided", "scalar_tensor")
# creation whose values depend on the index: not removable
_CREATE_PINNED = _ops("arange", "rand", "randn", "randint", "linspace", "eye", "tensor",
    "randperm")
_REDUCE = _ops("sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
    "prod", "linalg_vector_norm", "norm", "logsumexp", "argmax", "argmin", "all", "any",
    "count_nonzero")
_ALONG_DIM = _ops("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod",
    "logcumsumexp", "_safe_softmax")
_IGNORE = _ops("_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "_assert_scalar",
    "_assert_async", "sym_constrain_range_for_size")
#: ops that pass a parameter through unchanged in layout (used to find contracted weight dims)
_TRANSPARENT = _ops("to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as",
    "lift_fresh_copy")


def _packet(target):
    return getattr(target, "overloadpacket", None)


def _shape(node) -> Optional[Tuple[int, ...]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _module_of(node: fx.Node) -> str:
    """``'name (Class)'`` of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "the top-level module"
    fqn, cls = list(stack.values())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    cls = cls.rsplit(".", 1)[-1]
    return f"{fqn} ({cls})" if fqn else f"the top-level module ({cls})"


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


class Propagator:
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

    # ------------------------------------------------------------------ op handlers
    def _reduce(self, node: fx.Node) -> None:
        x = node.args[0]
        xd, xs = self.D(x), _shape(x)
        args = {a.name: v for a, v in zip(node.target._schema.arguments, node.args)}
        args.update(node.kwargs)
        dim = args.get("dim", None)
        keep = bool(args.get("keepdim", False))
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            reduced = list(range(len(xs)))
        elif isinstance(dim, int):
            reduced = [_norm_dim(dim, len(xs))]
        else:
            reduced = [_norm_dim(d, len(xs)) for d in dim]
        for r in reduced:
            self.S.pin_all(xd[r], f"reduced over by {node.target}")
        out = [([] if keep else None) if i in reduced else xd[i] for i in range(len(xs))]
        out = [o for o in out if o is not None]
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            self.dims[node] = ("tuple", [out if isinstance(v, torch.Tensor) and
                                         len(v.shape) == len(out) else
                                         (self.fresh(v.shape, pin="reduction output")
                                          if isinstance(v, torch.Tensor) else None) for v in val])
        elif _shape(node) is not None and len(_shape(node)) == len(out):
            self.dims[node] = out
        else:
            self.dims[node] = self._fresh_like(node, pin="reduction output")

    def _along_dim(self, node: fx.Node, dim_arg: int = 1) -> None:
        """Values are mixed along one dim (softmax, sort): it is pinned, the others pass; a
        tuple output (values, indices) gets the same spaces for every item."""
        x = node.args[0]
        dim = node.args[dim_arg] if len(node.args) > dim_arg else node.kwargs.get("dim", -1)
        dims = self.D(x)
        self.S.pin_all(dims[_norm_dim(dim, len(dims))], f"{_packet(node.target).__name__} over it")
        val = node.meta.get("val")
        self.dims[node] = ("tuple", [dims for _ in val]) if isinstance(val, (tuple, list)) else dims

    def _same(self, node: fx.Node) -> None:
        """The output has exactly the first argument's spaces."""
        x = node.args[0]
        if _shape(x) == _shape(node) and x in self.dims:
            self.dims[node] = self.D(x)
        elif _shape(node) is not None:
            self._unknown(node)

    def _pointwise(self, node: fx.Node) -> None:
        """Element-wise with broadcasting: the arguments' spaces merge per output dim."""
        shape = _shape(node)
        if shape is None:
            return
        out: List[Optional[List[int]]] = [None] * len(shape)
        for a in self.tensor_args(node):
            self.broadcast_into(out, shape, self.D(a), _shape(a))
        self.dims[node] = self.finish(out, shape, tag="broadcast")

    def _reshape(self, node: fx.Node) -> None:
        x = node.args[0]
        out = self.S.reshape(self.D(x), _shape(node))
        if out is None:
            reason = f"reshape {_shape(x)} -> {_shape(node)} in {_module_of(node)} mixes index spaces"
            self.pin_node(x, reason)
            out = self.fresh(_shape(node), pin=reason)
        self.dims[node] = out

    def _permute(self, node: fx.Node) -> None:
        x = node.args[0]
        d = self.D(x)
        n = len(d)
        pk = _packet(node.target)
        if pk in (aten.permute,):
            perm = [_norm_dim(p, n) for p in node.args[1]]
        elif pk in (aten.t, aten.numpy_T):
            perm = list(range(n))[::-1]
        elif pk is aten.movedim:
            src, dst = node.args[1], node.args[2]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            order = [i for i in range(n) if i not in [_norm_dim(s, n) for s in src]]
            perm = [None] * n
            for s, t in zip(src, dst):
                perm[_norm_dim(t, n)] = _norm_dim(s, n)
            it = iter(order)
            perm = [p if p is not None else next(it) for p in perm]
        else:  # transpose / swapaxes
            a, b = _norm_dim(node.args[1], n), _norm_dim(node.args[2], n)
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
        self.dims[node] = [d[p] for p in perm]

    def _expand(self, node: fx.Node) -> None:
        x = node.args[0]
        xd, xs, os_ = self.D(x), _shape(x), _shape(node)
        off = len(os_) - len(xs)
        out = []
        for j, s in enumerate(os_):
            k = j - off
            if k >= 0 and xs[k] == s:
                out.append(xd[k])
            else:
                out.append([self.S.new(s, tag="expand")] if s > 1 else [])
        self.dims[node] = out

    def _slice(self, node: fx.Node) -> None:
        args = list(node.args) + [None] * 5
        self._slice_impl(node, args[0], args[1] or 0, args[2], args[3], args[4] or 1)

    def _slice_impl(self, node: fx.Node, x, dim, start, end, step) -> None:
        xd, xs = self.D(x), _shape(x)
        dim = _norm_dim(dim, len(xs))
        n = xs[dim]
        start = 0 if start is None else (start + n if start < 0 else start)
        end = n if end is None else (end + n if end < 0 else end)
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if end <= start:  # an empty slice (e.g. the pass-through part of a full rotary)
            self.dims[node] = xd[:dim] + [[]] + xd[dim + 1:]
            return
        res = self.S.slice_dim(xd[dim], start, end) if step == 1 else None
        if res is None:
            reason = f"strided or irregular slice in {_module_of(node)}"
            self.S.pin_all(xd[dim], reason)
            res = [self.S.new(_shape(node)[dim], pin=reason)] if _shape(node)[dim] > 1 else []
        out = list(xd)
        out[dim] = res
        self.dims[node] = out

    def _narrow(self, node: fx.Node) -> None:
        x, dim, start, length = node.args[:4]
        self._slice_impl(node, x, dim, start, start + length, 1)

    def _select(self, node: fx.Node) -> None:
        x, dim = node.args[0], node.args[1]
        xd = self.D(x)
        dim = _norm_dim(dim, len(xd))
        self.S.pin_all(xd[dim], f"a single index is selected in {_module_of(node)}")
        self.dims[node] = xd[:dim] + xd[dim + 1:]

    def _split(self, node: fx.Node) -> None:
        pk = _packet(node.target)
        x = node.args[0]
        xd, xs = self.D(x), _shape(x)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = _norm_dim(dim, len(xs))
        n = xs[dim]
        if pk is aten.unbind:
            dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(xs))
            self.S.pin_all(xd[dim], f"unbind in {_module_of(node)}")
            self.dims[node] = ("tuple", [xd[:dim] + xd[dim + 1:] for _ in range(xs[dim])])
            return
        if pk is aten.split_with_sizes:
            sizes = list(node.args[1])
        elif pk is aten.chunk:
            chunks = node.args[1]
            step = -(-n // chunks)
            sizes = [min(step, n - i) for i in range(0, n, step)]
        else:
            step = node.args[1]
            sizes = [min(step, n - i) for i in range(0, n, step)]
        outs, off = [], 0
        for s in sizes:
            res = self.S.slice_dim(xd[dim], off, off + s) if s > 0 else []
            if res is None:
                reason = f"irregular split in {_module_of(node)}"
                self.S.pin_all(xd[dim], reason)
                res = [self.S.new(s, pin=reason)] if s > 1 else []
            d = list(xd)
            d[dim] = res
            outs.append(d)
            off += s
        self.dims[node] = ("tuple", outs)

    def _cat(self, node: fx.Node) -> None:
        tensors = [t for t in node.args[0] if _shape(t) is not None]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        dim = _norm_dim(dim, len(shape))
        tensors = [t for t in tensors if len(_shape(t)) == len(shape) and _shape(t)[dim] > 0]
        out: List[Optional[List[int]]] = [None] * len(shape)
        for t in tensors:
            td, ts = self.D(t), _shape(t)
            for k in range(len(shape)):
                if k == dim or ts[k] <= 1 or ts[k] != shape[k]:
                    continue
                if out[k] is None:
                    out[k] = list(td[k])
                else:
                    self.S.align(out[k], td[k])
        if shape[dim] > 1:
            out[dim] = [self.S.concat([self.D(t)[dim] for t in tensors])]
        self.dims[node] = self.finish(out, shape, tag="broadcast")

    def _stack(self, node: fx.Node) -> None:
        tensors = list(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        dim = _norm_dim(dim, len(shape))
        base = [d for i, d in enumerate(shape) if i != dim]
        out: List[Optional[List[int]]] = [None] * len(base)
        for t in tensors:
            self.broadcast_into(out, base, self.D(t), _shape(t))
        dims = self.finish(out, base, tag="broadcast")
        dims.insert(dim, [self.S.new(shape[dim], pin="stacked index")] if shape[dim] > 1 else [])
        self.dims[node] = dims

    def _linear(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xd, wd = self.D(x), self.D(w)
        self.S.align(xd[-1], wd[1])
        if isinstance(b, fx.Node) and b in self.dims:
            self.S.align(self.D(b)[0], wd[0])
        self.dims[node] = xd[:-1] + [wd[0]]

    def _mm(self, node: fx.Node, a, b) -> Dims:
        ad, bd = self.D(a), self.D(b)
        self.S.align(ad[-1], bd[-2])
        return [ad[-2], bd[-1]]

    def _addmm(self, node: fx.Node) -> None:
        bias, a, b = node.args[0], node.args[1], node.args[2]
        out = self._mm(node, a, b)
        shape = _shape(node)
        res: List[Optional[List[int]]] = list(out)
        self.broadcast_into(res, shape, self.D(bias), _shape(bias))
        self.dims[node] = self.finish(res, shape, tag="broadcast")

    def _matmul(self, node: fx.Node) -> None:
        pk = _packet(node.target)
        if pk is aten.baddbmm:
            inp, a, b = node.args[0], node.args[1], node.args[2]
        else:
            inp, a, b = None, node.args[0], node.args[1]
        ad, bd, as_, bs = self.D(a), self.D(b), _shape(a), _shape(b)
        shape = _shape(node)
        if len(as_) == 1 and len(bs) == 1:
            self.S.align(ad[0], bd[0])
            out: List[Optional[List[int]]] = []
        elif len(bs) == 1:
            self.S.align(ad[-1], bd[0])
            out = list(ad[:-1])
        elif len(as_) == 1:
            self.S.align(ad[0], bd[-2])
            out = list(bd[:-2]) + [bd[-1]]
        else:
            batch_shape = shape[:-2]
            batch: List[Optional[List[int]]] = [None] * len(batch_shape)
            self.broadcast_into(batch, batch_shape, ad[:-2], as_[:-2])
            self.broadcast_into(batch, batch_shape, bd[:-2], bs[:-2])
            self.S.align(ad[-1], bd[-2])
            out = self.finish(batch, batch_shape, tag="broadcast") + [ad[-2], bd[-1]]
        if inp is not None:
            self.broadcast_into(out, shape, self.D(inp), _shape(inp))
        self.dims[node] = self.finish(out, shape, tag="broadcast")

    def _einsum(self, node: fx.Node) -> None:
        eq, operands = node.args[0], list(node.args[1])
        lhs, _, rhs = eq.replace(" ", "").partition("->")
        terms = lhs.split(",")
        if "..." in eq or len(terms) != len(operands) or not rhs and "->" not in eq:
            self._unknown(node, "einsum form not supported")
            return
        letter: Dict[str, List[int]] = {}
        sizes: Dict[str, int] = {}
        for term, op in zip(terms, operands):
            od, os_ = self.D(op), _shape(op)
            for ch, d, s in zip(term, od, os_):
                if s <= 1:
                    continue
                if ch in letter:
                    self.S.align(letter[ch], d)
                else:
                    letter[ch], sizes[ch] = list(d), s
        shape = _shape(node)
        self.dims[node] = [letter.get(ch, []) if s > 1 else [] for ch, s in zip(rhs, shape)]

    def _sdpa(self, node: fx.Node) -> None:
        names = [a.name for a in node.target._schema.arguments]
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        q, k, v = args["query"], args["key"], args["value"]
        qd, kd, vd = self.D(q), self.D(k), self.D(v)
        qs, ks = _shape(q), _shape(k)
        shape = _shape(node)
        batch_shape = shape[:-3]
        batch: List[Optional[List[int]]] = [None] * len(batch_shape)
        for t in (q, k, v):
            self.broadcast_into(batch, batch_shape, self.D(t)[:-3], _shape(t)[:-3])
        bd = self.finish(batch, batch_shape, tag="broadcast")
        hq, hk = qs[-3], ks[-3]
        if hq == hk:
            self.S.align(qd[-3], kd[-3])
        elif hk > 0 and hq % hk == 0:
            rep = self.S.new(hq // hk, tag="expand")
            self.S.align(qd[-3], kd[-3] + [rep])
        else:
            self._unknown(node, "query/key head counts do not divide")
            return
        self.S.align(kd[-3], vd[-3])
        self.S.align(qd[-1], kd[-1])
        self.S.align(kd[-2], vd[-2])
        mask = args.get("attn_mask")
        if isinstance(mask, fx.Node) and mask in self.dims:
            scores_shape = tuple(batch_shape) + (hq, qs[-2], ks[-2])
            scores: List[Optional[List[int]]] = list(bd) + [qd[-3], qd[-2], kd[-2]]
            self.broadcast_into(scores, scores_shape, self.D(mask), _shape(mask))
        self.dims[node] = bd + [qd[-3], qd[-2], vd[-1]]

    def _embedding(self, node: fx.Node) -> None:
        w, idx = node.args[0], node.args[1]
        wd = self.D(w)
        self.S.pin_all(wd[0], f"rows looked up by index in {_module_of(node)}")
        self.dims[node] = self.D(idx) + [wd[1]]

    def _layer_norm(self, node: fx.Node) -> None:
        pk = _packet(node.target)
        x, ns = node.args[0], node.args[1]
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        b = node.args[3] if len(node.args) > 3 and pk is not aten.rms_norm else node.kwargs.get("bias")
        xd = self.D(x)
        k = len(ns)
        reason = f"normalised by {pk.__name__} in {_module_of(node)}"
        for d in xd[len(xd) - k:]:
            self.S.pin_all(d, reason)
        for p in (w, b):
            if isinstance(p, fx.Node) and p in self.dims:
                pd = self.D(p)
                for a, c in zip(pd, xd[len(xd) - k:]):
                    self.S.align(a, c)
        if pk is aten.native_layer_norm:
            stats = self._fresh_like(node, pin="layer_norm statistics")[1]
            self.dims[node] = ("tuple", [xd] + stats[1:])
        else:
            self.dims[node] = xd


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
