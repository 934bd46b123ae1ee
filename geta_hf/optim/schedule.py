"""`StagePlan`: everything QASSO's schedule decides, as pure functions of the 0-based step ``k``.

Stages come from :meth:`GETAConfig.resolve_schedule` (method §3.2). On top of them:

* **Max-bit reduction.** The projection stage is cut into ``projection_periods`` periods of
  (near-)equal length; in period ``i`` the upper bit bound is ``max(b_l, b_u - i * bit_reduction)``.
  The reduction fires ``projection_periods - 1`` times, as in the reference, and it can never go
  below ``b_l`` (fixes §6.1.5). After the projection stage (joint, cool-down) the final bound
  holds, also when the projection stage has length 0 (the reference skipped the reduction then).
  The same schedule applies to activation bits with their own ``(b_l, b_u)``.
* **Pruning periods.** The joint stage is cut into ``P = min(pruning_periods, joint_steps)``
  periods of near-equal length (so a period is never empty and the forget rate is always defined,
  §6.1.5). ``K = floor(target_group_sparsity * num_groups)`` units are split over them:
  ``K // P`` per period, the last one takes the remainder (§3.3). Targets are cumulative, so a
  period that could not select its share (``min_units``/``group_divisible``) is made up later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..config import GETAConfig, Schedule

__all__ = ["StagePlan", "target_units"]

STAGES = ("warmup", "projection", "joint", "cooldown")


def target_units(target_group_sparsity: float, num_groups: int) -> int:
    """``K = floor(target * num_groups)``, robust to binary rounding (0.29 * 100 gives 29)."""
    return int(math.floor(target_group_sparsity * num_groups + 1e-9))


@dataclass(frozen=True)
class StagePlan:
    """Stages, bit bounds and pruning periods of one run, as pure functions of the step."""

    schedule: Schedule
    projection_periods: int
    requested_pruning_periods: int
    bit_reduction: int
    weight_bits: Tuple[int, int]
    act_bits: Optional[Tuple[int, int]]
    num_groups: int
    target: int  # K

    @classmethod
    def from_config(cls, cfg: GETAConfig, total_steps: int, num_groups: int) -> "StagePlan":
        """The plan of ``cfg`` over ``total_steps`` steps on a search space of ``num_groups`` units."""
        act = None if cfg.activation_bits is None else tuple(int(b) for b in cfg.activation_bits)
        return cls(schedule=cfg.resolve_schedule(total_steps),
                   projection_periods=cfg.projection_periods,
                   requested_pruning_periods=cfg.pruning_periods,
                   bit_reduction=cfg.bit_reduction,
                   weight_bits=tuple(int(b) for b in cfg.weight_bits),
                   act_bits=act, num_groups=num_groups,
                   target=target_units(cfg.target_group_sparsity, num_groups))

    # ------------------------------------------------------------------ stages
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run."""
        return self.schedule.total_steps

    def stage(self, k: int) -> str:
        """Stage of step ``k``; steps past ``total_steps`` stay in cool-down."""
        return self.schedule.stage(k)

    # ------------------------------------------------------------------ bit bounds
    def projection_period(self, k: int) -> int:
        """Index of the max-bit-reduction period in force at step ``k`` (0 in warm-up)."""
        s = self.schedule
        if k < s.warmup_end:
            return 0
        if k >= s.projection_end:
            return self.projection_periods - 1
        return ((k - s.warmup_end) * self.projection_periods) // s.projection_steps

    def upper_bits(self, k: int, bits: Sequence[int]) -> int:
        """Current upper bound ``b_u_cur`` for the range ``bits = (b_l, b_u)`` at step ``k``."""
        b_l, b_u = bits
        return max(b_l, b_u - self.projection_period(k) * self.bit_reduction)

    def weight_upper(self, k: int) -> int:
        """Upper weight-bit bound in force at step ``k``."""
        return self.upper_bits(k, self.weight_bits)

    def act_upper(self, k: int) -> Optional[int]:
        """Upper input-bit bound at step ``k`` (None without input quantization)."""
        return None if self.act_bits is None else self.upper_bits(k, self.act_bits)

    # ------------------------------------------------------------------ pruning periods
    @property
    def pruning_periods(self) -> int:
        """Effective number of pruning periods (0 when the joint stage is empty)."""
        return min(self.requested_pruning_periods, self.schedule.joint_steps)

    def period_start(self, p: int) -> int:
        """First step of pruning period ``p`` (``p == pruning_periods`` gives the joint end)."""
        s = self.schedule
        return s.projection_end + (p * s.joint_steps) // self.pruning_periods

    def pruning_position(self, k: int) -> Tuple[int, int, int]:
        """``(period p, position t_in in 0..T-1, period length T)`` of a joint-stage step."""
        s = self.schedule
        if not s.projection_end <= k < s.joint_end:
            raise ValueError(f"step {k} is not in the joint stage [{s.projection_end}, {s.joint_end})")
        P = self.pruning_periods
        # the largest p with period_start(p) <= k
        p = ((k - s.projection_end + 1) * P - 1) // s.joint_steps
        while self.period_start(p) > k:  # integer-exact correction (at most one iteration)
            p -= 1
        while self.period_start(p + 1) <= k:
            p += 1
        start = self.period_start(p)
        return p, k - start, self.period_start(p + 1) - start

    def saliency_steps(self) -> Tuple[int, int]:
        """``(first, last)`` steps (inclusive) whose gradients feed the pruning periods' saliency
        when ``importance_source="gradient"``: from one period length before the joint stage
        to the start of the last period; each period scores on the steps since the previous
        one started. ``(0, -1)`` (empty) without pruning periods."""
        P = self.pruning_periods
        if P == 0:
            return 0, -1
        first_len = self.period_start(1) - self.period_start(0)
        return max(0, self.period_start(0) - first_len), self.period_start(P - 1)

    def state(self, step: int) -> dict:
        """The schedule as a checkpoint records it, after ``step`` completed steps."""
        k = max(step - 1, 0)
        sched = self.schedule
        return {"stage": self.stage(k), "total_steps": self.total_steps,
                "schedule": [sched.warmup_end, sched.projection_end, sched.joint_end],
                "num_groups": self.num_groups, "b_u_weight": self.weight_upper(k),
                "b_u_act": self.act_upper(k)}

    def cumulative_target(self, p: int) -> int:
        """Units that should be pruned once period ``p`` is committed (``K // P`` per period,
        the last period takes the remainder)."""
        P = self.pruning_periods
        if P == 0:
            return 0
        if p >= P - 1:
            return self.target
        return (self.target // P) * (p + 1)
