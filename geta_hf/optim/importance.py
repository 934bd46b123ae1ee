"""Unit importance (method §3.3) and the deterministic choice of redundant units.

Both run once per pruning period (period boundaries may synchronise with the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..config import IMPORTANCE_CRITERIA

__all__ = ["UnitStats", "importance_scores", "select_units", "kept_floor"]

_NORM_EPS = 1e-8


@dataclass
class UnitStats:
    """Per-unit sums over the unit's group slices (members with role ``"out"``).

    ``sq_x = ||x_i||^2``, ``sq_g = ||g_i||^2``, ``dot = <x_i, g_i>`` (1-D, one entry per unit),
    ``numel`` = the number of parameters in the unit's group slices. With gradient statistics
    averaged over several steps (``GETAConfig.importance_source="gradient"``), ``sq_g`` and
    ``dot`` are the means over the steps and ``dot_sq`` the mean of the per-step ``<x_i, g_i>^2``
    (the empirical-Fisher form of the second-order term); ``None``: ``dot^2`` of the one step.
    """

    sq_x: torch.Tensor
    sq_g: torch.Tensor
    dot: torch.Tensor
    numel: torch.Tensor
    dot_sq: Optional[torch.Tensor] = None


def importance_scores(stats: UnitStats, weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of the five saliency criteria of §3.3, each normalised over all units.

    * magnitude ``||x_i||``; avg_magnitude ``||x_i|| / numel_i`` (per parameter, so a head and a
      channel are comparable);
    * cosine_similarity ``<x_i, g_i> / ((||x_i|| + 1e-8)(||g_i|| + 1e-8)) + 1``;
    * taylor_first_order ``|<x_i, g_i>|``; taylor_second_order ``0.5 <x_i, g_i>^2`` (the mean
      of the per-step squares when ``stats.dot_sq`` is given).

    Each criterion is divided by ``sqrt(sum over units of criterion^2) + 1e-8`` before weighting.
    Low score = redundant.
    """
    norm_x = stats.sq_x.clamp_min(0).sqrt()
    norm_g = stats.sq_g.clamp_min(0).sqrt()
    crit = {
        "magnitude": norm_x,
        "avg_magnitude": norm_x / stats.numel.to(norm_x.dtype).clamp_min(1),
        "cosine_similarity": stats.dot / ((norm_x + _NORM_EPS) * (norm_g + _NORM_EPS)) + 1.0,
        "taylor_first_order": stats.dot.abs(),
        "taylor_second_order": 0.5 * (stats.dot.square() if stats.dot_sq is None
                                      else stats.dot_sq),
    }
    score = torch.zeros_like(norm_x)
    for name in IMPORTANCE_CRITERIA:
        w = float(weights.get(name, 0.0))
        if w == 0.0:
            continue
        c = crit[name]
        score = score + w * c / (c.square().sum().sqrt() + _NORM_EPS)
    return score


def kept_floor(num_units: int, min_units: int, divisible: int) -> int:
    """Fewest units a family may keep: ``min_units`` rounded up to a multiple of ``divisible``.

    A result ``>= num_units`` means the family cannot be pruned at all.
    """
    m = max(1, divisible)
    return m * math.ceil(max(1, min_units) / m)


def select_units(scores: torch.Tensor, eligible: torch.Tensor, family_of_unit: torch.Tensor,
                 num_units: Sequence[int], kept: Sequence[int], floors: Sequence[int],
                 divisible: int, budget: int) -> List[int]:
    """Choose up to ``budget`` redundant units, lowest scores first (ties: lower unit id).

    Args:
        scores: one score per unit (global ids).
        eligible: bool mask of units that may be chosen (not pruned yet).
        family_of_unit: family index of each unit.
        num_units, kept, floors: per family: total units, units still kept, fewest allowed kept.
        divisible: ``group_divisible`` ``m``; a family's kept count stays a multiple of ``m``
            (or all its units). Units join a family's selection in chunks that reach the next
            allowed count, each chunk made of the family's lowest-score candidates
            (method §6.1.6: never truncate by index). With ``m = 1`` this is the plain
            greedy: the ``budget`` lowest scores subject to every family keeping ``floors``.
        budget: number of units wanted.

    Returns the chosen global unit ids, sorted ascending.
    """
    if budget <= 0:
        return []
    m = max(1, divisible)
    ids = torch.nonzero(eligible, as_tuple=False).reshape(-1)
    if ids.numel() == 0:
        return []
    # stable sort of ascending ids: equal scores keep id order (deterministic tie-break)
    order = ids[torch.argsort(scores[ids].float().cpu(), stable=True)].tolist()
    fam = family_of_unit.cpu().tolist()
    kept = list(kept)
    closed = [kept[f] - 1 < floors[f] for f in range(len(kept))]
    pending: Dict[int, List[int]] = {}
    chosen: List[int] = []
    remaining = budget
    for u in order:
        f = fam[u]
        if closed[f]:
            continue
        nxt = m * ((kept[f] - 1) // m)  # next allowed kept count below the current one
        if nxt < floors[f]:
            closed[f] = True
            pending.pop(f, None)
            continue
        need = kept[f] - nxt
        if need > remaining:  # this family's next chunk no longer fits the budget
            closed[f] = True
            pending.pop(f, None)
            continue
        bucket = pending.setdefault(f, [])
        bucket.append(u)
        if len(bucket) == need:
            chosen.extend(bucket)
            kept[f] = nxt
            remaining -= need
            pending.pop(f)
            if remaining == 0:
                break
    return sorted(chosen)
