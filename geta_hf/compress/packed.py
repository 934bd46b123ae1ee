"""`PackedQuantLinear`: a compressed layer holding integer weight codes and one float scale.

The dequantized weight ``codes * scale`` equals the fake-quantized weight ``Q(W)`` of the
`QuantLinear`/`QuantConv1D` it was packed from, bit for bit (GETA-METHOD §1.1: ``Q(W) = sign(W) d
round(u/d)`` and the code is ``sign(W) round(u/d)``). The input quantizer, if any, is kept.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.functional import EPS, T_MIN
from ..quant.layers import QuantLayerMixin
from ..quant.quantizer import GETAQuantizer

__all__ = ["PackedQuantLinear", "pack_layer", "codes_dtype", "bits_for_codes"]


def bits_for_codes(max_abs_code: int) -> int:
    """Signed bits needed to store codes in ``[-max, max]`` (at least 2)."""
    return max(2, int(math.ceil(math.log2(max_abs_code + 1))) + 1)


def codes_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


class PackedQuantLinear(nn.Module):
    """Inference/fine-tuning layer of a compressed model: ``y = x_q (codes * scale)^T + b``.

    Buffers: ``weight_codes`` (int8 up to 8 bits, int16 above; shape ``(out, in)``),
    ``weight_scale`` (0-dim, the step ``d``), ``weight_clip`` and ``weight_exponent`` (the
    learned ``q_m`` and ``t``, kept so the layer can be turned back into a trainable
    `QuantLinear`). ``weight_bits`` is the storage width of the codes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_bits: int = 8, act_quantizer: Optional[GETAQuantizer] = None,
                 nonlinear: bool = True, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_bits = int(weight_bits)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features,
                                                         dtype=codes_dtype(weight_bits), device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("weight_clip", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("weight_exponent", torch.ones((), dtype=torch.float32, device=device))
        self.nonlinear = bool(nonlinear)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.act_quantizer = act_quantizer
        self.compute_dtype = dtype
        self._cache: Optional[torch.Tensor] = None

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return self.weight_codes.to(dtype) * self.weight_scale.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only; computed from the codes)."""
        return self.dequantized_weight()

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if self.training:
            w = self.dequantized_weight(x.dtype)
        else:  # inference: dequantize once and reuse
            if self._cache is None or self._cache.dtype != x.dtype or self._cache.device != x.device:
                self._cache = self.dequantized_weight(x.dtype)
            w = self._cache
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_bits={self.weight_bits}")


@torch.no_grad()
def pack_layer(layer: nn.Module) -> PackedQuantLinear:
    """Turn a `QuantLinear` or `QuantConv1D` into a `PackedQuantLinear` with identical outputs."""
    if not isinstance(layer, QuantLayerMixin):
        raise TypeError(f"pack_layer: expected a quantized layer, got {type(layer).__name__}")
    q = layer.weight_quantizer
    w = layer.weight.detach()
    if layer.weight_out_dim == 1:  # Conv1D stores (in, out)
        w = w.t()
    wq = q(w.float()) if w.dtype != torch.float32 else q(w)
    d = q.d.detach().clamp_min(EPS).float()
    codes = torch.round(wq.float() / d)
    max_code = int(codes.abs().max().item()) if codes.numel() else 0
    bits = bits_for_codes(max_code)
    if bits > 16:
        raise ValueError(f"pack_layer: the weight quantizer of {type(layer).__name__} needs {bits} "
                         "bits (> 16); train with GETA's bit constraints or set_bits() first")
    out_f, in_f = codes.shape
    packed = PackedQuantLinear(in_f, out_f, bias=layer.bias is not None, weight_bits=bits,
                               act_quantizer=layer.act_quantizer, nonlinear=q.t is not None,
                               dtype=layer.weight.dtype, device=layer.weight.device)
    packed.weight_codes.copy_(codes.to(packed.weight_codes.dtype))
    packed.weight_scale.copy_(d)
    packed.weight_clip.copy_(q.q_m.detach().abs().float())
    if q.t is not None:
        packed.weight_exponent.copy_(q.t.detach().clamp_min(T_MIN).float())
    if layer.bias is not None:
        packed.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    packed.train(layer.training)
    return packed
