"""Integer GEMM for compressed layers: ``y = (k_x @ k_W^T) (d_x d_W) + b``, int32 accumulation.

GETA's quantizer (GETA-METHOD §1.1) maps a tensor to ``Q(x) = sign(x) d k`` with integer codes
``k = round(min(|x|, q_m)^t / d)`` (``t = 1`` for the linear quantizer), one step ``d`` per tensor.
So a layer whose weight *and* input are quantized computes exactly ``d_x d_W (k_x @ k_W^T) + b``:
the integer product is exact in int32, and only the final rescale is rounded. With both code
ranges within int8 (``|k| <= 127``, i.e. <= 8 bits) this runs on ``torch._int_mm``.

Measured on this project's CPU (AVX512-VNNI, 2 threads, MiniLM shapes K, N in {384, 1536}):
``torch._int_mm`` is 2-30x faster than fp32 ``F.linear`` from M = 1 to M = 1024 and accepts any
M, K, N on CPU (CUDA wants M > 16 and K, N multiples of 8; other shapes fall back to float).
The weight-only kernels were slower than fp32 ``F.linear`` at every shape measured:
``_weight_int8pack_mm`` 4-7x slower at M = 1 (K, N up to 4096) and ~30x at M = 1024;
``_weight_int4pack_mm_for_cpu`` with fp32 activations 8-100x slower (it is fast only with bf16
activations, which would change the computed values). Weight-only layers therefore stay on the
float path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..quant.functional import EPS, T_MIN
from ..quant.quantizer import GETAQuantizer

__all__ = ["INT8_MAX", "input_codes", "max_code", "int_mm_supported", "int8_linear",
           "use_integer_kernels"]

#: largest code magnitude an int8 GEMM operand may hold (symmetric codes, <= 8 bits)
INT8_MAX = 127
_INT32_MAX = 2 ** 31 - 1
_LOG_FLOOR = 1e-30  # as in quant.functional: min(|x|, q_m) is floored before ``log``
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _scalars(q: GETAQuantizer):
    d = q.d.detach().clamp_min(EPS)
    qm = q.q_m.detach().abs().clamp_min(EPS)
    t = None if q.t is None else q.t.detach().clamp_min(T_MIN)
    return d, qm, t


def input_codes(x: torch.Tensor, q: GETAQuantizer) -> torch.Tensor:
    """The integer codes ``k`` of ``q(x) = d k``, as a float tensor of ``x``'s shape.

    The same operations, in the same order and dtype, as the forward of
    ``quant.functional.fake_quantize`` (fp16/bf16 are quantized in float32), so
    ``codes * d == q(x)`` bit for bit.
    """
    d, qm, t = _scalars(q)
    if x.dtype in _LOW_PRECISION:
        x = x.float()
    dt = x.dtype
    d_x, qm_x = d.to(dt), qm.to(dt)
    if t is None:
        k = torch.minimum(x, qm_x)
        torch.maximum(k, -qm_x, out=k)
        return k.div_(d_x).round_()
    u = x.abs()
    torch.minimum(u, qm_x, out=u)
    u.clamp_min_(_LOG_FLOOR).log_().mul_(t.to(dt)).exp_()
    return u.div_(d_x).round_().copysign_(x)


@torch.no_grad()
def max_code(q: GETAQuantizer) -> int:
    """Largest code magnitude ``q`` can produce: ``round(q_m^t / d)`` (one host sync)."""
    d, qm, t = _scalars(q)
    top = qm if t is None else qm.pow(t)
    return int(torch.round(top / d).item())


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` accepts an ``(m, k) @ (k, n)`` product on ``device``."""
    if m == 0 or k == 0 or n == 0:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


def accumulation_fits(k: int, max_x: int, max_w: int) -> bool:
    """Whether a ``k``-long dot product of such codes cannot overflow int32."""
    return k * max_x * max_w <= _INT32_MAX


def int8_linear(x_codes: torch.Tensor, w_codes: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``(x_codes @ w_codes^T) * scale + bias`` with an int8 x int8 -> int32 GEMM.

    ``x_codes``: float codes ``(..., K)`` within int8 range; ``w_codes``: int8 ``(N, K)``;
    ``scale``: 0-dim float32 ``d_x d_W``. The rescale is done in float32 (an int32 sum can exceed
    the float16 range) and the result is cast to ``out_dtype``.
    """
    lead = x_codes.shape[:-1]
    xi = x_codes.reshape(-1, x_codes.shape[-1]).to(torch.int8)
    y = torch._int_mm(xi, w_codes.t()).to(torch.float32).mul_(scale)
    if bias is not None:
        y.add_(bias.to(torch.float32) if bias.dtype != torch.float32 else bias)
    return y.to(out_dtype).view(*lead, w_codes.shape[0])


class use_integer_kernels:
    """Turn the integer kernels of every `PackedQuantLinear` in ``model`` on or off.

    Takes effect at once; used as a context manager (``with use_integer_kernels(model, False):``)
    it restores each layer's previous setting on exit. Off, every layer computes in float
    (dequantized weights, fake-quantized inputs), as during training.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        from .packed import PackedQuantLinear  # packed imports this module

        if not isinstance(enabled, bool):
            raise TypeError(f"use_integer_kernels: enabled must be a bool, got {enabled!r}")
        self.model = model
        self._layers = [m for m in model.modules() if isinstance(m, PackedQuantLinear)]
        self._previous = [m.integer_kernels for m in self._layers]
        for m in self._layers:
            m.integer_kernels = enabled

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        for m, prev in zip(self._layers, self._previous):
            m.integer_kernels = prev
