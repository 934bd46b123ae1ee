"""`QASSO`: GETA's quantization-aware structured sparse optimizer (GETA-METHOD §3) for PyTorch.

``QASSO`` is a ``torch.optim.Optimizer``. Each ``step()``:

1. runs the dense update of torch's own optimizer for the variant (``AdamW``/``Adam``/``SGD``
   with ``foreach=True``) on two parameter groups: ``"weights"`` (every trainable parameter that
   is not a quantizer scalar, learning rate ``lr``) and ``"quant"`` (``d``, ``q_m``, ``t`` of all
   weight *and* input quantizers, learning rate ``quant_lr``, no weight decay) - in every stage,
   so input quantizers are trained with ``quant_lr`` throughout (fixes §6.1.4);
2. applies GETA's stage logic under ``torch.no_grad()`` with index tensors built in ``__init__``
   (or once per pruning period), never by matching parameter names:

   * warm-up: nothing else;
   * projection: clamp every quantizer's ``d`` into ``[d(b_u_cur), d(b_l)]`` of its own layer
     (weights with ``cfg.weight_bits``, inputs with ``cfg.activation_bits``, §3.2);
   * joint: at the first step of each pruning period score all units (§3.3) and choose the
     period's redundant units; on their rows take the joint step of §3.5 (see
     :mod:`geta_hf.optim.joint`) and give each touched quantized layer its own ``d*``; project
     every other quantizer; after the period's last step commit the units (hard zero);
   * cool-down: at its first step freeze ``bits = clamp(round(b), b_l, b_u_cur)`` per quantizer,
     then keep ``d = d(bits, q_m, t)`` exact after every step;

   and in every stage it re-zeroes the slices of committed units.

**The gradient variant ``g``** (§3.1) on the redundant rows is read from the parameter
displacement of the dense step: ``g = (x_before - x_after) / lr``. That is exactly the direction
torch's optimizer took: ``m_hat / (sqrt(v_hat) + eps)`` for Adam (plus ``wd * x`` for AdamW's
decoupled decay), the gradient or momentum buffer for SGD. It needs no variant-specific code and
makes the descent guarantee of §3.5 hold for the step actually taken. Importance scores use the
same ``g`` on all group slices (computed at period starts only). When the learning rate is 0
(e.g. an LR warm-up from 0) the joint update is skipped for that step (there is no descent
direction to protect), and importance scores fall back to the raw gradient.

**Non-finite gradients.** Before anything else ``step()`` checks every gradient with one sum
per tensor (a single host sync per step). If any is NaN or +-Inf (an overflowing loss, a bad
batch), the step is *skipped* with a warning: no parameter, quantizer scalar or moment buffer is
touched. The step still counts, so the stage schedule stays aligned with the caller's step
count and LR scheduler; the only bookkeeping done on a skipped step is what needs no gradient:
freezing bits at the start of cool-down and committing the units of a pruning period that ends
on this step (a period whose first step was skipped starts at its next finite step; if it never
had one, its units are chosen by the magnitude terms alone and committed). ``skipped_steps``
counts them and is checkpointed.
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import GETAConfig
from ..graph.qadg import QADG
from ..quant.functional import EPS, T_MIN
from ..quant.layers import quant_layers
from .importance import UnitStats, importance_scores, kept_floor, select_units
from .joint import descent_cap, forget_rate, quant_steps
from .layout import ActiveLayout, MemberRef, QuantTable, denominators
from .schedule import StagePlan

__all__ = ["QASSO", "VARIANTS"]

logger = logging.getLogger(__name__)

#: Supported dense-update variants (GETA-METHOD §3.1).
VARIANTS = ("adamw", "adam", "sgd")
_STATE_FORMAT = "geta_hf.QASSO/1"
_LOG_FLOOR = 1e-30  # as in geta_hf.quant.functional: min(|x|, q_m) is floored before log


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_positive(name: str, v) -> float:
    if not _is_real(v) or not math.isfinite(float(v)) or not float(v) > 0:
        raise ValueError(f"QASSO: {name}={v!r} is invalid; allowed: a finite number > 0")
    return float(v)


class QASSO(torch.optim.Optimizer):
    """GETA's QASSO optimizer: joint structured pruning and mixed-precision QAT in one loop.

    Args:
        model: the model, prepared with :func:`geta_hf.prepare_model` (quantizers inserted; input
            quantizers, if any, calibrated with :func:`geta_hf.calibrate_activations`).
        qadg: its pruning search space, from :func:`geta_hf.build_qadg` on this model.
        cfg: the :class:`GETAConfig` (sparsity target, bit ranges, stage lengths, periods,
            importance weights, ``group_divisible``, ``min_units_per_family``, ``quant_lr``).
        lr: learning rate of the weights (group ``"weights"``, ``param_groups[0]``).
        variant: ``"adamw"``, ``"adam"`` or ``"sgd"``: torch's optimizer used for the dense step.
        total_steps: number of optimizer steps of the run; stage boundaries are
            ``cfg.resolve_schedule(total_steps)``. Steps past it stay in cool-down.
        quant_lr: learning rate of the quantizer scalars (group ``"quant"``, ``param_groups[1]``);
            default ``cfg.quant_lr``.
        weight_decay: of the weights group (default 0.01 for ``adamw``, else 0). Quantizer scalars
            never decay.
        betas, eps: Adam/AdamW moments; momentum, dampening, nesterov: SGD.
        skip_nonfinite: skip (with a warning) any step whose gradients hold NaN or Inf, leaving
            weights, quantizers and optimizer state untouched (see the module docstring).
            ``False`` removes the per-step check (one host sync) for callers that do their own.

    The learning rates are read from ``param_groups`` at every step, so any
    ``torch.optim.lr_scheduler`` works. ``state_dict()`` holds only tensors, numbers, strings,
    lists and dicts (loadable with ``torch.load(..., weights_only=True)``).

    Example::

        cfg = GETAConfig(target_group_sparsity=0.4, weight_bits=(4, 8))
        model = geta_hf.prepare_model(model, cfg)
        qadg = geta_hf.build_qadg(model, example_batch)
        opt = QASSO(model, qadg, cfg, lr=3e-5, variant="adamw", total_steps=len(loader))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / len(loader))
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        print(opt.describe())  # stage, sparsity, per-layer bits, ...

    Raises:
        ValueError: a bad ``variant``/``lr``/``total_steps``/``quant_lr``/``weight_decay``, a
            QADG that does not match ``model``, uncalibrated input quantizers, or stage lengths
            that do not fit ``total_steps``.
    """

    def __init__(self, model: nn.Module, qadg: QADG, cfg: GETAConfig, lr: float,
                 variant: str = "adamw", total_steps: Optional[int] = None, *,
                 quant_lr: Optional[float] = None, weight_decay: Optional[float] = None,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False,
                 skip_nonfinite: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"QASSO: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(qadg, QADG):
            raise TypeError(f"QASSO: qadg must be a geta_hf.QADG (from geta_hf.build_qadg), "
                            f"got {type(qadg).__name__}")
        if not isinstance(cfg, GETAConfig):
            raise TypeError(f"QASSO: cfg must be a geta_hf.GETAConfig, got {type(cfg).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"QASSO: variant={variant!r} is not supported; allowed: "
                             + ", ".join(repr(v) for v in VARIANTS))
        lr = _check_positive("lr", lr)
        if total_steps is None or not isinstance(total_steps, int) or isinstance(total_steps, bool) \
                or total_steps < 1:
            raise ValueError(f"QASSO: total_steps={total_steps!r} is invalid; allowed: an integer "
                             ">= 1 (the number of optimizer steps of the run)")
        quant_lr = _check_positive("quant_lr", cfg.quant_lr if quant_lr is None else quant_lr)
        if weight_decay is None:
            weight_decay = 0.01 if variant == "adamw" else 0.0
        if not _is_real(weight_decay) or not weight_decay >= 0 or not math.isfinite(weight_decay):
            raise ValueError(f"QASSO: weight_decay={weight_decay!r} is invalid; allowed: a finite "
                             "number >= 0")

        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"QASSO: skip_nonfinite={skip_nonfinite!r} is invalid; allowed: True "
                             "or False")
        self._model = model
        self.skip_nonfinite = skip_nonfinite
        self.qadg = qadg
        self.cfg = cfg
        self.variant = variant
        layers = quant_layers(model)
        self._check_quantizers(layers, cfg)
        self._quant = QuantTable(layers)
        named = dict(model.named_parameters())
        self._members = self._resolve_members(model, qadg, named)

        # ---- the dense optimizer: torch's own, on two groups sharing dicts with this object
        quant_ids = {id(p) for p in self._quant.params}
        weights = [p for p in named.values() if p.requires_grad and id(p) not in quant_ids]
        quant = [p for p in self._quant.params if p.requires_grad]
        if not weights:
            raise ValueError("QASSO: the model has no trainable parameter besides quantizer scalars")
        groups = [{"params": weights, "lr": lr, "weight_decay": float(weight_decay),
                   "name": "weights"}]
        if quant:
            groups.append({"params": quant, "lr": quant_lr, "weight_decay": 0.0, "name": "quant"})
        if variant == "adamw":
            inner = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)
        elif variant == "adam":
            inner = torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)
        else:
            inner = torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                                    nesterov=nesterov, foreach=True)
        self._ready = False
        # add_param_group re-uses the dicts, so self.param_groups[i] IS inner.param_groups[i]:
        # LR schedulers acting on this optimizer drive the dense step directly.
        super().__init__(inner.param_groups, dict(inner.defaults))
        self._inner = inner
        self.state = inner.state
        self._ready = True

        # ---- schedule and unit tables
        self._plan = StagePlan.from_config(cfg, total_steps, qadg.num_groups)
        fams = qadg.families
        self._num_units = [f.num_units for f in fams]
        self._offsets = [f.offset for f in fams]
        self._floors = [kept_floor(f.num_units, max(f.min_units, cfg.min_units_per_family),
                                   cfg.group_divisible) for f in fams]
        dev = self._member_device()
        self._family_of_unit = torch.repeat_interleave(
            torch.arange(len(fams)), torch.tensor(self._num_units, dtype=torch.long))
        self._unit_numel = torch.repeat_interleave(
            torch.tensor([float(f.group_params_per_unit) for f in fams]),
            torch.tensor(self._num_units, dtype=torch.long)).to(dev)
        self._member_params = list({id(m.param): m.param for m in self._members}.values())
        self._check_budget()

        # ---- mutable state (all of it is in state_dict()["qasso"])
        self._step = 0
        self._period = -1
        self._pruned = torch.zeros(qadg.num_groups, dtype=torch.bool)
        self._active: List[int] = []
        self._layout: Optional[ActiveLayout] = None
        self._pruned_rows: List[tuple] = []
        self._frozen_bits: Optional[torch.Tensor] = None
        self._frozen_den: Optional[torch.Tensor] = None
        self._den_cache: Dict[tuple, tuple] = {}
        self._warned_past_end = False
        self._achieved: Optional[int] = None
        self._skipped = 0

    # ================================================================== set-up helpers
    @staticmethod
    def _check_quantizers(layers, cfg: GETAConfig) -> None:
        uncal = [n for n, m in layers if m.act_quantizer is not None and not m.act_quantizer.calibrated]
        if uncal:
            raise ValueError(
                f"QASSO: the input (activation) quantizers of {len(uncal)} layer(s) are not "
                f"calibrated (e.g. {uncal[0]}); call geta_hf.calibrate_activations(model, batches, "
                "cfg) (or pass calibration_data to geta_hf.prepare_model) before creating QASSO")
        has_act = any(m.act_quantizer is not None for _, m in layers)
        if has_act and cfg.activation_bits is None:
            raise ValueError("QASSO: cfg.activation_bits is None but the model has input "
                             "quantizers; pass the GETAConfig the model was prepared with")
        if cfg.activation_bits is not None and layers and not has_act:
            logger.warning("QASSO: cfg.activation_bits=%s is ignored: the model has no input "
                           "quantizers", cfg.activation_bits)
        if not layers:
            logger.info("QASSO: the model has no quantized layer: pruning only")

    def _resolve_members(self, model: nn.Module, qadg: QADG, named) -> List[MemberRef]:
        # weight quantizer i of the QuantTable belongs to the i-th quantized layer
        layer_of_weight = {id(layer.weight): i for i, (_, layer) in enumerate(quant_layers(model))}
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
                                      index=m.index.to(device=p.device, dtype=torch.long),
                                      qidx=qidx))
        return refs

    def _member_device(self) -> torch.device:
        return self._members[0].param.device if self._members else torch.device("cpu")

    def _check_budget(self) -> None:
        plan = self._plan
        K = plan.target
        most = sum(max(0, n - fl) for n, fl in zip(self._num_units, self._floors))
        if K > most:
            logger.warning(
                "QASSO: target_group_sparsity=%s asks for K=%d of %d units, but min_units/"
                "group_divisible allow at most %d; pruning as many as allowed",
                self.cfg.target_group_sparsity, K, plan.num_groups, most)
        if K > 0 and plan.schedule.joint_steps == 0:
            logger.warning("QASSO: the joint stage has 0 steps, so no unit will be pruned "
                           "(target K=%d)", K)
        elif 0 < plan.schedule.joint_steps < self.cfg.pruning_periods:
            logger.warning("QASSO: the joint stage has %d steps < pruning_periods=%d; using %d "
                           "one-step periods", plan.schedule.joint_steps, self.cfg.pruning_periods,
                           plan.pruning_periods)

    def add_param_group(self, param_group: dict) -> None:  # noqa: D401
        """Parameter groups are fixed by QASSO (``"weights"`` and ``"quant"``)."""
        if getattr(self, "_ready", True):
            raise TypeError("QASSO manages its own parameter groups ('weights', 'quant'); "
                            "add_param_group is not supported")
        super().add_param_group(param_group)

    # ================================================================== public read-only state
    @property
    def plan(self) -> StagePlan:
        """The resolved schedule (stages, bit-reduction and pruning periods, target K)."""
        return self._plan

    @property
    def step_count(self) -> int:
        """Number of completed ``step()`` calls."""
        return self._step

    @property
    def stage(self) -> str:
        """Stage of the last completed step (of the first step before any step was taken)."""
        return self._plan.stage(max(self._step - 1, 0))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient was NaN or Inf."""
        return self._skipped

    @property
    def pruned_units(self) -> List[int]:
        """Global ids of committed (hard-zeroed) units."""
        return torch.nonzero(self._pruned).reshape(-1).tolist()

    @property
    def active_units(self) -> List[int]:
        """Global ids of this period's redundant units (being forgotten, not yet committed)."""
        return list(self._active)

    @property
    def target_units(self) -> int:
        """``K = floor(target_group_sparsity * num_groups)``."""
        return self._plan.target

    @property
    def achieved_units(self) -> Optional[int]:
        """Units the run prunes in total (known once the last pruning period has selected; below
        ``target_units`` only when ``min_units``/``group_divisible`` forbid more, which is logged)."""
        return self._achieved

    # ================================================================== the step
    @torch.no_grad()
    def step(self, closure=None):
        """One QASSO step: torch's dense update, then the stage's GETA operations."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step
        plan = self._plan
        if k >= plan.total_steps and not self._warned_past_end:
            logger.warning("QASSO: step %d is past total_steps=%d; staying in cool-down", k + 1,
                           plan.total_steps)
            self._warned_past_end = True
        stage = plan.stage(k)
        lr = float(self.param_groups[0]["lr"])
        if self.skip_nonfinite and not self._grads_finite():
            self._skip_step(k, stage)
            return loss
        if stage == "cooldown" and self._frozen_bits is None and len(self._quant):
            self._freeze_bits(k)

        joint = stage == "joint"
        new_period = snapshot = x_prev = d_prev = None
        t_in = T = 0
        if joint:
            p, t_in, T = plan.pruning_position(k)
            if p != self._period:
                new_period = p
                if self._period_budget(p) > 0:  # x before the dense step, for scores and rows
                    snapshot = {id(q): q.detach().clone() for q in self._member_params}
            elif self._layout is not None and lr > 0:
                x_prev = self._layout.gather()
            if lr > 0 and len(self._quant) and (new_period is not None or self._layout is not None):
                d_prev = torch.stack(self._quant.d).detach()

        self._inner.step()

        if new_period is not None:
            self._start_period(new_period, snapshot, lr)
            if self._layout is not None and lr > 0:
                x_prev = self._layout.gather(snapshot)
            snapshot = None
        if joint and self._layout is not None and lr > 0:
            self._joint_update(x_prev, d_prev, lr, T - t_in, k)  # also projects the others
        elif stage in ("projection", "joint") and len(self._quant):
            self._project(k)
        elif stage == "cooldown" and self._frozen_bits is not None:
            self._apply_frozen_bits()
        if joint and t_in == T - 1:
            self._commit()
        self._zero_pruned()
        self._step += 1
        return loss

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite, from one sum per tensor and one host sync.

        A sum is NaN or +-Inf when any element is (Inf - Inf gives NaN); finite values would
        have to total ~3e38 to overflow. Cheaper than a max-norm (one read, no abs)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        dev = grads[0].device
        total = torch.stack([t.sum(dtype=torch.float32).to(dev) for t in grads]).sum()
        return bool(torch.isfinite(total))

    def _skip_step(self, k: int, stage: str) -> None:
        """A step with a NaN/Inf gradient: only the gradient-free schedule bookkeeping runs."""
        self._skipped += 1
        logger.warning("QASSO: step %d has a NaN or Inf gradient and is skipped (weights, "
                       "quantizers and optimizer state unchanged; %d skipped so far)", k + 1,
                       self._skipped)
        if stage == "cooldown" and self._frozen_bits is None and len(self._quant):
            self._freeze_bits(k)
            self._apply_frozen_bits()
        elif stage == "joint":
            p, t_in, T = self._plan.pruning_position(k)
            if t_in == T - 1:  # the period ends here: it must still commit its units
                if p != self._period:  # ... even if it never had a finite step to start on
                    self._start_period(p, None, 0.0)
                self._commit()
                self._zero_pruned()
        self._step += 1

    # ================================================================== stage operations
    def _dens(self, k: int):
        """``(2^(b_u_cur-1) - 1, 2^(b_l-1) - 1)`` per quantizer at step ``k`` (cached)."""
        plan = self._plan
        bu_w, bu_a = plan.weight_upper(k), plan.act_upper(k)
        key = (bu_w, bu_a)
        if key not in self._den_cache:
            q = self._quant
            hi = [bu_w] * q.n_weight + [bu_a] * q.n_act
            lo = [plan.weight_bits[0]] * q.n_weight + \
                 ([plan.act_bits[0]] * q.n_act if q.n_act else [])
            self._den_cache[key] = (denominators(hi, q.device), denominators(lo, q.device))
        return self._den_cache[key]

    def _project(self, k: int) -> None:
        """Partial projection (§3.2): ``d <- clip(d, d(b_u_cur), d(b_l))`` for every quantizer."""
        den_hi, den_lo = self._dens(k)
        d, q_m, t = self._quant.stacked()
        top = self._quant.top(q_m, t)
        self._quant.write_d(torch.minimum(torch.maximum(d, top / den_hi), top / den_lo))

    def _freeze_bits(self, k: int) -> None:
        """Cool-down: ``bits = clamp(round(b(d, q_m, t)), b_l, b_u_cur)`` per quantizer."""
        plan = self._plan
        q = self._quant
        hi = torch.tensor([plan.weight_upper(k)] * q.n_weight + [plan.act_upper(k)] * q.n_act,
                          dtype=torch.float32, device=q.device)
        lo = torch.tensor([plan.weight_bits[0]] * q.n_weight +
                          ([plan.act_bits[0]] * q.n_act if q.n_act else []),
                          dtype=torch.float32, device=q.device)
        bits = q.bits().float()
        bits = torch.where(torch.isfinite(bits), bits, hi)  # a degenerate quantizer: keep b_u
        self._set_frozen(torch.minimum(torch.maximum(torch.round(bits), lo), hi))

    def _set_frozen(self, bits: Optional[torch.Tensor]) -> None:
        self._frozen_bits = bits
        self._frozen_den = None if bits is None else torch.exp2(bits - 1.0) - 1.0

    def _apply_frozen_bits(self) -> None:
        """``d = d(bits, q_m, t)`` with the frozen integer bits (after the dense step)."""
        _, q_m, t = self._quant.stacked()
        self._quant.write_d(self._quant.top(q_m, t) / self._frozen_den)

    # ------------------------------------------------------------------ pruning periods
    def _unit_stats(self, snapshot: Optional[Dict[int, torch.Tensor]], lr: float) -> UnitStats:
        """Per-unit ``||x||^2``, ``||g||^2``, ``<x, g>`` with pre-step ``x`` and the step's ``g``.

        ``snapshot=None``: no usable gradient (a skipped step): current ``x`` and ``g = 0``."""
        n = self.qadg.num_groups
        dev = self._member_device()
        sq_x = torch.zeros(n, device=dev)
        sq_g = torch.zeros(n, device=dev)
        dot = torch.zeros(n, device=dev)
        for m in self._members:
            off = self._offsets[m.family]
            units = self._num_units[m.family]
            x = m.unit_view(m.param.detach() if snapshot is None else snapshot[id(m.param)]).float()
            if snapshot is None:
                g = torch.zeros_like(x)
            elif lr > 0:
                g = (x - m.unit_view(m.param.detach()).float()) / lr
            elif m.param.grad is not None:
                g = m.unit_view(m.param.grad).float()
            else:
                g = torch.zeros_like(x)
            sq_x[off:off + units] += x.square().sum(1)
            sq_g[off:off + units] += g.square().sum(1)
            dot[off:off + units] += (x * g).sum(1)
        return UnitStats(sq_x=sq_x, sq_g=sq_g, dot=dot, numel=self._unit_numel)

    def _period_budget(self, p: int) -> int:
        """Units period ``p`` should select: its cumulative target minus the committed units."""
        return self._plan.cumulative_target(p) - int(self._pruned.sum())

    def _start_period(self, p: int, snapshot: Optional[Dict[int, torch.Tensor]], lr: float) -> None:
        """Score the units and choose pruning period ``p``'s redundant set (§3.3)."""
        self._period = p
        plan = self._plan
        n_pruned = int(self._pruned.sum())
        budget = self._period_budget(p)
        chosen: List[int] = []
        if budget > 0:
            scores = importance_scores(self._unit_stats(snapshot, lr), self.cfg.importance_weights)
            pruned_per_family = torch.zeros(len(self._num_units), dtype=torch.long).index_add_(
                0, self._family_of_unit, self._pruned.long())
            kept = [n - int(c) for n, c in zip(self._num_units, pruned_per_family)]
            chosen = select_units(scores.cpu(), ~self._pruned, self._family_of_unit,
                                  self._num_units, kept, self._floors, self.cfg.group_divisible,
                                  budget)
        if p == plan.pruning_periods - 1:
            achieved = n_pruned + len(chosen)
            self._achieved = achieved
            if achieved < plan.target:
                logger.warning("QASSO: pruned %d of the K=%d units asked for: min_units/"
                               "group_divisible leave no more prunable units", achieved,
                               plan.target)
        self._set_active(chosen)

    def _set_active(self, ids: Sequence[int]) -> None:
        self._active = sorted(int(i) for i in ids)
        if not self._active:
            self._layout = None
            return
        dev = self._member_device()
        ids_t = torch.tensor(self._active, dtype=torch.long)
        fam = self._family_of_unit[ids_t]
        active = {}
        for f in fam.unique().tolist():
            local = ids_t[fam == f] - self._offsets[f]
            active[f] = local.to(dev)
        self._layout = ActiveLayout(self._members, active)

    def _commit(self) -> None:
        """End of a pruning period: the active units become pruned (hard zero from now on)."""
        if self._active:
            self._pruned[torch.tensor(self._active, dtype=torch.long)] = True
            self._rebuild_pruned_rows()
        self._set_active([])

    def _rebuild_pruned_rows(self) -> None:
        ids = torch.nonzero(self._pruned).reshape(-1)
        rows = []
        if ids.numel():
            fam = self._family_of_unit[ids]
            for m in self._members:
                local = ids[fam == m.family] - self._offsets[m.family]
                if local.numel():
                    rows.append((m.param, m.dim, m.rows(local.to(m.index.device))))
        self._pruned_rows = rows

    def _zero_pruned(self) -> None:
        for p, dim, rows in self._pruned_rows:
            p.index_fill_(dim, rows, 0.0)

    # ------------------------------------------------------------------ the joint update
    def _joint_update(self, x_prev: List[torch.Tensor], d_prev: Optional[torch.Tensor],
                      lr: float, remaining: int, k: int) -> None:
        """§3.4-3.5 on this period's redundant rows; projection of every other quantizer.

        ``x_prev``: each slot's rows before the dense step; ``d_prev``: every quantizer's ``d``
        before the dense step (the residual ``r`` is measured on that grid). ``q_m`` and ``t``
        are the values after the dense step (the reference also steps them first).

        Per slot (one member of one active family) the work is a few passes over its rows with
        0-dim scalars; reductions are ``dot`` products of the displacement ``lr g = x_before -
        x_after`` (``1/lr`` is folded into the scalars). With ``c = C = sign(x) min(|x|,
        q_m)^t``: ``r = round(c/d) - c/d`` and ``Q_d(x) = d round(c/d)`` (round is odd).
        """
        L = self._layout
        x_dense = L.gather()
        n_slots, SQ = len(L.slots), L.n_quant_slots
        quant = self._quant
        d_new = lo = up = None
        if len(quant):
            den_hi, den_lo = self._dens(k)
            d_now, q_m, t = quant.stacked()
            top = quant.top(q_m, t)
            lo, up = top / den_hi, top / den_lo
            d_new = torch.minimum(torch.maximum(d_now, lo), up)  # projection of every quantizer
        if SQ:
            sq = L.slot_q
            qm_s = q_m.abs()[sq]
            t_s = None if t is None else t.clamp_min(T_MIN)[sq]
            d0_s = d_prev.clamp_min(EPS)[sq]
        disp, clip, dots = [], [], []  # dots per slot: <lr g, C>, ||C||^2, ||lr g||^2, <lr g, r>
        for i in range(n_slots):
            xp = x_prev[i]
            dd = torch.sub(xp, x_dense[i])  # lr * g
            if i < SQ:
                if t_s is None:  # C = clamp(x, -q_m, q_m)
                    c = torch.maximum(torch.minimum(xp, qm_s[i]), -qm_s[i])
                else:  # C = sign(x) min(|x|, q_m)^t, as in the quantizer's forward (§1.1)
                    c = torch.minimum(xp.abs(), qm_s[i]).clamp_min_(_LOG_FLOOR).log_()
                    c.mul_(t_s[i]).exp_().copysign_(xp)
                z = c / d0_s[i]
                resid = torch.round(z).sub_(z)  # r at the current d (§3.5)
                dots.append(torch.stack([torch.dot(dd, c), torch.dot(c, c), torch.dot(dd, dd),
                                         torch.dot(dd, resid)]))
                clip.append(c)
            else:  # not a quantized weight: C = x, r = 0, and the forget term is x itself
                zero = torch.zeros((), dtype=dd.dtype, device=dd.device)
                dots.append(torch.stack([torch.dot(dd, xp), torch.dot(xp, xp), torch.dot(dd, dd),
                                         zero]))
                clip.append(xp)
            disp.append(dd)
        scale = torch.tensor([1.0 / lr, 1.0, 1.0 / (lr * lr), 1.0 / lr], dtype=torch.float32,
                             device=x_dense[0].device)
        dots = torch.stack(dots) * scale  # (slots, 4): <g, C>, ||C||^2, ||g||^2, <g, r>
        fam = torch.zeros(len(L.families), 3, dtype=dots.dtype, device=dots.device).index_add_(
            0, L.slot_family, dots[:, :3])
        gamma = forget_rate(fam[:, 0], fam[:, 1], fam[:, 2], lr, remaining)
        if SQ:
            d_star, gamma = quant_steps(dots[:SQ, 3], dots[:SQ, 2], gamma, L.slot_family[:SQ], lr,
                                        lo[sq], up[sq])
            # one d* per quantized layer, inside that layer's own bit range (§6.1.3)
            d_star = torch.minimum(torch.maximum(d_star, lo[sq]), up[sq])
            d_new = d_new.index_copy(0, sq, d_star)
            d_star = d_star.clamp_min(EPS)
        forget, gF = [], []
        for i in range(n_slots):
            if i < SQ:  # Q_{d*}(x) = d* round(C / d*)
                q = torch.div(clip[i], d_star[i]).round_().mul_(d_star[i])
                gF.append(torch.dot(disp[i], q))
                forget.append(q)
            else:
                gF.append(dots[i, 0] * lr)
                forget.append(x_prev[i])
        gF = torch.zeros_like(gamma).index_add_(0, L.slot_family, torch.stack(gF) / lr)
        gamma = descent_cap(gamma, gF, fam[:, 2], lr)
        g_slot = gamma[L.slot_family]
        for i in range(n_slots):
            f = forget[i].mul_(g_slot[i]) if i < SQ else forget[i] * g_slot[i]
            x_dense[i].sub_(f)
        L.scatter(x_dense)
        if d_new is not None:
            quant.write_d(d_new)

    # ================================================================== reporting
    def describe(self) -> dict:
        """JSON-serialisable summary of the optimizer's current state.

        Keys: ``stage`` (of the last completed step), ``step`` (completed steps),
        ``total_steps``, ``period`` (pruning period index or None), ``num_groups``,
        ``target_units`` (K), ``achieved_units`` (total the run prunes; None before the last
        pruning period), ``pruned_units`` (committed), ``active_units`` (being forgotten),
        ``zero_units`` (units with exactly zero group norm or committed), ``group_sparsity``
        (``zero_units / num_groups``), ``weight_bits`` / ``act_bits`` (``{layer: rounded bits}``),
        ``avg_weight_bits`` (weighted by each layer's weight size), ``avg_act_bits`` (mean over
        layers), ``b_l_weight``, ``b_u_weight``, ``b_l_act``, ``b_u_act`` (current bounds;
        ``b_u_*`` of the last completed step), ``bits_frozen``, ``skipped_steps`` (steps skipped
        for a NaN/Inf gradient).
        """
        plan = self._plan
        k = max(self._step - 1, 0)
        norms = self.qadg.group_norms(self._model).cpu()
        zero = (norms == 0) | self._pruned
        n_zero = int(zero.sum())
        q = self._quant
        wb, ab = {}, {}
        avg_w = avg_a = None
        if len(q):
            bits = q.bits().cpu().tolist()
            rounded = [int(round(b)) if math.isfinite(b) else None for b in bits]
            for i in range(q.n_weight):
                wb[q.layer_names[i]] = rounded[i]
            for i in range(q.n_weight, len(q)):
                ab[q.layer_names[i]] = rounded[i]
            pairs = [(r, n) for r, n in zip(rounded[:q.n_weight], q.weight_numel) if r is not None]
            if pairs:
                avg_w = sum(r * n for r, n in pairs) / sum(n for _, n in pairs)
            acts = [r for r in rounded[q.n_weight:] if r is not None]
            if acts:
                avg_a = sum(acts) / len(acts)
        in_joint = plan.stage(self._step) == "joint" or plan.stage(k) == "joint"
        return {
            "stage": plan.stage(k),
            "step": self._step,
            "total_steps": plan.total_steps,
            "period": self._period if (self._period >= 0 and in_joint) else None,
            "num_groups": plan.num_groups,
            "target_units": plan.target,
            "achieved_units": self._achieved,
            "pruned_units": int(self._pruned.sum()),
            "active_units": len(self._active),
            "zero_units": n_zero,
            "group_sparsity": n_zero / plan.num_groups if plan.num_groups else 0.0,
            "weight_bits": wb,
            "act_bits": ab,
            "avg_weight_bits": avg_w,
            "avg_act_bits": avg_a,
            "b_l_weight": plan.weight_bits[0],
            "b_u_weight": plan.weight_upper(k),
            "b_l_act": None if plan.act_bits is None else plan.act_bits[0],
            "b_u_act": plan.act_upper(k),
            "bits_frozen": self._frozen_bits is not None,
            "skipped_steps": self._skipped,
        }

    # ================================================================== checkpointing
    def state_dict(self) -> dict:
        """torch's optimizer state (moments per parameter) plus QASSO's own, under ``"qasso"``.

        Everything is a tensor, number, string, bool, None, list or dict, so the result loads
        with ``torch.load(path, weights_only=True)``.
        """
        sd = self._inner.state_dict()
        plan = self._plan
        k = max(self._step - 1, 0)
        sd["qasso"] = {
            "format": _STATE_FORMAT,
            "variant": self.variant,
            "step": self._step,
            "stage": plan.stage(k),
            "total_steps": plan.total_steps,
            "schedule": [plan.schedule.warmup_end, plan.schedule.projection_end,
                         plan.schedule.joint_end],
            "num_groups": plan.num_groups,
            "num_quantizers": [self._quant.n_weight, self._quant.n_act],
            "period": self._period,
            "active_units": list(self._active),
            "pruned_units": self.pruned_units,
            "b_u_weight": plan.weight_upper(k),
            "b_u_act": plan.act_upper(k),
            "frozen_bits": None if self._frozen_bits is None
            else [int(b) for b in self._frozen_bits.cpu().tolist()],
            "achieved_units": self._achieved,
            "skipped_steps": self._skipped,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (of a QASSO built on the same model, QADG and schedule)."""
        if not isinstance(state_dict, dict) or "qasso" not in state_dict:
            raise ValueError("QASSO.load_state_dict: state_dict has no 'qasso' entry; it was not "
                             "produced by QASSO.state_dict()")
        s = state_dict["qasso"]
        if s.get("format") != _STATE_FORMAT:
            raise ValueError(f"QASSO.load_state_dict: unknown format {s.get('format')!r}; "
                             f"expected {_STATE_FORMAT!r}")
        plan = self._plan
        checks = {
            "variant": (s["variant"], self.variant),
            "total_steps": (s["total_steps"], plan.total_steps),
            "schedule": (list(s["schedule"]), [plan.schedule.warmup_end,
                                               plan.schedule.projection_end,
                                               plan.schedule.joint_end]),
            "num_groups": (s["num_groups"], plan.num_groups),
            "num_quantizers": (list(s["num_quantizers"]), [self._quant.n_weight, self._quant.n_act]),
        }
        for key, (saved, mine) in checks.items():
            if saved != mine:
                raise ValueError(f"QASSO.load_state_dict: the saved {key} is {saved!r} but this "
                                 f"optimizer has {mine!r}; build it with the same model, QADG, "
                                 "GETAConfig, variant and total_steps")
        inner_sd = {k: v for k, v in state_dict.items() if k != "qasso"}
        self._inner.load_state_dict(inner_sd)
        self.param_groups = self._inner.param_groups
        self.state = self._inner.state
        self._step = int(s["step"])
        self._period = int(s["period"])
        self._pruned = torch.zeros(plan.num_groups, dtype=torch.bool)
        if s["pruned_units"]:
            self._pruned[torch.tensor(s["pruned_units"], dtype=torch.long)] = True
        self._rebuild_pruned_rows()
        self._set_active(s["active_units"])
        fb = s["frozen_bits"]
        self._set_frozen(None if fb is None else torch.tensor(fb, dtype=torch.float32,
                                                               device=self._quant.device))
        self._achieved = s.get("achieved_units")
        self._skipped = int(s.get("skipped_steps", 0))
