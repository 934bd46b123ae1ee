"""Quantized drop-in layers: `QuantLinear` (an ``nn.Linear``) and the mixin other layer types
use (GPT-2's ``Conv1D`` is registered by the HF integration, :mod:`geta_hf.hf.layers`).

Each keeps its ``weight``/``bias`` parameters under the usual names (so state dicts, tied-weight
checks and optimizers see the same tensors) and adds ``weight_quantizer`` and, optionally,
``act_quantizer`` (the layer input). Both quantizers are per tensor (method §1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_linear_type
from .quantizer import GETAQuantizer

__all__ = ["QuantLayerMixin", "QuantLinear", "PackedLayer", "is_quant_layer", "quant_layers", "carry_over_hooks"]

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
    1 for a layer storing its weight ``(in, out)``).
    """

    weight_out_dim: int = 0
    weight_quantizer: GETAQuantizer
    act_quantizer: Optional[GETAQuantizer]
    #: When True the layer computes in full precision on its own ``weight`` (no quantizer, no
    #: ``weight_delta``; used while capturing the graph).
    quant_bypass: bool = False
    #: Optional callable returning a tensor added to ``weight`` before it is quantized (or None
    #: for nothing), e.g. a LoRA adapter's ``B A`` (set by :mod:`geta_hf.hf.peft`): the layer
    #: then quantizes the merged weight, so merging the adapter keeps the model exact.
    weight_delta = None

    def _init_quantizers(self, nonlinear: bool, quantize_input: bool) -> None:
        w = self.weight
        self.weight_quantizer = GETAQuantizer(nonlinear, dtype=torch.float32, device=w.device)
        if quantize_input:
            self.act_quantizer = GETAQuantizer(nonlinear, dtype=torch.float32, device=w.device,
                                               calibrated=False)
        else:
            self.act_quantizer = None
        self.quant_bypass = False

    @classmethod
    def wrap(cls, layer: nn.Module, size_attrs, *, nonlinear: bool, quantize_input: bool):
        """A layer of this class sharing ``layer``'s parameter objects (``weight``, ``bias``),
        size attributes, training mode and hooks; for ``from_float`` constructors."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in size_attrs:
            setattr(new, name, getattr(layer, name))
        new.weight = layer.weight
        new.bias = layer.bias
        new._init_quantizers(nonlinear, quantize_input)
        new.train(layer.training)
        carry_over_hooks(layer, new)
        return new

    def effective_weight(self) -> torch.Tensor:
        """``weight`` plus the ``weight_delta`` (if any): the weight the quantizer sees."""
        delta = self.weight_delta() if self.weight_delta is not None else None
        return self.weight if delta is None else self.weight + delta

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``Q(W)`` used by the forward pass."""
        return self.weight_quantizer(self.effective_weight())

    def _quant_inputs(self, x: torch.Tensor):
        if self.quant_bypass:
            return x, self.weight
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return x, self.quantized_weight()


class PackedLayer:
    """Marker of a compressed layer: it holds integer weight codes, not a float weight, so
    :func:`geta_hf.prepare_model` never quantizes it again (``PackedQuantLinear`` is one)."""


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
        return cls.wrap(linear, ("in_features", "out_features"), nonlinear=nonlinear,
                        quantize_input=quantize_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``nn.Linear`` on the quantized input and weight."""
        x, w = self._quant_inputs(x)
        return F.linear(x, w, self.bias)


register_linear_type(nn.Linear, QuantLinear, weight_out_dim=0, in_attr="in_features",
                     out_attr="out_features")


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a GETA quantized layer."""
    return isinstance(module, QuantLayerMixin)


def quant_layers(model: nn.Module):
    """``(name, layer)`` for every quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def uncalibrated_inputs(layers) -> list:
    """Names of the ``(name, layer)`` pairs whose input quantizer was never calibrated."""
    return [n for n, m in layers if m.act_quantizer is not None and not m.act_quantizer.calibrated]
