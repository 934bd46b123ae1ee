"""GETA quantization: the fake quantizer, bit-width math, quantized layers and `prepare_model`."""

from .functional import bit_width, d_for_bits, fake_quantize
from .layers import QuantLayerMixin, QuantLinear, is_quant_layer, quant_layers
from .prepare import (calibrate_activations, input_quantizers_disabled, prepare_model,
                      quantization_bypassed)
from .quantizer import GETAQuantizer

__all__ = [
    "bit_width", "d_for_bits", "fake_quantize", "GETAQuantizer", "QuantLinear",
    "QuantLayerMixin", "is_quant_layer", "quant_layers", "prepare_model",
    "calibrate_activations", "quantization_bypassed", "input_quantizers_disabled",
]
