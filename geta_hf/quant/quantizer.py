"""`GETAQuantizer`: the learnable per-tensor scalars ``d``, ``q_m`` (and ``t``) of one tensor."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import bit_width, d_for_bits, fake_quantize

__all__ = ["GETAQuantizer"]


class GETAQuantizer(nn.Module):
    """Fake-quantizes one tensor with learnable step ``d``, clip ``q_m`` and exponent ``t``.

    One scalar of each per tensor (per layer), as in method §1. ``t`` exists only for the
    non-linear kind. An activation quantizer starts *uncalibrated*: it passes its input through
    unchanged until :meth:`init_range` sets its range from data (see
    :func:`geta_hf.calibrate_activations`).
    """

    def __init__(self, nonlinear: bool = True, dtype: Optional[torch.dtype] = None,
                 device=None, calibrated: bool = True) -> None:
        super().__init__()
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.d = nn.Parameter(torch.ones((), **kw))
        self.q_m = nn.Parameter(torch.ones((), **kw))
        if nonlinear:
            self.t = nn.Parameter(torch.ones((), **kw))
        else:
            self.register_parameter("t", None)
        #: Python flags (never tensors, so reading them in forward does not sync the host).
        self.calibrated = calibrated
        self.enabled = True

    @property
    def nonlinear(self) -> bool:
        """Whether this quantizer has the exponent ``t``."""
        return self.t is not None

    @torch.no_grad()
    def init_range(self, q_m: torch.Tensor | float, bits: int) -> None:
        """Set ``q_m`` (clamped to be positive), ``t = 1`` and ``d = d(bits, q_m, t)`` (§1.4)."""
        q = torch.as_tensor(q_m, dtype=self.q_m.dtype, device=self.q_m.device).abs()
        q = q.clamp_min(torch.finfo(self.q_m.dtype).tiny ** 0.5)
        self.q_m.copy_(q)
        if self.t is not None:
            self.t.fill_(1.0)
        self.d.copy_(d_for_bits(bits, self.q_m, self.t))
        self.calibrated = True

    def bits(self) -> torch.Tensor:
        """Current (real-valued) bit width ``b(d, q_m, t)`` as a 0-dim tensor."""
        return bit_width(self.d.detach(), self.q_m.detach(),
                         None if self.t is None else self.t.detach())

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Set ``d`` so that the bit width is exactly ``bits`` at the current ``q_m``, ``t``."""
        self.d.copy_(d_for_bits(bits, self.q_m, self.t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x)`` (method §1.1); the identity before calibration or when disabled."""
        if not (self.calibrated and self.enabled):
            return x
        return fake_quantize(x, self.d, self.q_m, self.t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "q_m" in state_dict:
            self.calibrated = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        """Kind, bits and ranges, for ``print(model)``."""
        kind = "nonlinear" if self.nonlinear else "linear"
        if not self.calibrated:
            return f"{kind}, uncalibrated"
        return f"{kind}, bits={float(self.bits()):.2f}"
