"""MSE-optimal weight clip for GETA's quantizer at a given bit width.

GETA's clip ``q_m`` gets a gradient only from saturated entries (method §1.3); started at
``max|W|`` it has none, so it never moves, and a low-bit layer with heavy tails rounds most of
its weights to zero (§7.2). :func:`mse_clip` searches the clip that minimises the quantization
error ``||Q(W) - sign(W)|W|^t||^2`` with the bit width held fixed (``d = q_m^t / (2^(b-1) - 1)``,
§1.2), so calling it changes the clip and the step together but never the bits. QASSO calls it
whenever a layer's bit bound changes (see ``geta_hf.optim.bits``); the sequential baseline of
the study uses it for post-training quantization.
"""

from __future__ import annotations

from typing import Optional

import torch

from .functional import EPS

__all__ = ["mse_clip", "quant_error"]

_MAX_ELEMS = 1 << 18  # the search reads a strided subsample of larger tensors
_COARSE = torch.logspace(-2.0, 0.0, 73)  # clip / max|W| from 0.01 to 1, 6.6% apart
_FINE = 17  # points of the refinement grid around the best coarse clip


def _levels(bits: torch.Tensor) -> torch.Tensor:
    return torch.exp2(bits.float() - 1.0) - 1.0


def quant_error(w: torch.Tensor, clips: torch.Tensor, bits: torch.Tensor | float,
                t: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """``||Q(w) - sign(w)|w|^t||^2`` for each candidate clip (1-D ``clips``), bits held fixed.

    ``Q`` is the forward of GETA's quantizer (§1.1) with ``d = clip^t / (2^(bits-1) - 1)``.
    """
    a = w.detach().float().reshape(1, -1).abs()
    c = clips.float().reshape(-1, 1).clamp_min(EPS)
    n = _levels(torch.as_tensor(bits))
    if t is None:
        target, u, top = a, torch.minimum(a, c), c
    else:
        tt = torch.as_tensor(t, dtype=torch.float32).clamp_min(1e-2)
        target = a.pow(tt)
        u, top = torch.minimum(a, c).pow(tt), c.pow(tt)
    d = top / n
    return (torch.round(u / d) * d - target).square().sum(1)


@torch.no_grad()
def mse_clip(w: torch.Tensor, bits: torch.Tensor | float,
             t: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """The clip ``q_m`` minimising :func:`quant_error` of ``w`` at ``bits`` (0-dim tensor).

    A log-spaced search over ``[0.01, 1] x max|w|``, refined around its best point. Tensors of
    more than 2^18 entries are searched on an evenly strided subsample. All-zero ``w`` gives a
    tiny positive clip (the quantizer stays finite).
    """
    flat = w.detach().reshape(-1)
    if flat.numel() > _MAX_ELEMS:
        flat = flat[:: -(-flat.numel() // _MAX_ELEMS)]
    top = flat.abs().max().float().clamp_min(EPS ** 0.5)
    coarse = _COARSE.to(top.device) * top
    best = coarse[_chunked_argmin(flat, coarse, bits, t)]
    fine = torch.linspace(0.93, 1.07, _FINE, device=top.device) * best
    fine = fine.clamp_max(top)
    return fine[_chunked_argmin(flat, fine, bits, t)]


def _chunked_argmin(flat, clips, bits, t, chunk: int = 16) -> torch.Tensor:
    errs = torch.cat([quant_error(flat, clips[i:i + chunk], bits, t)
                      for i in range(0, clips.numel(), chunk)])
    return torch.argmin(errs)
