"""The ``geta`` quantization method of transformers: the HfQuantizer lifecycle and registration.

A compressed checkpoint's ``config.json`` carries ``quantization_config = {"quant_method":
"geta (pip install geta-hf; import geta_hf)", "format_version": 1, "layers": {...},
"architecture": {...}, ...}``: per quantized layer
its shape, weight bits, scale/clip/exponent and input quantizer; and the pruned architecture
(units kept per family, every resized parameter's shape, changed module attributes). With
``geta_hf`` imported, plain ``AutoModel*.from_pretrained(dir)`` builds the dense skeleton on the
meta device, `GETAHfQuantizer` resizes and replaces its modules before the weights are loaded,
and the exact compressed model comes back.

Without ``geta_hf`` imported, transformers cannot know the method: it logs "Unknown quantization
type, got <quant_method> - ...", loads the dense skeleton and fails on the pruned shapes with a
fixed message ("You set `ignore_mismatched_sizes` to `False` ..."). ``quant_method`` is the only
text of the checkpoint that this path prints, hence the install hint inside it (:data:`QUANT_METHOD`;
checkpoints written before it say ``"geta"`` and still load).

The config lives in :mod:`.quant_config`, the module surgery of loading in :mod:`.skeleton`.
"""

from __future__ import annotations

import os

from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant_config import (FORMAT_VERSION, QUANT_METHOD, QUANT_METHODS, READABLE_VERSIONS,
                           CheckpointError, GETAQuantizationConfig,
                           quantization_config_from_model)
from .skeleton import build_compressed_skeleton, check_loaded_model

__all__ = ["GETAQuantizationConfig", "GETAHfQuantizer", "FORMAT_VERSION", "READABLE_VERSIONS",
           "QUANT_METHOD", "QUANT_METHODS", "register", "quantization_config_from_model",
           "CheckpointError", "build_compressed_skeleton", "check_loaded_model"]


class GETAHfQuantizer(HfQuantizer):
    """Rebuilds a GETA-compressed model inside ``from_pretrained`` (see module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = GETAQuantizationConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        """Validate the config; the method only loads pre-quantized (compressed) checkpoints."""
        self.quantization_config.validate()
        if not self.pre_quantized:
            raise CheckpointError("the geta method loads GETA-compressed checkpoints; to compress a "
                                  "model, train it with geta_hf.GETATrainer or call geta_hf.compress_model")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .integrity import validate_checkpoint

        # runs before any weight file is opened: refuse pickles before they could be unpickled
        for f in checkpoint_files or ():
            if not str(f).endswith(".safetensors"):
                raise CheckpointError(
                    f"GETA checkpoints are read from safetensors files only; refusing "
                    f"{os.path.basename(str(f))!r} (pickle-based weights are never loaded)")
        # the whole checkpoint is checked before the skeleton is touched
        validate_checkpoint(model, self.quantization_config, [str(f) for f in checkpoint_files or ()])
        return build_compressed_skeleton(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .hub import bind_push_to_hub

        check_loaded_model(model, self.quantization_config)
        bind_push_to_hub(model)  # a loaded compressed model pushes with its GETA card too
        return model

    def get_state_dict_and_metadata(self, model):
        """Refresh the config from the live model and record the tensors' integrity metadata."""
        from .integrity import RECORD_KEY, checkpoint_record

        # refresh the config from the live model, so learned input ranges saved after further
        # fine-tuning match their tensors; the tensor file records both (integrity.py)
        fresh = quantization_config_from_model(model)
        self.quantization_config = fresh
        model.config.quantization_config = fresh
        return None, {RECORD_KEY: checkpoint_record(model, fresh)}

    def is_serializable(self, *args, **kwargs) -> bool:
        """GETA models save with ``save_pretrained``."""
        return True

    @property
    def is_trainable(self) -> bool:
        """A loaded compressed model can be fine-tuned (float path under autograd)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Quantization-aware fine-tuning of a loaded model is supported."""
        return True


_registered = False


def register() -> None:
    """Register the ``geta`` method (every name in :data:`QUANT_METHODS`) with transformers
    (idempotent; re-imports are safe)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    for name in QUANT_METHODS:
        if name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(name)(GETAQuantizationConfig)
        if name not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(name)(GETAHfQuantizer)
    _registered = True
