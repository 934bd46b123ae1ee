"""Integer GEMM for compressed layers: ``y = (k_x @ k_W^T) (d_x d_W) + b``, int32 accumulation.

GETA's quantizer (method §1.1) maps a tensor to ``Q(x) = sign(x) d k`` with integer codes
``k = round(min(|x|, q_m)^t / d)`` (``t = 1`` for the linear quantizer), one step ``d`` per tensor.
So a layer whose weight *and* input are quantized computes exactly ``d_x d_W (k_x @ k_W^T) + b``:
the integer product is exact in int32, and only the final rescale is rounded. With both code
ranges within int8 (``|k| <= 127``, i.e. <= 8 bits) this runs on ``torch._int_mm``.

Measured on this project's CPU (AVX512-VNNI, 2 threads, MiniLM shapes K, N in {384, 1536};
best of 30-200 runs on a loaded machine): ``torch._int_mm`` beat fp32 ``F.linear`` at every M
from 1 to 1024 (2-9x at M = 1024; issue #15 measured 8.6-9.3x there on a quiet machine) and
accepts any M, K, N on CPU (CUDA wants M > 16 and K, N multiples of 8; other shapes fall back
to float). The weight-only kernels were slower than fp32 ``F.linear`` at every shape measured:
``_weight_int8pack_mm`` 4-7x slower at M = 1 (K, N up to 4096) and 10x or more at M = 128;
``_weight_int4pack_mm_for_cpu`` with fp32 activations 8-100x slower (it is fast only with bf16
activations, which would change the computed values). Weight-only layers therefore stay on the
float path.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..quant.functional import EPS, T_MIN
from ..quant.quantizer import GETAQuantizer

__all__ = ["INT8_MAX", "IntState", "quantizer_scalars", "input_codes", "max_code",
           "int_mm_supported", "int8_linear", "use_integer_kernels"]

#: largest code magnitude an int8 GEMM operand may hold (symmetric codes, <= 8 bits)
INT8_MAX = 127
_INT32_MAX = 2 ** 31 - 1
_LOG_FLOOR = 1e-30  # as in quant.functional: min(|x|, q_m) is floored before ``log``


class IntState(NamedTuple):
    """What a layer's integer path needs, built once: int8 weight codes and host scalars."""

    w_codes: torch.Tensor  #: int8 ``(out, in)``
    scale: float  #: ``d_x d_W``, rounded to float32
    d: float  #: input step ``d_x``
    q_m: float  #: input clip
    t: Optional[float]  #: input exponent (None: linear quantizer)


@torch.no_grad()
def quantizer_scalars(q: GETAQuantizer) -> Tuple[float, float, Optional[float]]:
    """``(d, q_m, t)`` of ``q`` as the float32 values its forward uses (one host sync)."""
    d = q.d.detach().clamp_min(EPS).float()
    qm = q.q_m.detach().abs().clamp_min(EPS).float()
    t = None if q.t is None else q.t.detach().clamp_min(T_MIN).float()
    vals = torch.stack([d, qm, torch.ones_like(d) if t is None else t]).tolist()
    return vals[0], vals[1], None if t is None else vals[2]


def max_code(q: GETAQuantizer) -> int:
    """Largest code magnitude ``q`` can produce: ``round(q_m^t / d)`` (one host sync)."""
    d, qm, t = quantizer_scalars(q)
    top = torch.tensor(qm, dtype=torch.float32)
    if t is not None:
        top = top.pow(torch.tensor(t, dtype=torch.float32))
    return int(torch.round(top / torch.tensor(d, dtype=torch.float32)))


def input_codes(x: torch.Tensor, d: float, q_m: float, t: Optional[float] = None) -> torch.Tensor:
    """The integer codes ``k`` of ``Q(x) = d k`` as an int8 tensor of ``x``'s shape.

    ``d``, ``q_m``, ``t`` from :func:`quantizer_scalars`; the codes must fit int8
    (``max_code <= 127``). The same float32 operations in the same order as the forward of
    ``quant.functional.fake_quantize`` (fp16/bf16 are quantized in float32), so
    ``k * d == Q(x)`` bit for bit. Scalar (not 0-dim tensor) operands: 2-3x faster on CPU.
    """
    if x.dtype != torch.float32:
        x = x.float()
    if t is None:
        k = torch.clamp(x, -q_m, q_m).div_(d).round_()
    else:
        u = torch.clamp(x.abs(), _LOG_FLOOR, q_m)  # min(|x|, q_m), floored (q_m >= EPS > floor)
        k = u.log_().mul_(t).exp_().div_(d).round_().copysign_(x)
    return k.to(torch.int8)


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


def int8_linear(x: torch.Tensor, state: IntState, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(k_x @ k_W^T) d_x d_W + b``: input codes, int8 x int8 -> int32 GEMM, one rescale.

    The rescale and bias add are one float32 pass (an int32 sum can exceed the float16 range);
    the result has ``x``'s dtype.
    """
    codes = input_codes(x, state.d, state.q_m, state.t)
    acc = torch._int_mm(codes.reshape(-1, codes.shape[-1]), state.w_codes.t())
    if bias is None:
        y = acc.mul(state.scale)  # int32 * float scalar -> float32
    else:
        y = torch.add(bias if bias.dtype == torch.float32 else bias.float(), acc, alpha=state.scale)
    return y.to(x.dtype).view(*x.shape[:-1], state.w_codes.shape[0])


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
