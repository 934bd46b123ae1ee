"""`QASSO`: GETA's quantization-aware structured sparse optimizer (method §3) for PyTorch.

``QASSO`` is a ``torch.optim.Optimizer``. Each ``step()``:

1. runs the dense update of torch's own optimizer for the variant (``AdamW``/``Adam``/``SGD``
   with ``foreach=True``) on two parameter groups: ``"weights"`` (every trainable parameter that
   is not a quantizer scalar, learning rate ``lr``) and ``"quant"`` (``d``, ``q_m``, ``t`` of all
   weight *and* input quantizers, learning rate ``quant_lr``, no weight decay) - in every stage,
   so input quantizers are trained with ``quant_lr`` throughout (fixes §6.1.4);
2. applies GETA's stage logic under ``torch.no_grad()`` through two controllers with one job
   each, using index tensors built in ``__init__`` (or once per pruning period), never by
   matching parameter names:

   * :class:`~geta_hf.optim.bits.BitController` - the quantizer scalars: log-space (scale-aware)
     steps of clip and step size, the bit-range projection in the projection and joint stages,
     MSE clip calibration when the bit bound changes, frozen integer bits in cool-down;
   * :class:`~geta_hf.optim.pruning.PruningController` - the units: at the first step of each
     pruning period score all units (§3.3) and choose the period's redundant units, forget them
     progressively (:mod:`geta_hf.optim.joint`), commit them after the period's last step, and
     re-zero the slices of committed units in every stage.

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
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..config import GETAConfig
from ..graph.qadg import QADG
from ..quant.layers import quant_layers
from .bits import BitController
from .layout import QuantTable, trained_quant_layers
from .pruning import PruningController
from .schedule import StagePlan
from .setup import (VARIANTS, check_args, check_budget, check_one_device, check_quantizers,
                    dense_optimizer, grads_finite)
from .state import (STATE_FORMAT, StateMismatchError, check_param_groups, check_progress,
                    check_same_run, check_state, search_space)

__all__ = ["QASSO", "VARIANTS", "StateMismatchError"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = STATE_FORMAT


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
        no_decay: trainable parameters that take no weight decay (``transformers.Trainer``
            spares biases and norm weights; :class:`geta_hf.GETATrainer` passes the same ones).
            With a nonzero ``weight_decay`` they form a third group ``"weights_no_decay"``
            (same learning rate as ``"weights"``, last in ``param_groups``).
        betas, eps: Adam/AdamW moments; momentum, dampening, nesterov: SGD.
        bops_estimator: a :class:`geta_hf.compress.BopsEstimator` of this model, needed when
            ``cfg.target_relative_bops`` is set (the bits then meet that BOPs budget when they
            freeze, see :mod:`geta_hf.optim.budget`).
        skip_nonfinite: skip (with a warning) any step whose gradients hold NaN or Inf, leaving
            weights, quantizers and optimizer state untouched (see the module docstring).
            ``False`` removes the per-step check (one host sync) for callers that do their own.

    The learning rates are read from ``param_groups`` at every step, so any
    ``torch.optim.lr_scheduler`` works. ``state_dict()`` holds only tensors, numbers, strings,
    lists and dicts (loadable with ``torch.load(..., weights_only=True)``).

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
                 skip_nonfinite: bool = True, bops_estimator=None,
                 no_decay: Iterable[torch.Tensor] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"QASSO: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(qadg, QADG):
            raise TypeError(f"QASSO: qadg must be a geta_hf.QADG (from geta_hf.build_qadg), "
                            f"got {type(qadg).__name__}")
        if not isinstance(cfg, GETAConfig):
            raise TypeError(f"QASSO: cfg must be a geta_hf.GETAConfig, got {type(cfg).__name__}")
        lr, quant_lr, weight_decay = check_args(cfg, variant, lr, total_steps, quant_lr,
                                                weight_decay, skip_nonfinite)
        self._model = model
        self.skip_nonfinite = skip_nonfinite
        self.qadg = qadg
        self.cfg = cfg
        self.variant = variant
        all_layers = quant_layers(model)
        check_quantizers(all_layers, cfg)
        # layers with a frozen weight keep their quantizers untouched unless cfg.compress_frozen
        self._quant_layers = trained_quant_layers(model, cfg.compress_frozen)
        self._quant = QuantTable(self._quant_layers)
        named = dict(model.named_parameters())

        # ---- the dense optimizer: torch's own, on two groups sharing dicts with this object
        quant_ids = {id(p) for _, m in all_layers for q in (m.weight_quantizer, m.act_quantizer)
                     if q is not None for p in q.parameters()}  # never in the weights group
        weights = [p for p in named.values() if p.requires_grad and id(p) not in quant_ids]
        quant = [p for p in self._quant.params if p.requires_grad]
        check_one_device(named, quant_ids)
        inner = dense_optimizer(variant, weights, quant, lr, quant_lr, weight_decay, betas, eps,
                                momentum, dampening, nesterov, no_decay={id(p) for p in no_decay})
        self._ready = False
        # add_param_group re-uses the dicts, so self.param_groups[i] IS inner.param_groups[i]:
        # LR schedulers acting on this optimizer drive the dense step directly.
        super().__init__(inner.param_groups, dict(inner.defaults))
        self._inner = inner
        self.state = inner.state
        self._ready = True

        # ---- schedule and the two controllers
        self._weights = weights
        self._plan = StagePlan.from_config(cfg, total_steps, qadg.num_units)
        self._units = PruningController(model, qadg, cfg, self._plan, named, self._quant.weights)
        #: steps whose loss gradients feed the saliency (empty unless importance_source="gradient")
        self._saliency_steps = (self._plan.saliency_steps() if cfg.importance_source == "gradient"
                                else (0, -1))
        self._bits = self._bit_controller(model, cfg, bops_estimator)
        #: what a checkpoint must match to be resumed (computed once)
        self._space = search_space(qadg, self._quant)
        check_budget(self._plan, self._units.max_prunable(), cfg)
        self._step = 0
        self._warned_past_end = False
        self._skipped = 0

    # ================================================================== set-up helpers
    def _bit_controller(self, model: nn.Module, cfg: GETAConfig, estimator) -> BitController:
        target = cfg.target_relative_bops
        if target is None or not len(self._quant):
            return BitController(self._quant, self._plan)
        if estimator is None:
            raise ValueError("QASSO: cfg.target_relative_bops is set but no bops_estimator was "
                             "given; pass bops_estimator=geta_hf.compress.BopsEstimator(model, "
                             "qadg, example_inputs) (GETATrainer does this itself)")
        layers = [m for _, m in self._quant_layers]
        return BitController(self._quant, self._plan, target,
                             bit_costs=lambda: estimator.weight_bit_costs(model, layers),
                             fisher=self._fisher)

    def _fisher(self, i: int) -> torch.Tensor:
        """Diagonal Fisher estimate of weight quantizer ``i``'s weight: Adam's second moment,
        else the squared gradient, else ones."""
        p = self._quant.weights[i]
        st = self._inner.state.get(p, {})
        if "exp_avg_sq" in st:
            return st["exp_avg_sq"]
        return p.grad.square() if p.grad is not None else torch.ones_like(p)

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
        return torch.nonzero(self._units.pruned).reshape(-1).tolist()

    @property
    def active_units(self) -> List[int]:
        """Global ids of this period's redundant units (being forgotten, not yet committed)."""
        return list(self._units.active)

    @property
    def target_units(self) -> int:
        """``K = floor(target_group_sparsity * num_groups)``."""
        return self._plan.target

    @property
    def achieved_units(self) -> Optional[int]:
        """Units the run prunes in total (known once the last pruning period has selected; below
        ``target_units`` only when ``min_units``/``group_divisible`` forbid more, which is logged)."""
        return self._units.achieved

    # ================================================================== the step
    @torch.no_grad()
    def step(self, closure=None):
        """One QASSO step: torch's dense update, then the stage's GETA operations."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k, plan, units, bits = self._step, self._plan, self._units, self._bits
        if k >= plan.total_steps and not self._warned_past_end:
            logger.warning("QASSO: step %d is past total_steps=%d; staying in cool-down", k + 1,
                           plan.total_steps)
            self._warned_past_end = True
        stage = plan.stage(k)
        lr = float(self.param_groups[0]["lr"])
        if self.skip_nonfinite and not grads_finite(self.param_groups):
            self._skip_step(k, stage)
            return loss
        if stage == "cooldown" and bits.frozen_bits is None and len(bits):
            bits.freeze(k)

        lo, hi = self._saliency_steps
        if lo <= k <= hi and lr > 0:  # the loss gradient of this step, before x moves
            units.accumulate_saliency()
        joint = stage == "joint"
        new_period = snapshot = x_prev = d_prev = w_prev = None
        t_in = T = 0
        if joint:
            p, t_in, T = plan.pruning_position(k)
            if p != units.period:
                new_period = p
                if units.period_budget(p) > 0:  # x before the dense step, for scores and rows
                    snapshot = units.snapshot()
            elif units.layout is not None and lr > 0:
                x_prev = units.layout.gather()
            if lr > 0 and (snapshot is not None or units.layout is not None):
                w_prev = torch._foreach_mul(self._weights, 1.0)  # for the whole step's descent
                if len(bits):
                    d_prev = torch.stack(self._quant.d).detach()

        logged = bits.to_log_space()
        self._inner.step()
        bits.from_log_space(logged)

        if new_period is not None:
            units.start_period(new_period, snapshot, lr)
            if units.layout is not None and lr > 0:
                x_prev = units.layout.gather(snapshot)
            snapshot = None
        bits.after_step(k, stage)
        units.zero_pruned()  # committed units do not move: their rows are not in the descent
        if joint and units.layout is not None and lr > 0:
            bounds = bits.d_bounds(k) if len(bits) else None
            units.joint_update(x_prev, d_prev, self._quant, bounds, lr, T - t_in,
                               self._descent(w_prev, lr))
        if joint and t_in == T - 1:
            units.commit()
            units.zero_pruned()
        self._step += 1
        return loss

    def _descent(self, w_prev: List[torch.Tensor], lr: float) -> torch.Tensor:
        """``lr ||g||^2`` of the dense step over all trainable weights (``g`` = its direction)."""
        diff = torch._foreach_sub(w_prev, self._weights)
        return torch.stack(torch._foreach_norm(diff)).float().square().sum() / lr

    def _skip_step(self, k: int, stage: str) -> None:
        """A step with a NaN/Inf gradient: only the gradient-free schedule bookkeeping runs."""
        self._skipped += 1
        logger.warning("QASSO: step %d has a NaN or Inf gradient and is skipped (weights, "
                       "quantizers and optimizer state unchanged; %d skipped so far)", k + 1,
                       self._skipped)
        units, bits = self._units, self._bits
        if stage == "cooldown" and bits.frozen_bits is None and len(bits):
            bits.freeze(k)
            bits.apply_frozen()
        elif stage == "joint":
            p, t_in, T = self._plan.pruning_position(k)
            if t_in == T - 1:  # the period ends here: it must still commit its units
                units.end_period_unstarted(p)
        self._step += 1

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
        for a NaN/Inf gradient), ``forget_budget_bound_steps`` (joint steps on which the descent
        safeguard slowed the forgetting, :func:`geta_hf.optim.joint.descent_budget`).
        """
        plan = self._plan
        k = max(self._step - 1, 0)
        norms = self.qadg.unit_norms(self._model).cpu()
        zero = (norms == 0) | self._units.pruned
        n_zero = int(zero.sum())
        wb, ab, avg_w, avg_a = self._quant.rounded_bits()
        in_joint = plan.stage(self._step) == "joint" or plan.stage(k) == "joint"
        return {
            "stage": plan.stage(k),
            "step": self._step,
            "total_steps": plan.total_steps,
            "period": self._units.period if (self._units.period >= 0 and in_joint) else None,
            "num_groups": plan.num_groups,
            "target_units": plan.target,
            "achieved_units": self._units.achieved,
            "pruned_units": int(self._units.pruned.sum()),
            "active_units": len(self._units.active),
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
            "bits_frozen": self._bits.frozen_bits is not None,
            "forget_budget_bound_steps": self._units.budget_bound_steps,
            "skipped_steps": self._skipped,
        }

    # ================================================================== checkpointing
    def state_dict(self) -> dict:
        """torch's optimizer state (moments per parameter) plus QASSO's own, under ``"qasso"``.

        Everything is a tensor, number, string, bool, None, list or dict, so the result loads
        with ``torch.load(path, weights_only=True)``.
        """
        sd = self._inner.state_dict()
        sd["qasso"] = {
            "format": _STATE_FORMAT, "config": self.cfg.to_dict(), "search_space": self._space,
            "variant": self.variant, "step": self._step, **self._plan.state(self._step),
            "num_quantizers": [self._quant.n_weight, self._quant.n_act],
            **self._units.progress_state(self._saliency_steps[1] >= 0),
            "frozen_bits": None if self._bits.frozen_bits is None
            else [int(b) for b in self._bits.frozen_bits.cpu().tolist()],
            "skipped_steps": self._skipped,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (of a QASSO built on the same model, QADG and schedule).

        Raises :class:`StateMismatchError` (a ``ValueError``) naming every differing field when
        the state was saved under another :class:`GETAConfig` or on another search space (QADG
        fingerprint, quantized layers), or by an older geta-hf that did not record them; and
        ``ValueError`` naming the field for a variant/schedule mismatch or a damaged progress
        field. Nothing is changed when it raises.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("qasso"), dict):
            raise ValueError("QASSO.load_state_dict: state_dict has no 'qasso' entry; it was not "
                             "produced by QASSO.state_dict()")
        s = state_dict["qasso"]
        check_state(s, self.cfg, self._space)
        plan = self._plan
        check_same_run(s, self.variant, plan, [self._quant.n_weight, self._quant.n_act])
        check_progress(s, plan.num_groups, len(self._quant), plan.pruning_periods)
        self._units.check_saliency_state(s.get("saliency"))
        inner_sd = {k: v for k, v in state_dict.items() if k != "qasso"}
        check_param_groups(inner_sd.get("param_groups", []), self._inner.state_dict()["param_groups"])
        self._inner.load_state_dict(inner_sd)
        self.param_groups = self._inner.param_groups
        self.state = self._inner.state
        self._step = int(s["step"])
        self._units.load_progress(s)
        fb = s.get("frozen_bits")
        self._bits.set_frozen(None if fb is None else torch.tensor(fb, dtype=torch.float32,
                                                                   device=self._quant.device))
        self._skipped = int(s.get("skipped_steps", 0))
