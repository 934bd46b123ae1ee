"""The joint pruning/quantization update of GETA-METHOD §3.4-3.5, on batched tensors.

For the rows of the active redundant units of a family (``R``) QASSO takes the step

    x  <-  x - lr * g - gamma * F,      F = Q_{d*}(x)  (quantized weights)   or   x  (others),

where ``Q_d(x) = C + d * r`` with ``C = sign(x) min(|x|, q_m)^t`` and
``r = sign(x) (round(u/d) - u/d)``. Quantities are vectors: one entry per family (``gamma``) or
per *slot* (one quantized weight's redundant rows inside one family: its own ``d*``).

Differences from the reference (all deliberate, GETA-METHOD §6.1):

* ``gamma`` is zero when ``||C|| < eps`` (not when the signed mean of ``C`` is small, §6.1.2),
  and never above the linear-decay rate ``1 / (T - t_in)`` (the ``cos_C < 0`` formula diverges
  as ``cos_C -> 0-``; a smaller ``gamma`` keeps every bound).
* ``d*`` is computed **per quantized layer** from that layer's own ``<g_l, r_l>`` and
  ``||g_l||^2`` and its own bounds ``[d(b_u_cur, q_m_l, t_l), d(b_l, q_m_l, t_l)]`` (§6.1.3).
  Because ``sum_l ||g_l||^2 <= ||g||^2`` the family still satisfies the §3.5 bound
  ``gamma * sum_l d*_l <g_l, r_l> >= -zeta * eta * lr * ||g||^2``. The 0.8 safeguard shrinks the
  family's single ``gamma`` by the largest factor any of its layers needs, which keeps every
  ``gamma * d*_l`` product (and so every bound) unchanged.
* ``d*`` is written in the dot-product form ``zeta eta lr ||g_l||^2 / (gamma |<g_l, r_l>|)``, which
  equals the paper's ``zeta eta lr ||g|| / (gamma |cos_r| ||r||)`` but stays exact when
  ``||r|| < 1e-8`` (the cosine's ``max(||r||, 1e-8)`` would otherwise inflate ``d*``).
* **Descent cap.** The residual ``r`` is measured at the current ``d``, but the step uses
  ``Q_{d*}``, whose residual differs. After ``d*`` is fixed, ``A = <g, F>`` is computed with the
  actual forget vector and, if ``A < 0``, ``gamma`` is capped at
  ``(1 - eta (1 - zeta)) lr ||g||^2 / |A|``. This is exactly the §3.5 budget
  (``(1 - eta) + zeta eta``), so the cap is inactive whenever the paper's derivation applies,
  and ``<g, -Delta> >= eta (1 - zeta) lr ||g||^2`` then holds for the step actually taken.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ETA", "ZETA", "SAFEGUARD", "C_ZERO_EPS", "forget_rate", "quant_steps",
           "descent_cap", "descent_margin"]

#: eta of §3.5: the forget term may use at most ``(1 - eta)`` of the descent ``lr ||g||^2``.
ETA = 0.999
#: zeta of §3.5: the quantization-residual term may use at most ``zeta * eta`` of it.
ZETA = 0.9
#: Safeguard factor of §3.5: while ``d* < d_lo``: ``gamma *= 0.8``, ``d* /= 0.8``.
SAFEGUARD = 0.8
#: ``||C||`` below this counts as a zero clip vector (gamma = 0, §6.1.2 fix).
C_ZERO_EPS = 1e-8
_COS_EPS = 1e-8
_MAX_SAFEGUARD = 1000.0


def descent_margin() -> float:
    """``eta * (1 - zeta)``: the guaranteed fraction of ``lr ||g||^2`` in ``<g, -Delta>``."""
    return ETA * (1.0 - ZETA)


def forget_rate(gC: torch.Tensor, CC: torch.Tensor, gg: torch.Tensor, lr: float,
                remaining: torch.Tensor | float) -> torch.Tensor:
    """Per-family forget rate ``gamma`` (§3.5).

    Args:
        gC, CC, gg: ``<g, C>``, ``||C||^2``, ``||g||^2`` over each family's redundant slices.
        lr: the weight learning rate of this step.
        remaining: ``T - t_in`` (steps left in the period, including this one).

    ``cos_C >= 0`` gives ``1 / (T - t_in)`` (linear decay to exactly 0 at the period's end);
    ``cos_C < 0`` gives ``(1 - eta) lr ||g|| / (|cos_C| ||C||)``, at most ``1 / (T - t_in)``;
    ``||C|| < eps`` or a non-finite cosine gives 0.
    """
    norm_c = CC.clamp_min(0).sqrt()
    norm_g = gg.clamp_min(0).sqrt()
    cos = gC / (norm_c.clamp_min(_COS_EPS) * norm_g)
    pos = torch.ones_like(cos) / remaining
    # capped at the linear-decay rate: as cos_C -> 0- the §3.5 formula diverges and would
    # overshoot the unit past zero (gamma > 1); a smaller gamma only shrinks the negative term
    neg = torch.minimum((1.0 - ETA) * lr * norm_g / (cos.abs() * norm_c), pos)
    gamma = torch.where(cos >= 0, pos, neg)
    ok = torch.isfinite(cos) & (norm_c >= C_ZERO_EPS) & torch.isfinite(gamma)
    return torch.where(ok, gamma, torch.zeros_like(gamma))


def quant_steps(gr: torch.Tensor, gg_slot: torch.Tensor, gamma: torch.Tensor,
                slot_family: torch.Tensor, lr: float, d_lo: torch.Tensor, d_up: torch.Tensor):
    """Per-layer quantization step ``d*`` with the 0.8 safeguard (§3.5, per layer: §6.1.3).

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


def descent_cap(gamma: torch.Tensor, gF: torch.Tensor, gg: torch.Tensor, lr: float) -> torch.Tensor:
    """Cap ``gamma`` so that ``lr ||g||^2 + gamma <g, F> >= eta (1 - zeta) lr ||g||^2``.

    ``gF = <g, F>`` with the forget vector ``F`` actually applied (``Q_{d*}(x)`` or ``x``).
    """
    budget = (1.0 - descent_margin()) * lr * gg
    cap = budget / gF.abs()
    capped = torch.minimum(gamma, cap)
    return torch.where((gF < 0) & torch.isfinite(cap), capped, gamma)
