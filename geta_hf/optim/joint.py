"""The joint pruning/quantization update of method §3.4-3.5, on batched tensors.

For the rows of the active redundant units of a family (``R``) QASSO takes the step

    x  <-  x - lr * g - gamma * F,      F = Q_{d*}(x)  (quantized weights)   or   x  (others),

where ``Q_d(x) = C + d * r`` with ``C = sign(x) min(|x|, q_m)^t`` and
``r = sign(x) (round(u/d) - u/d)``. Quantities are vectors: one entry per family (``gamma``) or
per *slot* (one quantized weight's redundant rows inside one family: its own ``d*``).

Deliberate differences from the paper (method §6.1 and §7, measured in the README's
"Deliberate differences"):

* **Progressive forgetting.** ``gamma = 1 / (T - t_in)`` for every family with ``||C|| >= eps``:
  the product of ``(1 - gamma)`` over the period reaches 0 exactly at its last step, so a unit's
  norm falls linearly over the period instead of being hard-zeroed at its end. The paper's
  ``cos_C < 0`` branch (``(1 - eta) lr ||g|| / (|cos_C| ||C||)``) gave ``gamma ~ 1e-4`` in 96%
  of family-steps (§7.4): nothing was forgotten until the commit zeroed the unit in one step.
* **The descent safeguard acts on the whole step.** The forget terms may use at most
  ``FORGET_BUDGET`` of the dense step's descent ``lr ||g||^2`` over *all* trainable weights:
  ``sum_f gamma_f max(0, -<g_f, F_f>) <= FORGET_BUDGET lr ||g||^2``, so
  ``<g, -Delta> >= (1 - FORGET_BUDGET) lr ||g||^2 > 0`` for the step actually taken (with the
  real forget vectors ``F = Q_{d*}(x)``). Where it binds, every opposing family's ``gamma`` is
  scaled down by the same factor, and the linear rate catches up on later steps.
* ``d*`` is computed **per quantized layer** from that layer's own ``<g_l, r_l>`` and
  ``||g_l||^2`` and its own bounds ``[d(b_u_cur), d(b_l)]`` (§6.1.3), in the dot-product form
  ``zeta eta lr ||g_l||^2 / (gamma |<g_l, r_l>|)``, with the 0.8 safeguard of §3.5 (which shrinks
  the family's ``gamma`` by the largest factor any of its layers needs). ``d*`` only sets the
  grid of the forget term ``Q_{d*}(x)`` of the redundant rows; it is never written into the
  layer's ``d``, so pruning a unit does not move the layer's bits (§7.1).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ETA", "ZETA", "SAFEGUARD", "C_ZERO_EPS", "FORGET_BUDGET", "forget_rate",
           "quant_steps", "descent_budget"]

#: eta of §3.5 (used in the ``d*`` formula ``zeta eta lr ||g||^2 / (gamma |<g, r>|)``).
ETA = 0.999
#: zeta of §3.5.
ZETA = 0.9
#: Safeguard factor of §3.5: while ``d* < d_lo``: ``gamma *= 0.8``, ``d* /= 0.8``.
SAFEGUARD = 0.8
#: ``||C||`` below this counts as a zero clip vector (gamma = 0, §6.1.2 fix).
C_ZERO_EPS = 1e-8
#: Fraction of the dense step's descent ``lr ||g||^2`` that the forget terms may use up.
FORGET_BUDGET = 0.5
_MAX_SAFEGUARD = 1000.0


def forget_rate(CC: torch.Tensor, remaining: torch.Tensor | float) -> torch.Tensor:
    """Per-family forget rate: ``1 / (T - t_in)``, or 0 where ``||C|| < eps``.

    Args:
        CC: ``||C||^2`` over each family's redundant slices.
        remaining: ``T - t_in`` (steps left in the period, including this one).
    """
    rate = torch.full_like(CC, 1.0) / remaining
    return torch.where(CC.clamp_min(0).sqrt() >= C_ZERO_EPS, rate, torch.zeros_like(rate))


def quant_steps(gr: torch.Tensor, gg_slot: torch.Tensor, gamma: torch.Tensor,
                slot_family: torch.Tensor, lr: float, d_lo: torch.Tensor, d_up: torch.Tensor):
    """Per-layer quantization step ``d*`` of the forget term, with the 0.8 safeguard (§3.5).

    Args:
        gr: ``<g_l, r_l>`` per slot; gg_slot: ``||g_l||^2`` per slot.
        gamma: per-family forget rate (from :func:`forget_rate`).
        slot_family: family index of each slot.
        d_lo, d_up: per-slot bounds ``d(b_u_cur)`` and ``d(b_l)`` of the slot's layer.

    Returns ``(d_star per slot, gamma per family after the safeguard)``. ``cos_r >= 0`` or
    ``gamma = 0`` gives ``d* = d_up`` (the coarsest grid, ``b_l`` bits). Otherwise
    ``d* = zeta eta lr ||g_l||^2 / (gamma |<g_l, r_l>|)``; while ``d* < d_lo``: ``gamma *= 0.8``,
    ``d* /= 0.8`` (in closed form, with the family's largest count), finally ``d* <= d_up``.
    """
    g_slot = gamma[slot_family]
    neg = (gr < 0) & (g_slot > 0)
    raw = (ZETA * ETA * lr) * gg_slot / (g_slot * gr.abs())
    raw = torch.where(neg & ~torch.isnan(raw), raw, d_up)
    # number of safeguard iterations each slot needs: smallest n with raw / 0.8^n >= d_lo
    short = neg & (raw < d_lo)
    ratio = torch.where(short, d_lo / raw, torch.ones_like(raw))
    n = torch.ceil(torch.log(ratio) / math.log(1.0 / SAFEGUARD)).clamp_min(0)
    n = n + (raw * torch.pow(1.0 / SAFEGUARD, n) < d_lo).to(n.dtype) * short.to(n.dtype)
    # a degenerate d* (underflow to 0) asks for "infinitely many" iterations: 0.8^1000 == 0
    n = torch.where(short, torch.nan_to_num(n, nan=_MAX_SAFEGUARD, posinf=_MAX_SAFEGUARD),
                    torch.zeros_like(n)).clamp(0, _MAX_SAFEGUARD)
    n_fam = torch.zeros_like(gamma).scatter_reduce(0, slot_family, n, reduce="amax",
                                                  include_self=True)
    scale = torch.pow(SAFEGUARD, n_fam)  # 0.8^n per family
    gamma = gamma * scale
    d_star = raw / scale[slot_family]
    d_star = torch.where(neg & torch.isfinite(d_star), d_star, d_up)
    return torch.minimum(d_star, d_up), gamma


def descent_budget(gamma: torch.Tensor, gF: torch.Tensor, descent: torch.Tensor,
                   budget: float = FORGET_BUDGET):
    """Scale the opposing families' ``gamma`` so the forget terms use at most ``budget`` of
    the dense step's descent.

    Args:
        gamma: per-family forget rate; gF: ``<g, F>`` per family with the forget vector
            actually applied; descent: ``lr ||g||^2`` of the whole dense step.

    Returns ``(gamma, bound)``: the scaled rates and whether the budget was binding (0-dim bool).
    """
    cost = (gamma * (-gF).clamp_min(0)).sum()
    scale = torch.where(cost > budget * descent, budget * descent / cost, torch.ones_like(cost))
    scale = torch.nan_to_num(scale, nan=0.0)
    return torch.where(gF < 0, gamma * scale, gamma), scale < 1
