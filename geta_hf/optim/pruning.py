"""`PruningController`: QASSO's unit bookkeeping and the joint forget update (method §3.3-3.5).

One job: choose the redundant units of each pruning period, forget them progressively over the
period, and hold committed units at exactly zero. Index tables are built once (members) or once
per period (the active layout); per-step work is tensor work.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import GETAConfig
from ..graph.qadg import QADG
from ..quant.functional import EPS, T_MIN
from ..quant.layers import quant_layers
from .importance import UnitStats, importance_scores, kept_floor, select_units
from .joint import descent_budget, forget_rate, quant_steps
from .layout import ActiveLayout, MemberRef
from .schedule import StagePlan

__all__ = ["PruningController", "resolve_members", "check_frozen", "unit_sums"]

logger = logging.getLogger(__name__)
_LOG_FLOOR = 1e-30  # as in geta_hf.quant.functional: min(|x|, q_m) is floored before log


def check_frozen(qadg: QADG, named) -> None:
    """Refuse a QADG with a family that touches a frozen parameter (``requires_grad=False``).

    :func:`geta_hf.build_qadg` leaves such families out; this catches a QADG built before the
    parameters were frozen, or without the config."""
    for f in qadg.families:
        for pname in f.params:
            p = named.get(pname)
            if p is not None and not p.requires_grad:
                raise ValueError(
                    f"QASSO: family {f.name!r} of the qadg touches {pname!r}, which is frozen "
                    "(requires_grad=False); rebuild the qadg after freezing (geta_hf.build_qadg "
                    "leaves such families out), remove it with qadg.mark_unprunable, or set "
                    "GETAConfig(compress_frozen=True) to prune frozen parameters too")


def resolve_members(model: nn.Module, qadg: QADG, named,
                    quant_weights: Optional[Sequence[torch.Tensor]] = None) -> List[MemberRef]:
    """Every group member of ``qadg`` resolved against ``model``'s parameters (checked).

    ``quant_weights``: the weights of the QuantTable's weight quantizers, in its order (default:
    every quantized layer of ``model``); a member's ``qidx`` indexes this list."""
    if quant_weights is None:
        quant_weights = [layer.weight for _, layer in quant_layers(model)]
    layer_of_weight = {id(w): i for i, w in enumerate(quant_weights)}
    refs: List[MemberRef] = []
    seen_quant: Dict[int, str] = {}
    for fi, f in enumerate(qadg.families):
        for m in f.members:
            p = named.get(m.param)
            if p is None:
                raise ValueError(
                    f"QASSO: qadg does not match the model: family {f.name!r} refers to "
                    f"parameter {m.param!r}, which {type(model).__name__} does not have; "
                    "build the QADG from this model with geta_hf.build_qadg(model, inputs)")
            if p.dim() <= m.dim or p.shape[m.dim] != m.size or p.numel() != m.numel \
                    or int(m.index.max()) >= p.shape[m.dim]:
                raise ValueError(
                    f"QASSO: qadg does not match the model: parameter {m.param!r} has shape "
                    f"{tuple(p.shape)}, the QADG expects {m.size} entries along dim {m.dim} "
                    f"and {m.numel} elements; rebuild the QADG from this model")
            qidx = layer_of_weight.get(id(p), -1)
            if qidx >= 0:
                if id(p) in seen_quant:
                    raise ValueError(
                        f"QASSO: qadg lists the quantized weight {m.param!r} as a group member "
                        f"twice ({seen_quant[id(p)]} and {f.name}); one quantized weight can "
                        "belong to one family only")
                seen_quant[id(p)] = f.name
            refs.append(MemberRef(family=fi, param=p, dim=m.dim,
                                  index=m.index.to(device=p.device, dtype=torch.long), qidx=qidx))
    return refs


def unit_sums(members: Sequence[MemberRef], qadg: QADG,
              x_of: Callable[[MemberRef], torch.Tensor],
              g_of: Callable[[MemberRef], Optional[torch.Tensor]]):
    """Per-unit ``||x||^2``, ``||g||^2`` and ``<x, g>``, summed over each unit's member slices.

    ``x_of(m)`` / ``g_of(m)``: the tensor, shaped like ``m.param``, to read for member ``m``
    (``g_of`` may return ``None``: ``g = 0`` there). Returns three 1-D tensors of length
    ``qadg.num_units`` on the members' device."""
    fams = qadg.families
    dev = members[0].param.device if members else torch.device("cpu")
    sq_x, sq_g, dot = (torch.zeros(qadg.num_units, device=dev) for _ in range(3))
    for m in members:
        f = fams[m.family]
        sl = slice(f.offset, f.offset + f.num_units)
        x = m.unit_view(x_of(m)).float()
        sq_x[sl] += x.square().sum(1)
        g = g_of(m)
        if g is not None:
            g = m.unit_view(g).float()
            sq_g[sl] += g.square().sum(1)
            dot[sl] += (x * g).sum(1)
    return sq_x, sq_g, dot


class PruningController:
    """Units, pruning periods, the active (being-forgotten) set and the committed set."""

    def __init__(self, model: nn.Module, qadg: QADG, cfg: GETAConfig, plan: StagePlan,
                 named, quant_weights: Optional[Sequence[torch.Tensor]] = None) -> None:
        self.qadg, self.cfg, self.plan = qadg, cfg, plan
        if not cfg.compress_frozen:
            check_frozen(qadg, named)
        self.members = resolve_members(model, qadg, named, quant_weights)
        fams = qadg.families
        self.num_units = [f.num_units for f in fams]
        self.offsets = [f.offset for f in fams]
        self.floors = [kept_floor(f.num_units, max(f.min_units, cfg.min_units_per_family),
                                  cfg.group_divisible) for f in fams]
        dev = self.device
        counts = torch.tensor(self.num_units, dtype=torch.long)
        self.family_of_unit = torch.repeat_interleave(torch.arange(len(fams)), counts)
        self.unit_numel = torch.repeat_interleave(
            torch.tensor([float(f.group_params_per_unit) for f in fams]), counts).to(dev)
        self.member_params = list({id(m.param): m.param for m in self.members}.values())
        # mutable state (checkpointed by QASSO)
        self.period = -1
        self.pruned = torch.zeros(qadg.num_units, dtype=torch.bool)
        self.active: List[int] = []
        self.layout: Optional[ActiveLayout] = None
        self.achieved: Optional[int] = None
        self._bound_steps = torch.zeros((), dtype=torch.long)  # a tensor: no host sync per step
        self._pruned_rows: List[tuple] = []
        self.reset_saliency()

    @property
    def budget_bound_steps(self) -> int:
        """Joint steps on which the descent budget slowed the forgetting (synchronises)."""
        return int(self._bound_steps)

    @budget_bound_steps.setter
    def budget_bound_steps(self, value: int) -> None:
        """Set the counter (checkpoint loading)."""
        self._bound_steps = torch.tensor(int(value), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        """Device of the member parameters."""
        return self.members[0].param.device if self.members else torch.device("cpu")

    def max_prunable(self) -> int:
        """Units that min_units/group_divisible allow to remove in total."""
        return sum(max(0, n - fl) for n, fl in zip(self.num_units, self.floors))

    # ------------------------------------------------------------------ periods
    def period_budget(self, p: int) -> int:
        """Units period ``p`` should select: its cumulative target minus the committed units."""
        return self.plan.cumulative_target(p) - int(self.pruned.sum())

    def snapshot(self) -> Dict[int, torch.Tensor]:
        """Every member parameter before the dense step (scores and the period's first rows)."""
        return {id(q): q.detach().clone() for q in self.member_params}

    def start_period(self, p: int, snapshot: Optional[Dict[int, torch.Tensor]], lr: float) -> None:
        """Score the units and choose pruning period ``p``'s redundant set (§3.3)."""
        self.period = p
        n_pruned = int(self.pruned.sum())
        budget = self.period_budget(p)
        chosen: List[int] = []
        if budget > 0:
            if self.cfg.importance_source == "gradient" and self.saliency_steps > 0:
                stats = self._gradient_stats(snapshot)
            else:  # the paper's one-step displacement (or no gradient was seen)
                stats = self.unit_stats(snapshot, lr)
            scores = importance_scores(stats, self.cfg.importance_weights)
            per_family = torch.zeros(len(self.num_units), dtype=torch.long).index_add_(
                0, self.family_of_unit, self.pruned.long())
            kept = [n - int(c) for n, c in zip(self.num_units, per_family)]
            chosen = select_units(scores.cpu(), ~self.pruned, self.family_of_unit, self.num_units,
                                  kept, self.floors, self.cfg.group_divisible, budget)
        if p == self.plan.pruning_periods - 1:
            self.achieved = n_pruned + len(chosen)
            if self.achieved < self.plan.target:
                logger.warning("QASSO: pruned %d of the K=%d units asked for: min_units/"
                               "group_divisible leave no more prunable units", self.achieved,
                               self.plan.target)
        self.reset_saliency()
        self.set_active(chosen)

    # ------------------------------------------------------------------ checkpoints
    def progress_state(self, with_saliency: bool) -> Dict[str, object]:
        """The units' progress as a QASSO checkpoint records it."""
        return {"period": self.period, "active_units": list(self.active),
                "pruned_units": torch.nonzero(self.pruned).reshape(-1).tolist(),
                "achieved_units": self.achieved,
                "forget_budget_bound_steps": self.budget_bound_steps,
                "saliency": self.saliency_state() if with_saliency else None}

    def load_progress(self, s) -> None:
        """Restore :meth:`progress_state` (validated by the caller)."""
        self.period = int(s["period"])
        self.set_pruned(s["pruned_units"])
        self.set_active(s["active_units"])
        self.achieved = s.get("achieved_units")
        self.budget_bound_steps = int(s.get("forget_budget_bound_steps", 0))
        self.load_saliency_state(s.get("saliency"))

    def end_period_unstarted(self, p: int) -> None:
        """Commit period ``p`` on a step without a usable gradient (it still must commit; if
        it never had a finite step to start on, its units are chosen by magnitude alone)."""
        if p != self.period:
            self.start_period(p, None, 0.0)
        self.commit()
        self.zero_pruned()

    # ------------------------------------------------------------------ gradient saliency
    def reset_saliency(self) -> None:
        """Forget the accumulated gradient statistics (after each selection)."""
        n, dev = self.qadg.num_units, self.device
        self.saliency_steps = 0  # a host-side count: no sync
        self._acc = {k: torch.zeros(n, device=dev) for k in ("dot", "dot_sq", "sq_g")}

    def accumulate_saliency(self) -> None:
        """Add this step's per-unit ``<x, g>``, ``<x, g>^2`` and ``||g||^2`` (``g`` = the loss
        gradient in ``.grad``, ``x`` before the optimizer moves it). Tensor work only."""
        _, sq_g, dot = unit_sums(self.members, self.qadg, lambda m: m.param.detach(),
                                 lambda m: m.param.grad)
        self._acc["dot"] += dot
        self._acc["dot_sq"] += dot.square()
        self._acc["sq_g"] += sq_g
        self.saliency_steps += 1

    def saliency_state(self) -> Dict[str, object]:
        """The accumulated statistics, for QASSO's checkpoint."""
        return {"steps": self.saliency_steps, **{k: v.detach().cpu() for k, v in self._acc.items()}}

    def check_saliency_state(self, state: Optional[Dict[str, object]]) -> None:
        """Raise ``ValueError`` naming the field if ``state`` cannot be loaded (changes nothing)."""
        if not state:
            return
        if not isinstance(state, dict) or not isinstance(state.get("steps"), int):
            raise ValueError("QASSO.load_state_dict: 'saliency' must be a dict with an int 'steps'")
        for k, ref in self._acc.items():
            t = state.get(k)
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                raise ValueError(f"QASSO.load_state_dict: saliency[{k!r}] must be a tensor of "
                                 f"shape {tuple(ref.shape)}")

    def load_saliency_state(self, state: Optional[Dict[str, object]]) -> None:
        """Restore :meth:`saliency_state` (checked with :meth:`check_saliency_state`)."""
        self.check_saliency_state(state)
        self.reset_saliency()
        if state:
            for k in self._acc:
                self._acc[k] = state[k].to(device=self.device, dtype=torch.float32).clone()
            self.saliency_steps = int(state["steps"])

    def _gradient_stats(self, snapshot: Optional[Dict[int, torch.Tensor]]) -> UnitStats:
        """Per-unit statistics from the accumulated gradients (means over the window) and the
        current (pre-step) ``x``."""
        sq_x, _, _ = unit_sums(self.members, self.qadg, lambda m: self._x(m, snapshot),
                               lambda m: None)
        n = float(self.saliency_steps)
        return UnitStats(sq_x=sq_x, sq_g=self._acc["sq_g"] / n, dot=self._acc["dot"] / n,
                         numel=self.unit_numel, dot_sq=self._acc["dot_sq"] / n)

    @staticmethod
    def _x(m: MemberRef, snapshot: Optional[Dict[int, torch.Tensor]]) -> torch.Tensor:
        """Member ``m``'s parameter before the step (from ``snapshot``) or as it is now."""
        return m.param.detach() if snapshot is None else snapshot[id(m.param)]

    def unit_stats(self, snapshot: Optional[Dict[int, torch.Tensor]], lr: float) -> UnitStats:
        """Per-unit ``||x||^2``, ``||g||^2``, ``<x, g>`` with pre-step ``x`` and the step's ``g``.

        ``snapshot=None``: no usable gradient (a skipped step): current ``x`` and ``g = 0``."""
        def g_of(m: MemberRef) -> Optional[torch.Tensor]:
            if snapshot is None:
                return None
            if lr > 0:
                return (snapshot[id(m.param)].float() - m.param.detach().float()) / lr
            return m.param.grad

        sq_x, sq_g, dot = unit_sums(self.members, self.qadg, lambda m: self._x(m, snapshot), g_of)
        return UnitStats(sq_x=sq_x, sq_g=sq_g, dot=dot, numel=self.unit_numel)

    def set_active(self, ids: Sequence[int]) -> None:
        """Make ``ids`` the units being forgotten in this period (builds their row layout)."""
        self.active = sorted(int(i) for i in ids)
        if not self.active:
            self.layout = None
            return
        ids_t = torch.tensor(self.active, dtype=torch.long)
        fam = self.family_of_unit[ids_t]
        active = {f: (ids_t[fam == f] - self.offsets[f]).to(self.device)
                  for f in fam.unique().tolist()}
        self.layout = ActiveLayout(self.members, active)

    def commit(self) -> None:
        """End of a pruning period: the active units become pruned (hard zero from now on)."""
        if self.active:
            self.pruned[torch.tensor(self.active, dtype=torch.long)] = True
            self.rebuild_pruned_rows()
        self.set_active([])

    def set_pruned(self, ids: Sequence[int]) -> None:
        """Set the committed units to exactly ``ids`` (checkpoint loading)."""
        self.pruned = torch.zeros(self.qadg.num_units, dtype=torch.bool)
        if ids:
            self.pruned[torch.tensor(list(ids), dtype=torch.long)] = True
        self.rebuild_pruned_rows()

    def rebuild_pruned_rows(self) -> None:
        """Recompute the rows that :meth:`zero_pruned` sets to zero."""
        ids = torch.nonzero(self.pruned).reshape(-1)
        rows = []
        if ids.numel():
            fam = self.family_of_unit[ids]
            for m in self.members:
                local = ids[fam == m.family] - self.offsets[m.family]
                if local.numel():
                    rows.append((m.param, m.dim, m.rows(local.to(m.index.device))))
        self._pruned_rows = rows

    def zero_pruned(self) -> None:
        """Set every committed unit's member rows to exactly zero."""
        for p, dim, rows in self._pruned_rows:
            p.index_fill_(dim, rows, 0.0)

    # ------------------------------------------------------------------ the joint update
    def joint_update(self, x_prev: List[torch.Tensor], d_prev: Optional[torch.Tensor], quant,
                     bounds, lr: float, remaining: int, descent: torch.Tensor) -> None:
        """§3.4-3.5 (with the departures of :mod:`.joint`) on this period's redundant rows.

        ``x_prev``: each slot's rows before the dense step; ``d_prev``: every quantizer's ``d``
        before the dense step (the residual ``r`` is measured on that grid); ``quant``: the
        :class:`QuantTable` (``q_m``, ``t`` after the dense step); ``bounds``: ``(d_lo, d_up)``
        per quantizer; ``descent``: ``lr ||g||^2`` of the whole dense step. Reductions are dot
        products of the displacement ``lr g = x_before - x_after`` (``1/lr`` folded into the
        scalars); ``C = sign(x) min(|x|, q_m)^t``, ``r = round(C/d) - C/d``.
        """
        L = self.layout
        x_dense = L.gather()
        n_slots, SQ = len(L.slots), L.n_quant_slots
        disp = [torch.sub(xp, xd) for xp, xd in zip(x_prev, x_dense)]  # lr * g per slot
        clip = [self._clip_vector(x_prev[i], quant, L.slots[i].qidx) if i < SQ else x_prev[i]
                for i in range(n_slots)]
        CC = torch.stack([torch.dot(c, c) for c in clip])
        gg = torch.stack([torch.dot(dd, dd) for dd in disp]) / (lr * lr)
        fam_cc = torch.zeros(len(L.families), dtype=CC.dtype, device=CC.device).index_add_(
            0, L.slot_family, CC)
        gamma = forget_rate(fam_cc, remaining)
        d_star = None
        if SQ:
            sq = L.slot_q
            d0 = d_prev.clamp_min(EPS)[sq]
            gr = torch.stack([torch.dot(disp[i], self._residual(clip[i], d0[i]))
                              for i in range(SQ)]) / lr
            lo, up = bounds[0][sq], bounds[1][sq]
            d_star, gamma = quant_steps(gr, gg[:SQ], gamma, L.slot_family[:SQ], lr, lo, up)
            d_star = torch.minimum(torch.maximum(d_star, lo), up).clamp_min(EPS)
        forget = [torch.div(clip[i], d_star[i]).round_().mul_(d_star[i]) if i < SQ else clip[i]
                  for i in range(n_slots)]  # Q_{d*}(x) = d* round(C / d*), or x itself
        gF = torch.stack([torch.dot(dd, f) for dd, f in zip(disp, forget)]) / lr
        gF = torch.zeros_like(gamma).index_add_(0, L.slot_family, gF)
        gamma, bound = descent_budget(gamma, gF, descent)
        self._bound_steps = self._bound_steps.to(bound.device) + bound.long()
        g_slot = gamma[L.slot_family]
        for i in range(n_slots):
            x_dense[i].sub_(forget[i] * g_slot[i])
        L.scatter(x_dense)

    @staticmethod
    def _clip_vector(xp: torch.Tensor, quant, qi: int) -> torch.Tensor:
        """``C = sign(x) min(|x|, q_m)^t``, as in the quantizer's forward (§1.1)."""
        c = torch.minimum(xp.abs(), quant.q_m[qi].detach().abs())
        if quant.quantizers[qi].t is not None:
            c.clamp_min_(_LOG_FLOOR).log_().mul_(quant.t[qi].detach().clamp_min(T_MIN)).exp_()
        return c.copysign_(xp)

    @staticmethod
    def _residual(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        z = c / d
        return torch.round(z).sub_(z)
