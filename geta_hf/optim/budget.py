"""Integer weight bits under a BOPs budget, chosen by Fisher-weighted quantization error.

Used by :class:`~geta_hf.optim.bits.BitController` when ``GETAConfig.target_relative_bops`` is
set: when the bits are frozen (start of cool-down, pruning done), every weight layer starts at
its rounded learned bits and, while the model's relative BOPs exceed the target, the layer whose
next lower bit width adds the least sensitivity-weighted error per BOP saved loses one bit
(down to ``b_l``). The error of layer ``l`` at ``b`` bits is
``E_l(b) = sum_i F_i (Q_b(w_i) - w_i)^2`` with the MSE-optimal clip at ``b`` and ``F`` the
diagonal Fisher estimate (Adam's second moment of the weight's gradient), the usual
second-order proxy of the loss increase (HAWQ / Fisher-based mixed precision).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Sequence

import torch

from ..quant.calibrate import mse_clip
from ..quant.functional import d_for_bits, fake_quantize

__all__ = ["weighted_error", "allocate_bits"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def weighted_error(w: torch.Tensor, fisher: torch.Tensor, bits: int) -> float:
    """``sum F (Q_b(w) - w)^2`` with the MSE-optimal clip at ``bits`` (linear quantizer)."""
    w = w.detach().float()
    clip = mse_clip(w, bits)
    q = fake_quantize(w, d_for_bits(bits, clip), clip)
    return float((fisher.float() * (q - w).square()).sum())


def allocate_bits(start: Sequence[int], low: Sequence[int], costs: Sequence[float], fixed: float,
                  target: float, error: Callable[[int, int], float]) -> List[int]:
    """Greedy bit allocation: from ``start``, lower one layer by one bit at a time (never below
    ``low``) until ``fixed + sum(costs * bits) <= target``, each time picking the smallest
    ``(error(l, b - 1) - error(l, b)) / costs[l]``. ``error(l, b)`` is evaluated lazily and
    cached. Returns the bits (``start`` unchanged when it already meets the target)."""
    bits = [int(b) for b in start]
    cache = {}

    def err(i: int, b: int) -> float:
        if (i, b) not in cache:
            cache[(i, b)] = error(i, b)
        return cache[(i, b)]

    def total() -> float:
        return fixed + sum(c * b for c, b in zip(costs, bits))

    while total() > target:
        best, best_rate = None, None
        for i, (b, lo, c) in enumerate(zip(bits, low, costs)):
            if b <= lo or c <= 0:
                continue
            rate = (err(i, b - 1) - err(i, b)) / c
            if best_rate is None or rate < best_rate:
                best, best_rate = i, rate
        if best is None:
            logger.warning("QASSO: target_relative_bops=%.4g is out of reach: every layer is at "
                           "its lowest bit width (relative BOPs %.4g)", target, total())
            break
        bits[best] -= 1
    return bits
