"""Hugging Face integration: the registered ``geta`` quantization method and checkpoint I/O."""

from .layers import QuantConv1D, register_transformers_specifics

register_transformers_specifics()  # before anything below prepares or compresses a model

from .quantizer import (CheckpointError, GETAHfQuantizer, GETAQuantizationConfig,
                        quantization_config_from_model, register)
from .args import GETATrainingArguments
from .distill import DistillationTrainer, distillation_loss
from .resume import (IncompleteCheckpointError, ResumeStateError, check_checkpoint,
                     last_complete_checkpoint)
from .card import model_card
from .serialization import (SaveRollbackError, attach_quantization_config, compress_model,
                            save_compressed)
from .trainer import GETACallback, GETATrainer

register()

__all__ = ["QuantConv1D", "register_transformers_specifics", "GETAQuantizationConfig", "GETAHfQuantizer", "CheckpointError", "register",
           "save_compressed", "compress_model", "attach_quantization_config", "model_card",
           "quantization_config_from_model", "GETATrainer", "GETATrainingArguments",
           "GETACallback", "IncompleteCheckpointError", "ResumeStateError", "SaveRollbackError",
           "check_checkpoint", "last_complete_checkpoint", "DistillationTrainer", "distillation_loss"]
