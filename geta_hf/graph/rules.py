"""The built-in propagation rules of :class:`geta_hf.graph.propagate.Propagator`, by op family.

:class:`LayoutRules`: ops that keep, merge, split, cut or join index spaces (reductions,
element-wise ops, reshapes, permutes, expand, slices, split/cat/stack). :class:`ComputeRules`:
ops that contract an index space (linear, matmuls, einsum, attention) or pin one (embedding
lookups, norms). Both are mixins of ``Propagator`` and use its helpers (``D``, ``fresh``,
``pin_node``, ``broadcast_into``, ``finish``, ``S``, ``dims``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .fxutil import Dims, _module_of, _norm_dim, _packet, _shape, aten

__all__ = ["LayoutRules", "ComputeRules"]


class LayoutRules:
    """Ops that move index spaces around without contracting them."""

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


class ComputeRules:
    """Ops that contract an index space (weights, matmuls, attention) or pin one (lookups, norms)."""

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
