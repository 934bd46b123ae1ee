"""Module surgery of checkpoint loading: the dense skeleton becomes the compressed model.

:func:`build_compressed_skeleton` resizes parameters, re-applies head/size attributes and puts a
:class:`~geta_hf.compress.PackedQuantLinear` where each quantized layer was, per the
checkpoint's :class:`GETAQuantizationConfig` (before the weights load);
:func:`check_loaded_model` checks the loaded tensors against it (after).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from ..compress.packed import PackedQuantLinear
from ..quant.quantizer import GETAQuantizer
from ..surgery import ARCH_ATTR, apply_module_attrs, resize_parameters, set_submodule
from .quant_config import CheckpointError, GETAQuantizationConfig

__all__ = ["build_compressed_skeleton", "check_loaded_model"]


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
        arch = qcfg.compressed_arch
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
    for pname, shape in qcfg.compressed_arch.param_shapes.items():
        p = params.get(pname)
        if p is not None and list(p.shape) != list(shape):
            raise CheckpointError(f"quantization_config.architecture.param_shapes[{pname!r}] = "
                                  f"{shape} but the loaded parameter has shape {list(p.shape)}")
