"""geta-hf: joint structured pruning and mixed-precision QAT (GETA) for Hugging Face Transformers."""

from .compress import CompressionError, export_onnx, model_stats, report, use_integer_kernels
from .config import GETAConfig
from .graph import QADG, GraphCaptureError, build_qadg, register_op
from .hf import (CheckpointError, DistillationTrainer, GETATrainer, GETATrainingArguments,
                 compress_model, distillation_loss, save_compressed)
from .optim import QASSO
from .quant import calibrate_activations, prepare_model

__version__ = "0.1.0"

__all__ = [
    "GETAConfig", "prepare_model", "calibrate_activations", "build_qadg", "QADG",
    "GraphCaptureError", "compress_model", "CompressionError", "model_stats", "report",
    "save_compressed", "CheckpointError", "QASSO", "GETATrainer", "GETATrainingArguments",
    "DistillationTrainer", "distillation_loss", "export_onnx", "use_integer_kernels",
    "register_op", "__version__",
]
