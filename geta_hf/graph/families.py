"""From index spaces to families: which spaces of a propagated graph are prunable units, and
which parameter slices each unit owns (see :mod:`geta_hf.graph.qadg` for the vocabulary)."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .propagate import Propagator, contracted_param_dims
from .spaces import PROD, SpaceAlgebra, _prod
from .units import Family, Member, Role, UnitKind

__all__ = ["find_families"]

_LAST = 1 << 30  # sort key of a parameter the model does not list


def find_families(prop: Propagator, order: Dict[str, int], min_units: int
                  ) -> Tuple[List[Family], List[Tuple[str, str]]]:
    """The prunable families of ``prop``'s graph (named, in parameter order) and the spaces
    rejected, as ``(description, reason)``. ``order``: parameter name -> position in the model."""
    S = prop.S
    roles = contracted_param_dims(prop.graph, prop.param_nodes, prop.param_shapes)
    heads_like, kv_like = _head_layouts(S)
    contains = {key: S.contains(atom) for key, atom in prop.param_atoms.items()}
    families: List[Family] = []
    rejected: List[Tuple[str, str]] = []
    for c in _candidate_spaces(prop, roles):
        c = S.find(c)
        n = S.size[c]
        if S.is_pinned(c) or n < 2:
            continue
        members, consumers, bad = _unit_members(prop, c, roles, contains)
        if bad is not None:
            rejected.append((f"space of size {n}", bad))
            continue
        members.sort(key=lambda m: (order.get(m.param, _LAST), m.dim))
        consumers.sort(key=lambda m: (order.get(m.param, _LAST), m.dim))
        kind = (UnitKind.KV_GROUPS if c in kv_like else
                UnitKind.HEADS if c in heads_like else UnitKind.CHANNELS)
        layer = _layer_name([m.module for m in members + consumers])
        families.append(Family(name="", kind=kind, layer=layer, num_units=n,
                               min_units=min(max(1, min_units), n), members=members,
                               consumers=consumers, heads_per_unit=kv_like.get(c, 1),
                               head_dim=heads_like.get(c, 0)))
    families = _drop_nested(families, rejected)
    families.sort(key=lambda f: order.get(f.members[0].param, _LAST))
    return _named(families), rejected


def _candidate_spaces(prop: Propagator, roles) -> List[int]:
    """Candidate unit spaces: the major factors of the parameter dims that are not contracted."""
    candidates: List[int] = []
    for (name, dim), atom in prop.param_atoms.items():
        if roles.get((name, dim), False):
            continue
        for c in prop.S.unit_candidates(atom):
            if c not in candidates:
                candidates.append(c)
    return candidates


def _head_layouts(S: SpaceAlgebra) -> Tuple[Dict[int, int], Dict[int, int]]:
    """``(heads, kv_groups)``: unit space -> head size, and unit space -> query heads per kv head.

    A unit space that is the major factor of a product is a head; if a factor created by
    ``expand`` (repeat_kv / GQA SDPA) follows it, the unit is a kv-group of query heads."""
    heads_like: Dict[int, int] = {}
    kv_like: Dict[int, int] = {}
    for r, (kind, kids) in S.split.items():
        if kind != PROD or len(kids) < 2 or S.find(r) != r:
            continue
        first = S.find(kids[0])
        rest = [S.find(k) for k in kids[1:]]
        expanded = [k for k in rest if S.has_tag(k, "expand")]
        if expanded and len(expanded) == len(rest):
            kv_like[first] = _prod(S.size[k] for k in expanded)
        else:
            dh = _prod(S.size[k] for k in rest if not S.has_tag(k, "expand"))
            heads_like[first] = max(heads_like.get(first, 0), dh)
    return heads_like, kv_like


def _unit_members(prop: Propagator, c: int, roles, contains
                  ) -> Tuple[List[Member], List[Member], Optional[str]]:
    """``(members, consumers, why_not)`` of unit space ``c``: every parameter slice that holds
    its units (``why_not`` is None when ``c`` is a valid family)."""
    S = prop.S
    members: List[Member] = []
    consumers: List[Member] = []
    for (name, dim), atom in prop.param_atoms.items():
        if c not in contains[(name, dim)]:
            continue
        m, bad = _member(S, name, dim, atom, c, prop.param_shapes[name], roles.get((name, dim)))
        if bad is not None:
            return members, consumers, bad
        (consumers if m.role == Role.IN else members).append(m)
    if S.has_tag(c, "expand"):
        # query heads sharing one key/value head (MQA): zero query rows give uniform attention
        # over the shared values, not a zero output, so the unit's output columns must be
        # zeroed (and scored) with it to make its contribution vanish
        members += [replace(m, role=Role.OUT) for m in consumers]
        consumers = []
    return members, consumers, None if members else "no parameter produces it"


def _member(S: SpaceAlgebra, name: str, dim: int, atom: int, c: int, shape: Sequence[int],
            contracted: bool) -> Tuple[Optional[Member], Optional[str]]:
    """The slices of parameter ``name`` along ``dim`` owned by each unit of space ``c``."""
    n = S.size[c]
    lab = S.labels(atom, c)
    if lab is None:
        return None, f"{name} dim {dim} maps to the space ambiguously"
    counts = torch.bincount(lab[lab >= 0], minlength=n)
    if counts.numel() != n or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None, f"{name} dim {dim} holds the units unevenly"
    index = torch.argsort(lab[lab >= 0], stable=True)
    pos = torch.nonzero(lab >= 0).reshape(-1)[index].reshape(n, -1)
    return Member(param=name, dim=dim, index=pos, role=Role.IN if contracted else Role.OUT,
                  size=shape[dim], numel=_prod(shape)), None


def _drop_nested(families: List[Family], rejected: List[Tuple[str, str]]) -> List[Family]:
    """A parameter dim may hold only one family's units: later families that clash are dropped."""
    owner: Dict[Tuple[str, int], Family] = {}
    kept = []
    for f in families:
        clash = [owner[(m.param, m.dim)] for m in f.members + f.consumers if (m.param, m.dim) in owner]
        if clash:
            rejected.append((f.layer, f"nested inside the units of {clash[0].layer}"))
            continue
        for m in f.members + f.consumers:
            owner[(m.param, m.dim)] = f
        kept.append(f)
    return kept


def _named(families: Sequence[Family]) -> List[Family]:
    """The families named ``<layer>.<kind>``, with ``#2``, ``#3``... for repeats."""
    seen: Dict[str, int] = {}
    out = []
    for f in families:
        base = f"{f.layer or '<model>'}.{f.kind}"
        seen[base] = seen.get(base, 0) + 1
        out.append(replace(f, name=base if seen[base] == 1 else f"{base}#{seen[base]}"))
    return out


def _layer_name(modules: Sequence[str]) -> str:
    """The module path the units live in; a layer index that differs becomes ``*``.

    ``a.layer.0.attention.self.query`` + ``a.layer.0.attention.output.dense`` ->
    ``a.layer.0.attention``; a family spanning layers (T5's shared relative-position heads)
    gives ``decoder.block.*.layer.0.SelfAttention``.
    """
    parts = [m.split(".") for m in modules]
    out = []
    if len({len(p) for p in parts}) == 1:
        for xs in zip(*parts):
            if all(x == xs[0] for x in xs):
                out.append(xs[0])
            elif all(x.isdigit() for x in xs):
                out.append("*")
            else:
                break
        while out and out[-1] == "*":
            out.pop()
        return ".".join(out)
    for xs in zip(*parts):
        if not all(x == xs[0] for x in xs):
            break
        out.append(xs[0])
    return ".".join(out)
