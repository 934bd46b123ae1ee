"""`compress_model`: physically remove zeroed units and pack quantized weights.

Every unit whose group norm is exactly zero is removed (method §4.1, with sparsity read
from the weights, not from optimizer state): its producer rows, biases and head-carrying
parameters, and its consumers' input columns. Layers may end with different numbers of heads and
channels. Modules' size attributes are updated so the model runs unchanged, and the per-layer
architecture is recorded on the model (``model.geta_arch``) so that it can be saved and rebuilt.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..graph.qadg import QADG, Family
from ..quant.layers import QuantLayerMixin, quant_layers, uncalibrated_inputs
from ..quant.prepare import input_quantizers_disabled
from ..registry import shape_attributes
from .packed import pack_layer
from ..surgery import (ARCH_ATTR, CompressedArch, Journal, own_config, param_owners,
                      set_submodule, sync_shape_attrs)

__all__ = ["compress_model", "CompressionError"]

logger = logging.getLogger(__name__)




class CompressionError(RuntimeError):
    """The compressed model does not reproduce the zeroed model; the message says where."""


def _check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf in any parameter or floating buffer, naming the layer and tensor."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                 if b.is_floating_point()]
    for name, t in tensors:
        if t.numel() and not bool(torch.isfinite(t.detach()).all()):
            layer, _, leaf = name.rpartition(".")
            raise ValueError(f"compress_model: layer {layer or '<model>'!r} holds NaN or Inf in "
                             f"{leaf!r}; nothing was changed (allowed: finite weights and "
                             "quantizer scalars)")


def _check_calibrated(model: nn.Module) -> None:
    """Refuse input quantizers that were never calibrated: they compute nothing (the identity),
    and a packed layer carrying one would save a checkpoint that cannot be loaded."""
    bad = uncalibrated_inputs(quant_layers(model))
    if bad:
        raise ValueError(f"compress_model: the input quantizers of {len(bad)} layer(s) were never "
                         f"calibrated (first: {bad[0]!r}); nothing was changed. Calibrate them "
                         "with geta_hf.calibrate_activations(model, batches, cfg), or prepare the "
                         "model with GETAConfig(activation_bits=None) for weight-only "
                         "quantization")


def _kept_units(f: Family, norms: torch.Tensor) -> torch.Tensor:
    keep = torch.nonzero(norms != 0).reshape(-1)
    floor = max(1, f.min_units)
    if keep.numel() < floor:  # never remove the last unit(s): keep the lowest-index zero units
        zero = torch.nonzero(norms == 0).reshape(-1)
        keep = torch.sort(torch.cat([keep, zero[: floor - keep.numel()]])).values
        logger.warning("geta_hf: family %s has only %d non-zero unit(s); keeping %d", f.name,
                       int((norms != 0).sum()), floor)
    return keep


def _attention_modules(model: nn.Module, f: Family) -> List[Tuple[str, nn.Module]]:
    """The modules of the family's layer(s) and everything inside them."""
    pattern = f.layer
    out = []
    for n, m in model.named_modules():
        if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*"):
            out.append((n, m))
    return out


def _head_updates(f: Family, kept: int) -> Dict[int, int]:
    """old value -> new value for head counts and head-derived sizes of family ``f``."""
    rep, dh = max(1, f.heads_per_unit), max(1, f.head_dim)
    up: Dict[str, Dict[int, int]] = {"query": {}, "kv": {}, "size": {}, "groups": {}}
    n, k = f.num_units, kept
    if f.kind == "kv_groups":
        up["query"][n * rep] = k * rep
        up["kv"][n] = k
        up["size"][n * rep * dh] = k * rep * dh
        up["size"][n * dh] = k * dh
    else:
        up["query"][n] = k
        up["kv"][n] = k
        up["size"][n * dh] = k * dh
        # MQA: the family's n query heads all share one kv head that is not part of it, so
        # "query heads per kv head" is n and becomes k (under MHA it is 1 and stays 1)
        up["groups"][n] = k
    return up


def _update_attrs(obj: Any, updates: Dict[str, Dict[int, int]], changed: Dict[str, int],
                  journal: Optional[Journal] = None) -> None:
    for kind, names in shape_attributes().items():
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v in updates[kind]:
                if journal is not None:
                    journal.set(obj, name, updates[kind][v])
                else:
                    setattr(obj, name, updates[kind][v])
                changed[name] = updates[kind][v]


def _outputs(model: nn.Module, inputs: Mapping[str, Any]) -> List[torch.Tensor]:
    # Input quantizers are off for the comparison: removing zero columns changes the float
    # summation order of the matmuls, and an activation sitting on a rounding boundary may then
    # round to the neighbouring level -- a genuine but uninformative difference.
    with torch.no_grad(), input_quantizers_disabled(model):
        out = model(**inputs)
    if torch.is_tensor(out):
        return [out]
    vals = out.values() if hasattr(out, "values") else out
    return [v for v in vals if torch.is_tensor(v)]


@torch.no_grad()
def compress_model(model: nn.Module, qadg: QADG, *, pack: bool = True,
                   example_inputs: Optional[Mapping[str, Any]] = None, verify: bool = True,
                   atol: float = 1e-4) -> nn.Module:
    """Physically remove every unit whose group norm is exactly zero (in place; returns ``model``).

    Producer rows, biases and head-carrying parameters and the consumers' input columns are
    sliced; linear/embedding size attributes and attention head counts are updated (including a
    per-layer copy of ``config`` where the modeling code reads head counts from it); quantized
    layers become :class:`PackedQuantLinear` with integer codes when ``pack`` is True. The
    per-layer architecture is recorded in ``model.geta_arch``.

    With ``verify`` (default) and ``example_inputs`` (keyword inputs, e.g. the batch the QADG was
    built from) the model is run on them before and after, and :class:`CompressionError` is
    raised if any output moves by more than ``atol`` times ``max(1, max |output|)``; without
    ``example_inputs`` only the structure is checked (a warning says so). Input (activation)
    quantizers are switched off for this comparison: the matmuls sum fewer terms after
    compression, and an activation that sits exactly on a rounding boundary may round to the
    neighbouring level, which is not a compression error.

    All or nothing: every parameter and buffer is first checked to be finite, and (when packing)
    every input quantizer to be calibrated (``ValueError`` naming the layer); if anything fails
    afterwards (packing, the verification, an interrupt) every change is undone before the error
    propagates: the model holds its original modules, parameters (the same tensors, untouched)
    and attributes, is not marked compressed, and ``compress_model`` can be called again once
    the cause is fixed.
    """
    if CompressedArch.of(model) is not None:
        raise ValueError("compress_model: this model is already compressed")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 <= atol < math.inf:
        raise ValueError(f"compress_model: atol={atol!r} is invalid; allowed: a finite number >= 0")
    params = dict(model.named_parameters())
    missing = [p for f in qadg.families for p in f.params if p not in params]
    if missing:
        raise ValueError(f"compress_model: the QADG does not belong to this model (no parameter "
                         f"{missing[0]!r}); build it with geta_hf.build_qadg(model, inputs)")
    _check_finite(model)
    if pack:
        _check_calibrated(model)
    inputs = example_inputs
    if verify and inputs is None:
        logger.warning("compress_model: no example_inputs, so the compressed model's outputs are "
                       "not checked against the original's; pass example_inputs=<a batch>")
    was_training = model.training
    journal = Journal()
    try:
        model.eval()
        reference = _outputs(model, inputs) if (verify and inputs is not None) else None
        arch = _compress(model, qadg, params, pack, journal)
        if reference is not None:
            _verify(model, inputs, reference, atol)
        journal.set(model, ARCH_ATTR, arch)
    except BaseException:
        journal.rollback()
        raise
    finally:
        model.train(was_training)
    return model


def _compress(model: nn.Module, qadg: QADG, params: Dict[str, nn.Parameter], pack: bool,
              journal: Journal) -> Dict[str, Any]:
    """Slice the zeroed units out and pack the quantized layers, recording every change in
    ``journal``; returns the architecture record (``model.geta_arch``)."""
    norms = qadg.unit_norms(model)
    slices: Dict[str, List[Tuple[int, torch.Tensor]]] = defaultdict(list)
    families: Dict[str, Any] = {}
    module_attrs: Dict[str, Dict[str, Any]] = defaultdict(dict)
    for f in qadg.families:
        keep = _kept_units(f, norms[f.offset:f.offset + f.num_units])
        families[f.name] = {"kind": f.kind.value, "layer": f.layer, "units": f.num_units,
                            "kept": keep.tolist()}
        if keep.numel() == f.num_units:
            continue
        for m in f.members + f.consumers:
            pos = torch.sort(m.index[keep].reshape(-1)).values
            slices[m.param].append((m.dim, pos))
        if f.kind in ("heads", "kv_groups"):
            updates = _head_updates(f, int(keep.numel()))
            for mname, mod in _attention_modules(model, f):
                changed: Dict[str, int] = {}
                _update_attrs(mod, updates, changed, journal)
                module_attrs[mname].update(changed)
                cfg = getattr(mod, "config", None)
                if cfg is not None and hasattr(cfg, "to_dict"):
                    own_config(mod, journal)  # a config shared with other layers stays as is
                    changed = {}
                    _update_attrs(mod.config, updates, changed, journal)
                    module_attrs[mname].update({f"config.{k}": v for k, v in changed.items()})
    owners = param_owners(model)
    touched = []
    for name, cuts in slices.items():
        p = params[name]
        new = p.detach()
        for dim, pos in cuts:
            new = new.index_select(dim, pos.to(new.device))
        newp = nn.Parameter(new.contiguous(), requires_grad=p.requires_grad)
        for mod, leaf in owners[id(p)]:
            journal.set(mod, leaf, newp)
            if mod not in touched:
                touched.append(mod)
    for mod in touched:
        sync_shape_attrs(mod, journal)
    packed_layers = {}
    if pack:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuantLayerMixin):
                try:
                    new = pack_layer(mod)
                except ValueError as e:
                    raise ValueError(f"compress_model: layer {name!r}: {e}") from e
                set_submodule(model, name, new, journal)
                packed_layers[name] = new.weight_bits
    return CompressedArch(
        families=families,
        param_shapes={n: list(p.shape) for n, p in model.named_parameters()},
        module_attrs={k: v for k, v in module_attrs.items() if v},
        packed_layers=packed_layers).to_dict()


def _verify(model: nn.Module, inputs: Mapping[str, Any], reference: List[torch.Tensor],
            atol: float) -> None:
    """Raise :class:`CompressionError` unless the compressed model reproduces ``reference``."""
    try:
        after = _outputs(model, inputs)
    except Exception as e:
        raise CompressionError(
            f"compress_model: the compressed {type(model).__name__} no longer runs "
            f"({type(e).__name__}: {e}). Its forward probably reads a size attribute geta-hf "
            "did not update; mark that module unprunable (qadg.mark_unprunable). The model was "
            "left as it was before compress_model") from e
    if len(after) != len(reference):
        raise CompressionError(
            f"compress_model: the compressed {type(model).__name__} returns {len(after)} "
            f"output tensor(s), the zeroed model {len(reference)}; the model was left as it was "
            "before compress_model")
    for i, (a, b) in enumerate(zip(reference, after)):
        # tolerance relative to the output's scale (large logits carry larger float noise)
        tol = atol * max(1.0, float(a.float().abs().max())) if a.numel() else atol
        if a.shape != b.shape or (a.float() - b.float()).abs().max() > tol:
            diff = "shape " + str(tuple(b.shape)) if a.shape != b.shape else \
                f"max |diff| {(a.float() - b.float()).abs().max().item():.3g}"
            raise CompressionError(
                f"compress_model: output {i} of the compressed {type(model).__name__} differs "
                f"from the zeroed model ({diff} > {tol:.3g}); the model was left as it was "
                "before compress_model")
