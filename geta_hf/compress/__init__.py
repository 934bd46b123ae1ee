"""Subnet construction (physical removal, integer packing) and compression metrics."""

from .estimate import BopsEstimator
from .intmm import use_integer_kernels
from .metrics import layer_bits, model_stats
from .onnx_export import OnnxExportError, export_onnx
from .packed import PackedQuantLinear, pack_layer
from .report import format_stats_table, report
from .subnet import CompressionError, compress_model
from ..surgery import ARCH_ATTR, CompressedArch, apply_module_attrs

__all__ = ["compress_model", "CompressionError", "PackedQuantLinear", "pack_layer", "ARCH_ATTR",
           "CompressedArch", "apply_module_attrs", "model_stats", "layer_bits", "report",
           "format_stats_table",
           "BopsEstimator", "use_integer_kernels",
           "export_onnx", "OnnxExportError"]
