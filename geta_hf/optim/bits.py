"""`BitController`: everything QASSO does to the quantizer scalars ``d``, ``q_m``, ``t``.

One job: keep every quantizer's bit width inside its range while the clip and step learn.

* **Scale-aware update** (departure from method §3.1, measured in §7.3): the dense
  optimizer steps the quantizer scalars in log space, in the coordinates *clip* ``s = ln q_m``
  (bits held fixed: ``d`` moves with ``q_m^t``) and *step* ``ln d`` (clip held fixed). With
  ``b = log2(q_m^t / d + 1) + 1`` (§1.2) the gradients are ``dL/ds = q_m dL/dq_m + t d dL/dd``
  (the LSQ-style clip gradient, which also sees the rounding error, not only saturated entries)
  and ``dL/dln d = d dL/dd``. :meth:`to_log_space` rewrites the ``.grad`` fields before torch's
  optimizer runs, :meth:`from_log_space` maps its additive step back
  (``q_m <- q_m e^{ds}``, ``d <- d e^{d ln d + t ds}``), so ``quant_lr`` is a relative rate
  whatever the layer's scale.
* **Partial projection** (§3.2): after every projection and joint step ``d`` is clipped into
  ``[d(b_u_cur), d(b_l)]`` of its own layer; ``q_m``, ``t`` and the weights are not projected.
  In the joint stage this holds for *every* layer: the redundant rows' quant step ``d*`` of
  §3.5 only shapes their forget term (see :mod:`.joint`), it is never written into ``d``.
* **Clip calibration** (§7.2): whenever the weight bit bound changes (projection periods) and
  when the bits are frozen, each weight quantizer's clip is set to the MSE-optimal clip at the
  layer's *current* bits (:func:`geta_hf.quant.calibrate.mse_clip`), keeping the bits.
* **Freeze** (§3.2 cool-down): ``bits = clamp(round(b), b_l, b_u_cur)``, then after each step
  ``d = d(bits, q_m, t)`` exactly, while ``q_m`` keeps learning. With a BOPs target
  (``GETAConfig.target_relative_bops``) the weight bits are then lowered where the
  Fisher-weighted quantization error per BOP saved is smallest until the target holds
  (:mod:`.budget`), so the bit widths differ by layer according to each layer's sensitivity
  and cost.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..quant.calibrate import mse_clip
from ..quant.functional import T_MIN, d_for_bits
from .budget import allocate_bits, weighted_error
from .layout import QuantTable, denominators
from .schedule import StagePlan

__all__ = ["BitController"]


def _grads(params: List[torch.Tensor]) -> Optional[torch.Tensor]:
    if all(p.grad is None for p in params):
        return None
    return torch.stack([torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params])


class BitController:
    """Bit-range projection, log-space quantizer steps, clip calibration and bit freezing."""

    def __init__(self, quant: QuantTable, plan: StagePlan, target_bops: Optional[float] = None,
                 bit_costs: Optional[Callable[[], Tuple[List[float], float]]] = None,
                 fisher: Optional[Callable[[int], torch.Tensor]] = None) -> None:
        """``target_bops``: relative BOPs to reach when the bits freeze (:mod:`.budget`), with
        ``bit_costs()`` -> ``(per weight layer BOPs per bit, the rest)`` and ``fisher(i)`` the
        diagonal Fisher estimate of weight ``i``."""
        self.quant = quant
        self.plan = plan
        self.target_bops, self._bit_costs, self._fisher = target_bops, bit_costs, fisher
        self.frozen_bits: Optional[torch.Tensor] = None
        self._frozen_den: Optional[torch.Tensor] = None
        self._den_cache: dict = {}

    def __len__(self) -> int:
        return len(self.quant)

    # ------------------------------------------------------------------ bounds
    def dens(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(2^(b_u_cur-1) - 1, 2^(b_l-1) - 1)`` per quantizer at step ``k`` (cached)."""
        plan, q = self.plan, self.quant
        key = (plan.weight_upper(k), plan.act_upper(k))
        if key not in self._den_cache:
            hi = [key[0]] * q.n_weight + [key[1]] * q.n_act
            lo = [plan.weight_bits[0]] * q.n_weight + \
                 ([plan.act_bits[0]] * q.n_act if q.n_act else [])
            self._den_cache[key] = (denominators(hi, q.device), denominators(lo, q.device))
        return self._den_cache[key]

    def d_bounds(self, k: int):
        """``(d_lo, d_up) = (d(b_u_cur), d(b_l))`` per quantizer at the current ``q_m``, ``t``."""
        den_hi, den_lo = self.dens(k)
        _, q_m, t = self.quant.stacked()
        top = self.quant.top(q_m, t)
        return top / den_hi, top / den_lo

    def bound_changed(self, k: int) -> bool:
        """Whether the weight bit bound at step ``k`` differs from the one at ``k - 1``."""
        return k > 0 and self.plan.weight_upper(k) != self.plan.weight_upper(k - 1)

    # ------------------------------------------------------------------ log-space steps
    def to_log_space(self):
        """Rewrite the ``.grad`` of every ``d`` and ``q_m`` into log-space coordinates.

        Returns the pre-step ``(d, q_m)`` for :meth:`from_log_space` (None: no gradient)."""
        q = self.quant
        gd, gq = _grads(q.d), _grads(q.q_m)
        if gd is None or gq is None:
            return None
        d, q_m, t = q.stacked()
        tt = torch.ones_like(d) if t is None else t.clamp_min(T_MIN)
        g_clip = q_m * gq + tt * d * gd  # dL/d(ln q_m) with the bits held fixed
        g_step = d * gd  # dL/d(ln d) with the clip held fixed
        for params, g in ((q.q_m, g_clip), (q.d, g_step)):
            pairs = [(p.grad, v) for p, v in zip(params, g.unbind(0)) if p.grad is not None]
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
        return d, q_m

    @torch.no_grad()
    def from_log_space(self, before) -> None:
        """Map torch's additive step on the log coordinates back to ``d`` and ``q_m``."""
        if before is None:
            return
        d0, q0 = before
        q = self.quant
        d1, q1, t = q.stacked()
        tt = torch.ones_like(d1) if t is None else t.clamp_min(T_MIN)
        ds = q1 - q0
        torch._foreach_copy_(q.q_m, list((q0 * torch.exp(ds)).unbind(0)))
        q.write_d(d0 * torch.exp((d1 - d0) + tt * ds))

    # ------------------------------------------------------------------ stage operations
    def project(self, k: int) -> None:
        """Partial projection (§3.2): ``d <- clip(d, d(b_u_cur), d(b_l))`` for every quantizer."""
        lo, up = self.d_bounds(k)
        d = self.quant.stacked()[0]
        self.quant.write_d(torch.minimum(torch.maximum(d, lo), up))

    @torch.no_grad()
    def calibrate(self, bits: Optional[torch.Tensor] = None) -> None:
        """Set every weight quantizer's clip to the MSE-optimal one at its bits (kept)."""
        q = self.quant
        if not q.n_weight:
            return
        bits = q.bits()[: q.n_weight] if bits is None else bits[: q.n_weight]
        bits = torch.where(torch.isfinite(bits), bits, torch.full_like(bits, 16.0))
        t_all = q.stacked()[2]
        for i in range(q.n_weight):
            t = None if t_all is None else t_all[i]
            clip = mse_clip(q.weights[i], bits[i], t)
            q.q_m[i].copy_(clip.to(q.q_m[i].dtype))
            tt = None if t is None else t.clamp_min(T_MIN)
            q.d[i].copy_(d_for_bits(bits[i], clip, tt).to(q.d[i].dtype))

    def after_step(self, k: int, stage: str) -> None:
        """The stage's operation on the scalars after the dense step of step ``k``."""
        if not len(self.quant):
            return
        if stage in ("projection", "joint"):
            self.project(k)
            if self.bound_changed(k):
                self.calibrate()
        elif stage == "cooldown" and self.frozen_bits is not None:
            self.apply_frozen()

    def freeze(self, k: int) -> None:
        """Cool-down: ``bits = clamp(round(b(d, q_m, t)), b_l, b_u_cur)`` per quantizer; the
        weight clips are then calibrated at those bits."""
        plan, q = self.plan, self.quant
        hi = torch.tensor([plan.weight_upper(k)] * q.n_weight + [plan.act_upper(k)] * q.n_act,
                          dtype=torch.float32, device=q.device)
        lo = torch.tensor([plan.weight_bits[0]] * q.n_weight +
                          ([plan.act_bits[0]] * q.n_act if q.n_act else []),
                          dtype=torch.float32, device=q.device)
        bits = q.bits().float()
        bits = torch.where(torch.isfinite(bits), bits, hi)  # a degenerate quantizer: keep b_u
        bits = torch.minimum(torch.maximum(torch.round(bits), lo), hi)
        if self.target_bops is not None and q.n_weight:
            bits = self._within_budget(bits, lo)
        self.set_frozen(bits)
        self.calibrate(self.frozen_bits)

    def _within_budget(self, bits: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """Lower weight bits (Fisher-weighted error per BOP, :func:`.budget.allocate_bits`)
        until the relative BOPs reach ``target_bops``."""
        n = self.quant.n_weight
        costs, fixed = self._bit_costs()
        weights = self.quant.weights
        chosen = allocate_bits(
            [int(b) for b in bits[:n].tolist()], [int(b) for b in lo[:n].tolist()], costs, fixed,
            self.target_bops, lambda i, b: weighted_error(weights[i], self._fisher(i), b))
        out = bits.clone()
        out[:n] = torch.tensor(chosen, dtype=bits.dtype, device=bits.device)
        return out

    def set_frozen(self, bits: Optional[torch.Tensor]) -> None:
        """Freeze the bits to ``bits`` (one per quantizer), or unfreeze with ``None``."""
        self.frozen_bits = bits
        self._frozen_den = None if bits is None else torch.exp2(bits - 1.0) - 1.0

    def apply_frozen(self) -> None:
        """``d = d(bits, q_m, t)`` with the frozen integer bits."""
        _, q_m, t = self.quant.stacked()
        self.quant.write_d(self.quant.top(q_m, t) / self._frozen_den)
