"""The ``geta`` quantization config: what a compressed checkpoint's ``quantization_config`` holds.

Per quantized layer its shape, weight bits, scale/clip/exponent and input quantizer; and the
pruned architecture (units kept per family, every resized parameter's shape, changed module
attributes; :class:`geta_hf.surgery.CompressedArch`). Validated on construction and on load:
a malformed field raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..compress.packed import PackedQuantLinear
from ..registry import shape_attribute_names
from ..surgery import CompressedArch

__all__ = ["GETAQuantizationConfig", "CheckpointError", "FORMAT_VERSION", "READABLE_VERSIONS",
           "QUANT_METHOD", "QUANT_METHODS", "quantization_config_from_model"]

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
        """Check every field; :class:`CheckpointError` names the first malformed one."""
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

    @property
    def compressed_arch(self) -> CompressedArch:
        """The validated ``architecture`` as a :class:`geta_hf.surgery.CompressedArch` record."""
        return CompressedArch.from_dict(self.architecture)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict written to ``config.json`` (deep copies)."""
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
