"""Quantized drop-in layers: `QuantLinear` (an ``nn.Linear``) and `QuantConv1D` (GPT-2's Conv1D).

Each keeps its ``weight``/``bias`` parameters under the usual names (so state dicts, tied-weight
checks and optimizers see the same tensors) and adds ``weight_quantizer`` and, optionally,
``act_quantizer`` (the layer input). Both quantizers are per tensor (GETA-METHOD §1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import GETAQuantizer

__all__ = ["QuantLayerMixin", "QuantLinear", "QuantConv1D", "is_quant_layer", "quant_layers",
           "carry_over_hooks"]

# torch's per-module hook registries. A layer swapped for its quantized (or packed) form takes
# them over, so hooks the user registered keep firing and their handles keep working.
_HOOK_REGISTRIES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                    "_backward_pre_hooks")


def carry_over_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` (the module replacing ``src``) share ``src``'s forward/backward hooks."""
    for name in _HOOK_REGISTRIES:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


class QuantLayerMixin:
    """Shared quantizer plumbing of the quantized layers.

    ``weight_out_dim`` is the weight dimension that indexes output features (0 for ``nn.Linear``,
    1 for ``Conv1D``).
    """

    weight_out_dim: int = 0
    weight_quantizer: GETAQuantizer
    act_quantizer: Optional[GETAQuantizer]
    #: When True the layer computes in full precision (used while capturing the graph).
    quant_bypass: bool = False

    def _init_quantizers(self, nonlinear: bool, quantize_input: bool) -> None:
        w = self.weight
        self.weight_quantizer = GETAQuantizer(nonlinear, dtype=torch.float32, device=w.device)
        if quantize_input:
            self.act_quantizer = GETAQuantizer(nonlinear, dtype=torch.float32, device=w.device,
                                               calibrated=False)
        else:
            self.act_quantizer = None
        self.quant_bypass = False

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``Q(W)`` used by the forward pass."""
        return self.weight_quantizer(self.weight)

    def _quant_inputs(self, x: torch.Tensor):
        if self.quant_bypass:
            return x, self.weight
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return x, self.weight_quantizer(self.weight)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with GETA fake quantization of its weight (and optionally its input)."""

    weight_out_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 nonlinear: bool = True, quantize_input: bool = False, device=None,
                 dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(nonlinear, quantize_input)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, nonlinear: bool = True,
                   quantize_input: bool = False) -> "QuantLinear":
        """Wrap an existing ``nn.Linear``; the new layer shares its parameter objects."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_quantizers(nonlinear, quantize_input)
        new.train(linear.training)
        carry_over_hooks(linear, new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quant_inputs(x)
        return F.linear(x, w, self.bias)


def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D  # a layer type, not the HF integration

    return Conv1D


def _make_quant_conv1d():
    Conv1D = _conv1d_cls()

    class QuantConv1D(QuantLayerMixin, Conv1D):
        """GPT-2 ``Conv1D`` (weight stored ``(in, out)``) with GETA fake quantization."""

        weight_out_dim = 1

        def __init__(self, nf: int, nx: int, *, nonlinear: bool = True,
                     quantize_input: bool = False) -> None:
            Conv1D.__init__(self, nf, nx)
            self._init_quantizers(nonlinear, quantize_input)

        @classmethod
        def from_float(cls, conv, *, nonlinear: bool = True, quantize_input: bool = False):
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            new.nf, new.nx = conv.nf, conv.nx
            new.weight = conv.weight
            new.bias = conv.bias
            new._init_quantizers(nonlinear, quantize_input)
            new.train(conv.training)
            carry_over_hooks(conv, new)
            return new

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x, w = self._quant_inputs(x)
            size_out = x.size()[:-1] + (self.nf,)
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), w)
            return out.view(size_out)

        def __repr__(self) -> str:  # Conv1D overrides __repr__; keep the children visible
            return nn.Module.__repr__(self)

        def extra_repr(self) -> str:
            return f"nf={self.nf}, nx={self.nx}"

    QuantConv1D.__module__ = __name__
    QuantConv1D.__qualname__ = "QuantConv1D"
    return QuantConv1D


QuantConv1D = _make_quant_conv1d()


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantLayerMixin)


def quant_layers(model: nn.Module):
    """``(name, layer)`` for every quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
