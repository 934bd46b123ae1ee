"""The ``geta`` quantization method of transformers: config, HfQuantizer, registration.

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
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..compress.packed import PackedQuantLinear
from ..surgery import ARCH_ATTR, CompressedArch, apply_module_attrs, resize_parameters, set_submodule
from ..quant.quantizer import GETAQuantizer
from ..registry import shape_attribute_names

__all__ = ["GETAQuantizationConfig", "GETAHfQuantizer", "FORMAT_VERSION", "register",
           "quantization_config_from_model", "CheckpointError"]

logger = logging.getLogger(__name__)

#: 2: the tensor file carries an integrity record (see `integrity.py`); 1 (read, with a warning
#: that values cannot be verified): without it
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: the ``quant_method`` written to checkpoints; transformers prints it when geta_hf is not imported
QUANT_METHOD = "geta (pip install geta-hf; import geta_hf)"
#: every ``quant_method`` this version reads ("geta": checkpoints written before the hint)
QUANT_METHODS = (QUANT_METHOD, "geta")
_TOP_KEYS = {"quant_method", "format_version", "layers", "architecture", "geta_config",
             "base_model"}
_LAYER_KEYS = {"in_features", "out_features", "bias", "weight_bits", "weight_scale",
               "weight_clip", "weight_exponent", "nonlinear", "act"}
_ACT_KEYS = {"bits", "d", "q_m", "t"}
_ARCH_KEYS = {"families", "param_shapes", "module_attrs"}


class CheckpointError(ValueError):
    """A compressed checkpoint is malformed or inconsistent; the message names the field."""


class GETAQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a GETA-compressed model (strictly validated)."""

    def __init__(self, format_version: int = FORMAT_VERSION, layers: Optional[dict] = None,
                 architecture: Optional[dict] = None, geta_config: Optional[dict] = None,
                 base_model: Optional[str] = None, quant_method: str = QUANT_METHOD,
                 **unknown: Any) -> None:
        if unknown:
            raise CheckpointError(f"quantization_config: unknown field(s) {sorted(unknown)}; "
                                  f"allowed: {sorted(_TOP_KEYS)}")
        if quant_method not in QUANT_METHODS:
            raise CheckpointError(f"quantization_config.quant_method: got {quant_method!r}; "
                                  f"allowed: {', '.join(map(repr, QUANT_METHODS))}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        missing = [k for k, v in (("layers", layers), ("architecture", architecture)) if v is None]
        if missing:
            raise CheckpointError(f"quantization_config: missing field(s) {missing}; a GETA "
                                  "checkpoint records its quantized layers and its architecture")
        self.layers = layers
        self.architecture = architecture
        self.geta_config = geta_config
        self.base_model = base_model
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if not _is_int(self.format_version) or self.format_version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"quantization_config.format_version: got {self.format_version!r}; this geta-hf "
                f"reads versions {list(READABLE_VERSIONS)} (upgrade geta-hf to load newer "
                "checkpoints)")
        if not isinstance(self.layers, dict):
            raise CheckpointError("quantization_config.layers: expected a dict {module name: {...}}"
                                  f", got {self.layers!r}")
        for name, spec in self.layers.items():
            _check_layer(name, spec)
        arch = self.architecture
        _check_keys("quantization_config.architecture", arch, _ARCH_KEYS)
        for key in sorted(_ARCH_KEYS):
            if not isinstance(arch[key], dict):
                raise CheckpointError(f"quantization_config.architecture.{key}: expected a dict, "
                                      f"got {type(arch[key]).__name__}")
        if self.geta_config is not None and not isinstance(self.geta_config, dict):
            raise CheckpointError(f"quantization_config.geta_config: got {self.geta_config!r}; "
                                  "allowed: null or a dict of GETAConfig fields")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise CheckpointError(f"quantization_config.base_model: got {self.base_model!r}; "
                                  "allowed: null or a model id")
        for pname, shape in arch.get("param_shapes", {}).items():
            if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
                raise CheckpointError(f"quantization_config.architecture.param_shapes[{pname!r}]: "
                                      f"got {shape!r}; allowed: a list of non-negative integers")
        for mname, attrs in arch.get("module_attrs", {}).items():
            _check_module_attrs(mname, attrs)
        for fname, fam in arch.get("families", {}).items():
            if not isinstance(fam, dict) or not isinstance(fam.get("kept"), list) or \
                    not _is_int(fam.get("units")) or \
                    not all(_is_int(u) and 0 <= u < fam["units"] for u in fam["kept"]):
                raise CheckpointError(f"quantization_config.architecture.families[{fname!r}]: "
                                      "expected {kind, layer, units, kept: [unit ids < units]}")

    def to_dict(self) -> Dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "layers": copy.deepcopy(self.layers), "architecture": copy.deepcopy(self.architecture),
                "geta_config": copy.deepcopy(self.geta_config), "base_model": self.base_model}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_keys(where: str, value: Any, keys, what: str = "a dict") -> None:
    """``value`` must be a dict with exactly the fields ``keys`` (errors name ``where``)."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: got {value!r}; allowed: {what} with keys {sorted(keys)}")
    extra, missing = set(value) - keys, keys - set(value)
    if extra or missing:
        raise CheckpointError(f"{where}: unknown {sorted(extra)} / missing {sorted(missing)} fields")


def _check_module_attrs(mname: str, attrs: Any) -> None:
    where = f"quantization_config.architecture.module_attrs[{mname!r}]"
    if not isinstance(attrs, dict):
        raise CheckpointError(f"{where}: expected a dict of attribute values")
    # the only attributes a checkpoint may set: the registered head counts and head-derived
    # sizes that `compress_model` changes, directly or on the module's own ``config``
    allowed = shape_attribute_names()
    for key, value in attrs.items():
        attr = key[len("config."):] if key.startswith("config.") else key
        if attr not in allowed:
            raise CheckpointError(f"{where}[{key!r}]: not a shape attribute geta-hf sets; allowed: "
                                  f"{sorted(allowed)} (or 'config.<name>' of one)")
        if not _is_int(value) or value < 1:
            raise CheckpointError(f"{where}[{key!r}]: got {value!r}; allowed: an integer >= 1")


def _check_layer(name: str, spec: Any) -> None:
    where = f"quantization_config.layers[{name!r}]"
    _check_keys(where, spec, _LAYER_KEYS)
    for k in ("in_features", "out_features"):
        if not _is_int(spec[k]) or spec[k] < 1:
            raise CheckpointError(f"{where}.{k}: got {spec[k]!r}; allowed: an integer >= 1")
    if not _is_int(spec["weight_bits"]) or not 2 <= spec["weight_bits"] <= 16:
        raise CheckpointError(f"{where}.weight_bits: got {spec['weight_bits']!r}; allowed: 2..16")
    for k in ("weight_scale", "weight_clip", "weight_exponent"):
        if not _is_pos(spec[k]):
            raise CheckpointError(f"{where}.{k}: got {spec[k]!r}; allowed: a finite number > 0")
    for k in ("bias", "nonlinear"):
        if not isinstance(spec[k], bool):
            raise CheckpointError(f"{where}.{k}: got {spec[k]!r}; allowed: true or false")
    act = spec["act"]
    if act is not None:
        _check_keys(f"{where}.act", act, _ACT_KEYS, what="null or a dict")
        if not _is_int(act["bits"]) or not 2 <= act["bits"] <= 16:
            raise CheckpointError(f"{where}.act.bits: got {act['bits']!r}; allowed: 2..16")
        for k in ("d", "q_m"):
            if not _is_pos(act[k]):
                raise CheckpointError(f"{where}.act.{k}: got {act[k]!r}; allowed: a finite number > 0")
        if act["t"] is not None and not _is_pos(act["t"]):
            raise CheckpointError(f"{where}.act.t: got {act['t']!r}; allowed: null (linear) or a "
                                  "finite number > 0")


# ---------------------------------------------------------------------------- model -> config
def quantization_config_from_model(model: nn.Module, geta_config: Optional[dict] = None,
                                   base_model: Optional[str] = None) -> GETAQuantizationConfig:
    """Describe a compressed model (see :func:`geta_hf.compress_model`) as a quantization config."""
    arch = CompressedArch.of(model)
    if arch is None:
        raise ValueError("the model is not compressed: call geta_hf.compress_model(model, qadg) first")
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, PackedQuantLinear):
            continue
        act = None
        aq = m.act_quantizer
        if aq is not None and aq.calibrated:
            act = {"bits": int(round(float(aq.bits()))), "d": float(aq.d.detach()),
                   "q_m": float(aq.q_m.detach().abs()),
                   "t": None if aq.t is None else float(aq.t.detach())}
        layers[name] = {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "weight_bits": m.weight_bits,
            "weight_scale": float(m.weight_scale), "weight_clip": float(m.weight_clip),
            "weight_exponent": float(m.weight_exponent), "nonlinear": m.nonlinear, "act": act,
        }
    old = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(old, GETAQuantizationConfig):
        geta_config = geta_config if geta_config is not None else old.geta_config
        base_model = base_model if base_model is not None else old.base_model
    return GETAQuantizationConfig(
        layers=layers,
        architecture={"families": arch.families, "param_shapes": arch.param_shapes,
                      "module_attrs": arch.module_attrs},
        geta_config=geta_config, base_model=base_model)


# ---------------------------------------------------------------------------- skeleton surgery
def _packed_skeleton(spec: Mapping[str, Any], dtype, device) -> PackedQuantLinear:
    act = None
    if spec["act"] is not None:
        act = GETAQuantizer(nonlinear=spec["act"]["t"] is not None, device=device)
    layer = PackedQuantLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                              weight_bits=spec["weight_bits"], act_quantizer=act,
                              nonlinear=spec["nonlinear"], dtype=dtype, device=device)
    return layer


def build_compressed_skeleton(model: nn.Module, qcfg: GETAQuantizationConfig) -> nn.Module:
    """Resize and replace ``model``'s modules (usually on the meta device) per ``qcfg``."""
    try:
        arch = CompressedArch.from_dict(qcfg.architecture)
        resize_parameters(model, arch.param_shapes)
    except ValueError as e:
        raise CheckpointError(f"quantization_config.architecture.{e}") from e
    try:
        apply_module_attrs(model, arch.module_attrs)
    except AttributeError as e:
        raise CheckpointError(f"quantization_config.architecture.module_attrs: {e}") from e
    mods = dict(model.named_modules())
    for name, spec in qcfg.layers.items():
        old = mods.get(name)
        if old is None:
            raise CheckpointError(f"quantization_config.layers: {type(model).__name__} has no module "
                                  f"{name!r}")
        w = getattr(old, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
        set_submodule(model, name, _packed_skeleton(spec, dtype, device))
    arch.packed_layers = {n: s["weight_bits"] for n, s in qcfg.layers.items()}
    setattr(model, ARCH_ATTR, arch.to_dict())
    return model


def check_loaded_model(model: nn.Module, qcfg: GETAQuantizationConfig) -> None:
    """After loading: every tensor agrees with the config (shapes, scales, bits)."""
    mods = dict(model.named_modules())
    for name, spec in qcfg.layers.items():
        m = mods[name]
        for key in ("weight_scale", "weight_clip", "weight_exponent"):
            v = float(getattr(m, key))
            if not math.isclose(v, spec[key], rel_tol=1e-6, abs_tol=0.0):
                raise CheckpointError(f"quantization_config.layers[{name!r}].{key} = {spec[key]!r} "
                                      f"but the checkpoint tensor holds {v!r}")
        if spec["act"] is not None:
            aq = m.act_quantizer
            aq.calibrated = True
            for key in ("d", "q_m"):
                v = float(getattr(aq, key).detach().abs())
                if not math.isclose(v, spec["act"][key], rel_tol=1e-6):
                    raise CheckpointError(f"quantization_config.layers[{name!r}].act.{key} = "
                                          f"{spec['act'][key]!r} but the checkpoint holds {v!r}")
    params = dict(model.named_parameters())
    for pname, shape in qcfg.architecture.get("param_shapes", {}).items():
        p = params.get(pname)
        if p is not None and list(p.shape) != list(shape):
            raise CheckpointError(f"quantization_config.architecture.param_shapes[{pname!r}] = "
                                  f"{shape} but the loaded parameter has shape {list(p.shape)}")


class GETAHfQuantizer(HfQuantizer):
    """Rebuilds a GETA-compressed model inside ``from_pretrained`` (see module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = GETAQuantizationConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
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
        from .integrity import RECORD_KEY, checkpoint_record

        # refresh the config from the live model, so learned input ranges saved after further
        # fine-tuning match their tensors; the tensor file records both (integrity.py)
        fresh = quantization_config_from_model(model)
        self.quantization_config = fresh
        model.config.quantization_config = fresh
        return None, {RECORD_KEY: checkpoint_record(model, fresh)}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
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
