"""`PackedQuantLinear`: a compressed layer holding bit-packed integer weight codes and a scale.

The dequantized weight ``codes * scale`` equals the fake-quantized weight ``Q(W)`` of the
`QuantLinear`/`QuantConv1D` it was packed from, bit for bit (method §1.1: ``Q(W) = sign(W) d
round(u/d)``, and the code is ``sign(W) round(u/d)``). Codes are stored densely at the layer's
bit width (``ceil(out * in * bits / 8)`` bytes, see `bitpack.py`); the input quantizer, if any, is
kept and keeps quantizing the layer input.

In inference (eval mode, no gradients needed) a layer whose weight codes and input codes both fit
int8 computes ``(k_x @ k_W^T) (d_x d_W) + b`` on an integer GEMM (see `intmm.py`); its weight
codes are unpacked once to an int8 tensor held in memory, never saved. Everything else, and
every forward that needs gradients, takes the float path: ``x_q @ (codes * scale)^T + b``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.functional import EPS, T_MIN
from ..quant.layers import PackedLayer, QuantLayerMixin, carry_over_hooks
from ..quant.quantizer import GETAQuantizer
from .bitpack import pack_codes, packed_nbytes, unpack_codes
from .intmm import (INT8_MAX, IntState, accumulation_fits, int8_linear, int_mm_supported,
                    max_code, quantizer_scalars)

__all__ = ["PackedQuantLinear", "pack_layer", "bits_for_codes"]


def bits_for_codes(max_abs_code: int) -> int:
    """Signed bits needed to store codes in ``[-max, max]`` (at least 2)."""
    return max(2, int(math.ceil(math.log2(max_abs_code + 1))) + 1)


class PackedQuantLinear(PackedLayer, nn.Linear):
    """Layer of a compressed model: ``y = x_q @ (codes * scale)^T + b``.

    Persistent buffers: ``weight_packed`` (1-D uint8, the ``(out, in)`` codes packed at
    ``weight_bits`` bits each), ``weight_scale`` (0-dim, the step ``d``), ``weight_clip`` and
    ``weight_exponent`` (the learned ``q_m`` and ``t``, kept so the layer can become a trainable
    `QuantLinear` again), and an empty ``weight`` guard (see ``__init__``). The weight values are
    ``dequantized_weight()``; in eval mode they are computed once and cached.

    ``kernel`` says which path inference takes (``"int8"`` or ``"float"``);
    ``integer_kernels = False`` (or :class:`geta_hf.compress.use_integer_kernels`) forces float.

    It is an ``nn.Linear`` (with ``in_features``/``out_features``) so that peft's LoRA targets
    it as it is: ``get_peft_model``, ``PeftModel.from_pretrained`` and transformers'
    ``load_adapter`` wrap it, the codes stay packed and frozen, and the adapter runs in float
    beside it. Merging an adapter into the codes (``merge_and_unload``) is not supported: the
    merged weight is not on the layer's quantization grid (peft fails on the empty ``weight``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_bits: int = 8, act_quantizer: Optional[GETAQuantizer] = None,
                 nonlinear: bool = True, dtype: torch.dtype = torch.float32, device=None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight to allocate
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_bits = int(weight_bits)
        nbytes = packed_nbytes(self.in_features * self.out_features, self.weight_bits)
        self.register_buffer("weight_packed", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("weight_clip", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("weight_exponent", torch.ones((), dtype=torch.float32, device=device))
        # An empty tensor under the dense layer's name: loading the checkpoint into a plain dense
        # model (geta_hf not imported) then fails on a shape mismatch instead of silently
        # re-initialising the weight. Its dtype is the compute dtype (some modeling code, e.g.
        # T5, casts activations to `layer.weight.dtype`). Use `dequantized_weight()` for values.
        self.register_buffer("weight", torch.zeros(0, dtype=dtype, device=device))
        self.nonlinear = bool(nonlinear)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.act_quantizer = act_quantizer
        #: use the integer GEMM in inference where the codes allow it (a plain flag, not saved)
        self.integer_kernels = True
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None
        self._int_cache: Optional[tuple] = None  # (key, (int8 codes, d_x d_W) or None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The layer's float dtype (of the ``weight`` placeholder: it follows ``.half()``,
        ``.to(torch.bfloat16)``, ...)."""
        return self.weight.dtype

    # ------------------------------------------------------------------ weights
    def codes(self) -> torch.Tensor:
        """The integer codes as an ``(out, in)`` int16 tensor."""
        n = self.in_features * self.out_features
        return unpack_codes(self.weight_packed, self.weight_bits, n).view(
            self.out_features, self.in_features)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer weight codes (shape ``(out, in)``); they are packed at ``weight_bits``."""
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"set_codes: expected shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(codes.shape)}")
        self.weight_packed = pack_codes(codes, self.weight_bits).to(self.weight_packed.device)
        self._drop_caches()

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight the codes stand for, ``codes x weight_scale``, in ``dtype``."""
        dtype = dtype or self.compute_dtype
        return self.codes().to(dtype) * self.weight_scale.to(dtype)

    def train(self, mode: bool = True):
        """``nn.Module.train``; entering training drops the cached unpacked weights."""
        if mode:  # training may change the scales; eval() after it rebuilds the cache lazily
            self._drop_caches()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._drop_caches()
        return super()._apply(fn, *args, **kwargs)

    def _drop_caches(self) -> None:
        self._cache = self._cache_key = self._int_cache = None

    def _state_key(self, device: torch.device) -> tuple:
        """Identity and in-place version of every tensor the caches derive from (no host sync)."""
        ts = [self.weight_packed, self.weight_scale]
        aq = self.act_quantizer
        if aq is not None:
            ts += [p for p in (aq.d, aq.q_m, aq.t) if p is not None]
        return (device,) + tuple((id(t), t._version) for t in ts)

    # ------------------------------------------------------------------ integer path
    def _act_quantizing(self) -> bool:
        aq = self.act_quantizer
        return aq is not None and aq.calibrated and aq.enabled

    def _int_state(self, device: torch.device) -> Optional[IntState]:
        """The integer path's weights and scalars if the codes fit the int8 GEMM, else None.

        Built on first use and whenever a scale or the codes change (host syncs only then).
        """
        key = self._state_key(device)
        if self._int_cache is None or self._int_cache[0] != key:
            state = None
            max_w = (1 << (self.weight_bits - 1)) - 1
            if max_w <= INT8_MAX:
                max_x = max_code(self.act_quantizer)
                if max_x <= INT8_MAX and accumulation_fits(self.in_features, max_x, max_w):
                    d, q_m, t = quantizer_scalars(self.act_quantizer)
                    scale = float(torch.tensor(d, dtype=torch.float32) * self.weight_scale.float())
                    w = self.codes().to(device=device, dtype=torch.int8)
                    state = IntState(w, scale, d, q_m, t)
            self._int_cache = (key, state)
        return self._int_cache[1]

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return True
        return any(p.requires_grad for p in self.act_quantizer.parameters())

    @property
    def kernel(self) -> str:
        """The path inference takes: ``"int8"`` (integer GEMM) or ``"float"``.

        Training, any forward that needs gradients, and tracing (``torch.compile``,
        ``torch.export``) take the float path. Builds the integer weights on first call.
        """
        if self.integer_kernels and self._act_quantizing() and \
                self._int_state(self.weight_packed.device) is not None:
            return "int8"
        return "float"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` on the integer path when it applies (see the class docstring), else in float."""
        if self.integer_kernels and not self.training and self._act_quantizing() \
                and not torch.compiler.is_compiling() \
                and int_mm_supported(x.numel() // max(1, x.shape[-1]), self.in_features,
                                     self.out_features, x.device) \
                and not self._needs_grad(x):
            state = self._int_state(x.device)
            if state is not None:
                return int8_linear(x, state, self.bias)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if self.training or torch.compiler.is_exporting():
            # an exported graph dequantizes from the packed codes (no module state is written)
            w = self.dequantized_weight(x.dtype)
        else:  # inference: dequantize once and reuse
            key = (x.dtype,) + self._state_key(x.device)
            if self._cache is None or self._cache_key != key:
                self._cache = self.dequantized_weight(x.dtype).to(x.device)
                self._cache_key = key
            w = self._cache
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        """Sizes and weight bits, for ``print(model)``."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_bits={self.weight_bits}")


@torch.no_grad()
def pack_layer(layer: nn.Module) -> PackedQuantLinear:
    """Turn a `QuantLinear` or `QuantConv1D` into a `PackedQuantLinear` with identical outputs."""
    if not isinstance(layer, QuantLayerMixin):
        raise TypeError(f"pack_layer: expected a quantized layer, got {type(layer).__name__}")
    q = layer.weight_quantizer
    w = layer.effective_weight().detach()
    if layer.weight_out_dim == 1:  # Conv1D stores (in, out)
        w = w.t()
    wq = q(w.float())
    d = q.d.detach().clamp_min(EPS).float()
    codes = torch.round(wq / d)
    max_code = int(codes.abs().max().item()) if codes.numel() else 0
    bits = bits_for_codes(max_code)
    if bits > 16:
        raise ValueError(f"pack_layer: the weight quantizer of {type(layer).__name__} needs {bits} "
                         "bits (> 16); train with GETA's bit constraints or set_bits() first")
    out_f, in_f = codes.shape
    packed = PackedQuantLinear(in_f, out_f, bias=layer.bias is not None, weight_bits=bits,
                               act_quantizer=layer.act_quantizer, nonlinear=q.t is not None,
                               dtype=layer.weight.dtype, device=layer.weight.device)
    packed.set_codes(codes)
    packed.weight_scale.copy_(d)
    packed.weight_clip.copy_(q.q_m.detach().abs().float())
    if q.t is not None:
        packed.weight_exponent.copy_(q.t.detach().clamp_min(T_MIN).float())
    if layer.bias is not None:
        packed.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    packed.train(layer.training)
    carry_over_hooks(layer, packed)
    return packed
