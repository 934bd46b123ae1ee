"""`QADG`: the pruning search space of a model, derived from its exported graph.

A *unit* is one attention head, one GQA kv-group (a key/value head with its query heads) or one
MLP channel. The units of one index space form a *family* (usually: the heads of one attention
layer, the channels of one MLP). Each unit owns slices of parameters:

* group members (role ``"out"``): the producer rows, biases and head-carrying parameters whose
  zeroing makes the unit's contribution vanish (method §2.1); they are what the optimizer
  scores, forgets and zeroes;
* consumers (role ``"in"``): the input columns of the layers that read the unit; they are
  removed together with the unit when the model is compressed.

Quantizer scalars (``d``, ``q_m``, ``t``) have no channel axis: they stay with their layer and are
never indexed by unit.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
import warnings
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .capture import GraphCaptureError, capture_graph
from .families import find_families
from .propagate import Propagator
from .units import Family, Member, unit_slices

__all__ = ["Member", "Family", "QADG", "build_qadg"]

logger = logging.getLogger(__name__)


class QADG:
    """Quantization-aware dependency graph: the prunable families of a model and their units.

    Built by :func:`build_qadg`. Global unit ids run over the prunable families in order
    (``family.offset .. family.offset + family.num_units - 1``). It holds structure only, no
    data: the batch the graph was captured with is not kept (give it to
    :func:`geta_hf.compress_model` as ``example_inputs`` to verify the compression).
    """

    def __init__(self, families: Sequence[Family], unprunable: Sequence[Tuple[str, str]],
                 model_name: str, unknown_ops: Sequence[Tuple[str, str]], *,
                 known_params: Sequence[str] = (), timings: Optional[Dict[str, float]] = None
                 ) -> None:
        self._families = list(families)
        #: (description, reason) of index spaces that were considered and rejected
        self.unprunable = list(unprunable)
        self.model_name = model_name
        self.unknown_ops = list(unknown_ops)
        #: every parameter name of the analysed model (for :meth:`mark_unprunable`)
        self.known_params: List[str] = list(known_params)
        #: seconds spent capturing the graph and analysing it
        self.timings: Dict[str, float] = dict(timings or {})
        self._reindex()

    @property
    def example_inputs(self):
        """Removed: a QADG keeps no data batch (it verified ``compress_model`` by default)."""
        raise AttributeError("QADG.example_inputs was removed: a QADG keeps no data; pass the "
                             "batch to compress_model(model, qadg, example_inputs=...)")

    # ------------------------------------------------------------------ structure
    def _reindex(self) -> None:
        """Give the families consecutive global unit ids (families are immutable: re-made)."""
        off, fams = 0, []
        for f in self._families:
            fams.append(f if f.offset == off else replace(f, offset=off))
            off += f.num_units
        self._families = fams
        self._num_groups = off
        self._family_of_unit = torch.repeat_interleave(
            torch.arange(len(self._families)),
            torch.tensor([f.num_units for f in self._families], dtype=torch.long)
        ) if self._families else torch.zeros(0, dtype=torch.long)

    @property
    def families(self) -> List[Family]:
        """The prunable families, in global unit order (a copy of the list)."""
        return list(self._families)

    @property
    def num_units(self) -> int:
        """Total number of prunable units (heads + kv-groups + channels)."""
        return self._num_groups

    @property
    def num_groups(self) -> int:
        """Deprecated alias of :attr:`num_units` (GETA's paper calls a unit's slices a group)."""
        _deprecated("num_groups", "num_units")
        return self._num_groups

    def family(self, name: str) -> Family:
        """The family named ``name`` (``KeyError`` naming the ones that exist)."""
        for f in self._families:
            if f.name == name:
                return f
        raise KeyError(f"no prunable family named {name!r}; have {[f.name for f in self._families]}")

    def unit(self, uid: int) -> Tuple[Family, int]:
        """The family of global unit ``uid`` and the unit's index inside it."""
        if not 0 <= uid < self._num_groups:
            raise IndexError(f"unit id {uid} out of range [0, {self._num_groups})")
        f = self._families[int(self._family_of_unit[uid])]
        return f, uid - f.offset

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def _param_table(model: nn.Module) -> Dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    @staticmethod
    def unit_slices(p: torch.Tensor, m: Member) -> torch.Tensor:
        """``(num_units, -1)`` view/copy of ``p``'s entries owned by each unit of member ``m``."""
        return unit_slices(p, m.dim, m.index, m.contiguous)

    def group_norms(self, model: nn.Module) -> torch.Tensor:
        """Deprecated alias of :meth:`unit_norms`."""
        _deprecated("group_norms", "unit_norms")
        return self.unit_norms(model)

    def zero_groups(self, model: nn.Module, unit_ids: Union[Iterable[int], torch.Tensor]) -> None:
        """Deprecated alias of :meth:`zero_units`."""
        _deprecated("zero_groups", "zero_units")
        self.zero_units(model, unit_ids)

    @torch.no_grad()
    def unit_norms(self, model: nn.Module) -> torch.Tensor:
        """One L2 norm per unit over its group members (1-D tensor of length ``num_units``)."""
        params = self._param_table(model)
        out = []
        for f in self._families:
            sq = None
            for m in f.members:
                s = self.unit_slices(params[m.param].detach(), m).float().square().sum(1)
                sq = s if sq is None else sq + s
            out.append(sq.sqrt())
        if not out:
            return torch.zeros(0)
        return torch.cat(out)

    @torch.no_grad()
    def zero_units(self, model: nn.Module, unit_ids: Union[Iterable[int], torch.Tensor]) -> None:
        """Set every group member slice of the given units to exactly 0 (consumers untouched).

        Refuses (``ValueError``) to leave a family with fewer than ``min_units`` non-zero units.
        """
        ids = torch.as_tensor(list(unit_ids) if not isinstance(unit_ids, torch.Tensor) else unit_ids,
                              dtype=torch.long).reshape(-1).unique()
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self._num_groups:
            raise IndexError(f"zero_units: unit ids must lie in [0, {self._num_groups})")
        params = self._param_table(model)
        norms = self.unit_norms(model)
        fam_idx = self._family_of_unit[ids]
        for fi in fam_idx.unique().tolist():
            f = self._families[fi]
            local = ids[fam_idx == fi] - f.offset
            already = norms[f.offset:f.offset + f.num_units] == 0
            already[local] = True
            kept = f.num_units - int(already.sum())
            if kept < f.min_units:
                raise ValueError(
                    f"zero_units: family {f.name} ({f.num_units} {f.kind}) must keep at least "
                    f"{f.min_units} unit(s); zeroing {local.tolist()} would leave {kept}")
            for m in f.members:
                p = params[m.param]
                p.index_fill_(m.dim, m.index[local].reshape(-1).to(p.device), 0)

    # ------------------------------------------------------------------ editing
    def mark_unprunable(self, names: Union[str, Sequence[str]], model: Optional[nn.Module] = None
                        ) -> List[str]:
        """Remove the families touching the given modules or parameters from the search space.

        ``names`` are module or parameter names, or glob patterns over them. Every name must
        match some parameter of the analysed model (``ValueError`` otherwise). Returns the names
        of the families removed; global unit ids are renumbered.
        """
        if isinstance(names, str):
            names = [names]
        known = set(self.known_params)
        if model is not None:
            known |= {n for n, _ in model.named_parameters()}
        for pat in names:  # every pattern is checked before anything changes
            if not any(_name_matches(p, pat) for p in known):
                example = ", ".join(sorted(known)[:3])
                raise ValueError(f"mark_unprunable: {pat!r} matches no module or parameter of "
                                 f"{self.model_name} (names look like: {example}, ...); nothing "
                                 "was changed")
        removed = []
        for pat in names:
            for f in list(self._families):
                if any(_name_matches(p, pat) for p in f.params):
                    self._families.remove(f)
                    self.unprunable.append((f.name, f"marked unprunable by {pat!r}"))
                    removed.append(f.name)
        self._reindex()
        return removed

    def exclude_frozen(self, model: nn.Module) -> List[str]:
        """Remove the families that touch a parameter with ``requires_grad=False`` (logged).

        Pruning such a family would change a parameter the user froze (its rows, or the input
        columns of its consumers). Returns the names of the families removed; global unit ids
        are renumbered. :func:`build_qadg` calls this unless ``GETAConfig.compress_frozen``.
        """
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        removed = []
        for f in list(self._families):
            hit = next((p for p in f.params if p in frozen), None)
            if hit is not None:
                self._families.remove(f)
                self.unprunable.append((f.name, f"parameter {hit} is frozen (requires_grad=False)"))
                removed.append(f.name)
        if removed:
            logger.info("build_qadg: not pruning %d famil%s with frozen parameters (requires_grad="
                        "False): %s%s; set GETAConfig(compress_frozen=True) to prune them",
                        len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed[:4]),
                        " ..." if len(removed) > 4 else "")
            self._reindex()
        return removed

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A SHA-256 hex digest of the search space: every family's name, kind, layer, unit
        count, minimum and head layout, and every member's parameter, dim, role, sizes and unit
        index table. Equal for QADGs built the same way from the same architecture; any change
        to the units or to the slices they own changes it."""
        h = hashlib.sha256()
        for f in self._families:
            head = [f.name, f.kind, f.layer, f.num_units, f.min_units, f.heads_per_unit, f.head_dim]
            h.update(json.dumps(head).encode())
            for m in f.members + f.consumers:
                h.update(json.dumps([m.param, m.dim, m.role, m.size, m.numel,
                                     list(m.index.shape)]).encode())
                h.update(m.index.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """A readable table: family, kind, units, minimum kept, parameters per unit."""
        lines = [f"QADG of {self.model_name}: {len(self._families)} prunable families, "
                 f"{self._num_groups} units (groups)"]
        w = max([len(f.name) for f in self._families] + [6])
        lines.append(f"{'family':<{w}}  {'kind':<9} {'units':>5} {'min':>4} {'group params/unit':>17} "
                     f"{'removed params/unit':>19}")
        for f in self._families:
            lines.append(f"{f.name:<{w}}  {f.kind:<9} {f.num_units:>5} {f.min_units:>4} "
                         f"{f.group_params_per_unit:>17} {f.params_per_unit:>19}")
        if self.unknown_ops:
            ops = sorted({op for op, _ in self.unknown_ops})
            lines.append(f"ops not analysed (their index spaces are kept): {', '.join(ops[:8])}"
                         + (" ..." if len(ops) > 8 else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"QADG({self.model_name}, families={len(self._families)}, num_units={self._num_groups})"



def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"QADG.{old} is deprecated and will be removed in the next release; use "
                  f"QADG.{new}", DeprecationWarning, stacklevel=3)


def _name_matches(param: str, pattern: str) -> bool:
    module = param.rpartition(".")[0]
    return (param == pattern or module == pattern or fnmatch.fnmatchcase(param, pattern)
            or fnmatch.fnmatchcase(module, pattern) or module.startswith(pattern + "."))


def build_qadg(model: nn.Module, example_inputs, cfg=None, *, min_units: Optional[int] = None
               ) -> QADG:
    """Derive the pruning search space of ``model`` from its exported graph.

    Args:
        model: any ``nn.Module`` (typically an HF ``PreTrainedModel``), prepared or not.
        example_inputs: a dict of keyword inputs, e.g. one collated training batch.
        cfg: optional :class:`GETAConfig`; its ``min_units_per_family``,
            ``unprunable_modules`` and ``compress_frozen`` apply (without ``cfg``, families that
            touch a parameter with ``requires_grad=False`` are left out, as by default).
        min_units: units every family keeps (overrides ``cfg``; default 1).

    Raises:
        GraphCaptureError: the graph could not be captured, or no prunable family was found
            (the message names the ops and modules that blocked the analysis).
    """
    if min_units is None:
        min_units = cfg.min_units_per_family if cfg is not None else 1
    elif isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 1:
        raise ValueError(f"build_qadg: min_units={min_units!r} is invalid; allowed: an integer "
                         ">= 1 (every family keeps at least one unit), or None for the config's")
    t0 = time.perf_counter()
    cap = capture_graph(model, example_inputs)
    t1 = time.perf_counter()
    prop = Propagator(cap).run()
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    families, rejected = find_families(prop, order, min_units)
    qadg = QADG(families, rejected, type(model).__name__, prop.unknown,
                known_params=list(order),
                timings={"capture_s": t1 - t0, "analysis_s": time.perf_counter() - t1})
    if cfg is not None and cfg.unprunable_modules:
        qadg.mark_unprunable(list(cfg.unprunable_modules))
    if cfg is None or not cfg.compress_frozen:
        qadg.exclude_frozen(model)
    if qadg.num_units == 0:
        if cfg is not None and cfg.target_group_sparsity == 0:
            # quantization-only training needs no search space: say so, do not fail
            logger.warning("build_qadg: %s has no prunable unit; fine for target_group_sparsity=0 "
                           "(quantization only)", type(model).__name__)
            return qadg
        raise GraphCaptureError(_empty_space_message(model, prop, qadg))
    return qadg


def _empty_space_message(model: nn.Module, prop: Propagator, qadg: QADG) -> str:
    lines = [f"build_qadg: found no prunable attention head or MLP channel in {type(model).__name__}."]
    if prop.unknown:
        seen = []
        for op, mod in prop.unknown:
            if (op, mod) not in seen:
                seen.append((op, mod))
        shown = "; ".join(f"{op} in {mod}" for op, mod in seen[:6])
        lines.append(f"Ops the analysis does not understand (their index spaces are kept): {shown}.")
    reasons = []
    for (name, dim), atom in prop.param_atoms.items():
        r = prop.S.pin_reason(atom)
        if r and name.endswith("weight") and r not in reasons:
            reasons.append(r)
    if reasons:
        lines.append("Spaces were kept because: " + "; ".join(reasons[:5]) + ".")
    frozen = [name for name, why in qadg.unprunable if "requires_grad=False" in why]
    if frozen:
        lines.append(f"{len(frozen)} famil{'y was' if len(frozen) == 1 else 'ies were'} left out "
                     f"because they touch frozen parameters (e.g. {frozen[0]}); pass "
                     "GETAConfig(compress_frozen=True) to prune frozen parameters too.")
    lines.append("If a module cannot be analysed, exclude it with GETAConfig(unprunable_modules=[...]) "
                 "or qadg.mark_unprunable([...]); if nothing in this model is prunable, train it "
                 "with target_group_sparsity=0 (quantization only).")
    return " ".join(lines)
