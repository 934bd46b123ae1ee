"""Transformers' model specifics, registered with the core (:mod:`geta_hf.registry`).

* GPT-2's ``Conv1D`` (weight stored ``(in, out)``, sizes ``nx``/``nf``) and its quantized form
  :class:`QuantConv1D`;
* the attribute names transformers' attention modules (and their configs) use for head counts
  and head-derived sizes;
* ``use_cache=False`` for graph capture and ONNX export (one forward over the whole sequence,
  no KV-cache outputs).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.layers import QuantLayerMixin
from ..registry import register_forward_default, register_linear_type, register_shape_attributes

__all__ = ["QuantConv1D", "register_transformers_specifics"]


class QuantConv1D(QuantLayerMixin, Conv1D):
    """GPT-2 ``Conv1D`` (weight stored ``(in, out)``) with GETA fake quantization."""

    weight_out_dim = 1

    def __init__(self, nf: int, nx: int, *, nonlinear: bool = True,
                 quantize_input: bool = False) -> None:
        Conv1D.__init__(self, nf, nx)
        self._init_quantizers(nonlinear, quantize_input)

    @classmethod
    def from_float(cls, conv, *, nonlinear: bool = True, quantize_input: bool = False):
        """Wrap an existing ``Conv1D``; the new layer shares its parameter objects."""
        return cls.wrap(conv, ("nf", "nx"), nonlinear=nonlinear, quantize_input=quantize_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GPT-2's ``Conv1D`` (``x @ W + b``) with the quantized input and weight."""
        x, w = self._quant_inputs(x)
        size_out = x.size()[:-1] + (self.nf,)
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), w)
        return out.view(size_out)

    def __repr__(self) -> str:  # Conv1D overrides __repr__; keep the children visible
        return nn.Module.__repr__(self)

    def extra_repr(self) -> str:
        """Sizes, for ``print(model)``."""
        return f"nf={self.nf}, nx={self.nx}"


def register_transformers_specifics() -> None:
    """Register transformers' layer types, head attributes and forward defaults (idempotent)."""
    register_linear_type(Conv1D, QuantConv1D, weight_out_dim=1, in_attr="nx", out_attr="nf")
    register_shape_attributes(
        query=("num_heads", "num_attention_heads", "n_heads", "n_head"),
        kv=("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head"),
        size=("all_head_size", "inner_dim", "split_size", "q_size", "kv_size"),
        groups=("num_key_value_groups",))
    register_forward_default("use_cache", False)
