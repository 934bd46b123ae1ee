"""Strict validation of a GETA-compressed checkpoint, before anything is built from it.

Every tensor file written for a compressed model carries, in its safetensors metadata under
``"geta"``, an *integrity record*: a copy of the ``layers`` and ``architecture`` of the
``quantization_config`` it was saved with, and per tensor its dtype, shape and SHA-256.
:func:`validate_checkpoint` checks, reading the tensor files only (the model skeleton is not
touched):

1. names: every layer / attribute map / parameter shape in the config names a module or
   parameter of the model (and of the layer entries: no ``bias`` of a layer without one),
   attribute maps change only allow-listed integer shape attributes;
2. the record: the config's ``layers`` and ``architecture`` equal the ones saved;
3. structure: exactly the tensors the config implies are present (none missing, none extra),
   each with its exact shape and a dtype of the right kind, and the recorded dtype and shape;
4. values: every quantizer scalar is finite, positive and equal to its config field, every
   packed code lies in the symmetric range of its layer's bit width, and every tensor's bytes
   hash to the recorded digest.

Errors are :class:`~geta_hf.hf.quantizer.CheckpointError` naming the layer, field or tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from ..compress.bitpack import find_code, packed_nbytes
from ..registry import linear_type_of
from .quantizer import CheckpointError, GETAQuantizationConfig

__all__ = ["RECORD_KEY", "checkpoint_record", "validate_checkpoint"]

logger = logging.getLogger(__name__)

#: safetensors metadata key of the integrity record
RECORD_KEY = "geta"

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_WEIGHT_SCALARS = ("weight_scale", "weight_clip", "weight_exponent")
_ACT_SCALARS = ("d", "q_m", "t")


# ---------------------------------------------------------------------------- saving
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data).hexdigest()


def checkpoint_record(model: nn.Module, qcfg: GETAQuantizationConfig) -> str:
    """The integrity record (JSON) of ``model``'s state dict and its quantization config."""
    tensors = {name: [_dtype_name(t.dtype), list(t.shape), _digest(t)]
               for name, t in model.state_dict().items()}
    return json.dumps({"format_version": qcfg.format_version,
                       "quantization": {"layers": qcfg.layers, "architecture": qcfg.architecture},
                       "tensors": tensors}, sort_keys=True)


# ---------------------------------------------------------------------------- what the config implies
@dataclass
class _Want:
    shape: Tuple[int, ...]
    kind: str                # "codes", "scalar", "guard", "float" or "exact"
    field: str               # the config field (or model part) that implies the tensor
    dtype: Optional[torch.dtype] = None  # the model's dtype, for "exact" (integer) tensors


def _dense_io(mod: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of a dense linear layer (a registered linear type), else None."""
    w = getattr(mod, "weight", None)
    kind = linear_type_of(mod)
    if kind is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return kind.io(w.shape)


def _check_names(model: nn.Module, qcfg: GETAQuantizationConfig) -> None:
    """Every layer and attribute-map entry names a suitable module of ``model``."""
    mods = dict(model.named_modules())
    for name, spec in qcfg.layers.items():
        where = f"quantization_config.layers[{name!r}]"
        if name not in mods:
            raise CheckpointError(f"{where}: {type(model).__name__} has no module {name!r}")
        io = _dense_io(mods[name])
        if io is None:
            raise CheckpointError(f"{where}: {name!r} is a {type(mods[name]).__name__}, not a "
                                  "linear layer that GETA quantizes")
        for k, dense in zip(("in_features", "out_features"), io):
            if spec[k] > dense:
                raise CheckpointError(f"{where}.{k}: got {spec[k]}, more than the {dense} of the "
                                      "dense model (pruning only removes units)")
    for mname, attrs in qcfg.compressed_arch.module_attrs.items():
        where = f"quantization_config.architecture.module_attrs[{mname!r}]"
        mod = mods.get(mname)
        if mod is None:
            raise CheckpointError(f"{where}: {type(model).__name__} has no module {mname!r}")
        for key in attrs:
            owner, attr = (getattr(mod, "config", None), key[7:]) if key.startswith("config.") \
                else (mod, key)
            old = getattr(owner, attr, None)
            if not isinstance(old, int) or isinstance(old, bool):
                raise CheckpointError(f"{where}[{key!r}]: the {type(mod).__name__} has no integer "
                                      f"attribute {key!r} to set")


def expected_tensors(model: nn.Module, qcfg: GETAQuantizationConfig
                     ) -> Tuple[Dict[str, _Want], set, Dict[str, torch.Tensor]]:
    """The tensors a checkpoint of ``model`` (dense skeleton) under ``qcfg`` must hold, the
    names that may be absent (tied copies, keys the model never saves), and the dense tensors
    that are kept (not under a quantized layer)."""
    layers, shapes = qcfg.layers, qcfg.compressed_arch.param_shapes
    replaced = tuple(n + "." for n in layers)
    dense = {n: t for n, t in model.state_dict().items() if not n.startswith(replaced)}
    want: Dict[str, _Want] = {}
    for name, t in dense.items():
        shape = tuple(shapes.get(name, t.shape))
        field = (f"quantization_config.architecture.param_shapes[{name!r}]" if name in shapes
                 else f"the {type(model).__name__} config")
        want[name] = _Want(shape, "float" if t.is_floating_point() else "exact", field, t.dtype)
    for lname, spec in layers.items():
        where = f"quantization_config.layers[{lname!r}]"
        n_codes = spec["in_features"] * spec["out_features"]
        want[lname + ".weight_packed"] = _Want(
            (packed_nbytes(n_codes, spec["weight_bits"]),), "codes",
            f"{where} (in_features x out_features codes of weight_bits bits)")
        for k in _WEIGHT_SCALARS:
            want[f"{lname}.{k}"] = _Want((), "scalar", f"{where}.{k}")
        want[lname + ".weight"] = _Want((0,), "guard", where)
        if spec["bias"]:
            want[lname + ".bias"] = _Want((spec["out_features"],), "float", f"{where}.out_features")
        if spec["act"] is not None:
            for k in _ACT_SCALARS if spec["act"]["t"] is not None else _ACT_SCALARS[:2]:
                want[f"{lname}.act_quantizer.{k}"] = _Want((), "scalar", f"{where}.act.{k}")
    optional = set(getattr(model, "all_tied_weights_keys", None) or ())
    optional |= set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return want, optional, dense


def _disagreement(name: str, layers: Mapping[str, Any]) -> Optional[str]:
    """For a tensor under a quantized layer that its entry does not imply: the entry's field
    that says it does not exist (``bias`` false, ``act`` or ``act.t`` null)."""
    lname = next((n for n in layers if name.startswith(n + ".")), None)
    if lname is None:
        return None
    leaf, spec, where = name[len(lname) + 1:], layers[lname], f"quantization_config.layers[{lname!r}]"
    if leaf == "bias" and not spec["bias"]:
        return f"{where}.bias is false"
    if leaf.startswith("act_quantizer.") and spec["act"] is None:
        return f"{where}.act is null"
    if leaf == "act_quantizer.t" and spec["act"]["t"] is None:
        return f"{where}.act.t is null (a linear input quantizer)"
    return f"{where} implies no tensor {leaf!r} for a packed layer"


def _check_param_shapes(model, qcfg, want, dense, optional) -> None:
    """Every ``param_shapes`` entry names a parameter the config implies, with a shape that fits."""
    layers = qcfg.layers
    for pname, shape in qcfg.compressed_arch.param_shapes.items():
        where = f"quantization_config.architecture.param_shapes[{pname!r}]"
        w, old = want.get(pname), dense.get(pname)
        if w is None and pname not in optional:
            why = _disagreement(pname, layers)
            if why:
                raise CheckpointError(f"{why}, but {where} lists that parameter")
            owner, sep, _ = pname.rpartition(".act_quantizer.")
            if sep and owner not in layers:
                raise CheckpointError(f"quantization_config.layers has no entry for {owner!r}, but "
                                      f"{where} lists its input quantizer's parameter")
            raise CheckpointError(f"{where}: {type(model).__name__} (compressed) has no parameter "
                                  f"{pname!r}")
        if w is not None and old is None and tuple(shape) != w.shape:
            # a parameter of a replaced layer: its layer entry decides the shape
            raise CheckpointError(f"{where} = {shape} but {w.field} implies {list(w.shape)}")
        if old is not None and (len(shape) != old.dim() or
                                any(s > d for s, d in zip(shape, old.shape))):
            raise CheckpointError(f"{where} = {shape}: does not fit the dense parameter's shape "
                                  f"{list(old.shape)} (same rank, no larger dims)")


# ---------------------------------------------------------------------------- reading
def _renamer(model: nn.Module) -> Callable[[str], str]:
    """File key -> model key: transformers renames some keys on load (e.g. ViT's legacy
    ``encoder.layer.N``); weight *conversions* (tensors merged or split) are refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without key mappings
        return lambda key: key
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def rename(key: str) -> str:
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            raise CheckpointError(f"tensor {key!r}: transformers converts it on load ({pattern!r}); "
                                  "GETA checkpoints of such models are not supported")
        return new

    return rename


def _headers(files: Iterable[str], rename: Callable[[str], str]) -> Tuple[Dict[str, tuple], List]:
    """model key -> (file, file key, safetensors dtype, shape) over all files, and each file's
    metadata."""
    out: Dict[str, tuple] = {}
    metas = []
    for f in files:
        with safe_open(f, framework="pt") as h:
            metas.append((f, h.metadata() or {}))
            for k in h.keys():
                name = rename(k)
                if name in out:
                    raise CheckpointError(f"tensor {name!r} is stored twice ({out[name][1]!r} in "
                                          f"{os.path.basename(out[name][0])} and {k!r} in "
                                          f"{os.path.basename(f)})")
                sl = h.get_slice(k)
                out[name] = (f, k, sl.get_dtype(), tuple(sl.get_shape()))
    return out, metas


def _check_structure(have, want: Mapping[str, _Want], optional: set, layers) -> None:
    for name in sorted(have):
        if name not in want:
            why = _disagreement(name, layers)
            if why:
                raise CheckpointError(f"{why}, but {os.path.basename(have[name][0])} holds tensor "
                                      f"{name!r}")
            raise CheckpointError(f"{os.path.basename(have[name][0])} holds tensor {name!r}, which "
                                  "the quantization_config does not imply (no such parameter or "
                                  "buffer in the compressed model)")
    for name, w in want.items():
        if name not in have:
            if name in optional:
                continue
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint ({w.field} "
                                  "implies it)")
        f, _, st_dtype, shape = have[name]
        where = f"tensor {name!r} in {os.path.basename(f)}"
        if shape != w.shape:
            raise CheckpointError(f"{where}: shape {list(shape)}, but {w.field} implies "
                                  f"{list(w.shape)}")
        dtype = _ST_DTYPES.get(st_dtype)
        ok = {"codes": dtype == torch.uint8, "exact": dtype == w.dtype}.get(w.kind, dtype in _FLOATS)
        if not ok:
            allowed = {"codes": "uint8", "exact": _dtype_name(w.dtype) if w.dtype else "?"}.get(
                w.kind, "a float dtype")
            raise CheckpointError(f"{where}: dtype {st_dtype}; allowed: {allowed}")


def _load_record(metas, qcfg: GETAQuantizationConfig) -> Optional[dict]:
    raw = {m.get(RECORD_KEY) for _, m in metas}
    if raw == {None}:
        if qcfg.format_version == 1:
            logger.warning("geta_hf: this format_version 1 checkpoint carries no integrity record; "
                           "tensor values cannot be verified (re-save it to add one)")
            return None
        raise CheckpointError(
            f"{os.path.basename(metas[0][0])}: no GETA integrity record (safetensors metadata "
            f"{RECORD_KEY!r}); every format_version {qcfg.format_version} checkpoint has one. The "
            "file was rewritten by another tool: re-save it with geta_hf.save_compressed")
    if len(raw) != 1:
        raise CheckpointError(f"the tensor files carry different GETA integrity records "
                              f"(safetensors metadata {RECORD_KEY!r}); they come from different saves")
    try:
        record = json.loads(raw.pop())
        ok = (isinstance(record, dict) and isinstance(record.get("tensors"), dict)
              and isinstance(record.get("quantization"), dict))
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(f"{os.path.basename(metas[0][0])}: the GETA integrity record "
                              f"(safetensors metadata {RECORD_KEY!r}) is unreadable")
    return record


_NAMED = (".layers", ".param_shapes", ".module_attrs", ".families")  # dicts keyed by names


def _child(path: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier() and not path.endswith(_NAMED):
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def _first_difference(a: Any, b: Any, path: str) -> Optional[Tuple[str, Any, Any]]:
    """(path, a's value, b's value) of the first place where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return _child(path, k), a.get(k, "<absent>"), b.get(k, "<absent>")
            d = _first_difference(a[k], b[k], _child(path, k))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if (type(a) is type(b) and a == b) else (path, a, b)


def _check_config_record(record: dict, qcfg: GETAQuantizationConfig) -> None:
    """The config's layers and architecture are the ones the tensors were saved with."""
    saved = record["quantization"]
    diff = None
    for key in ("layers", "architecture"):  # the per-layer fields first
        diff = diff or _first_difference(getattr(qcfg, key), saved.get(key, "<absent>"),
                                         f"quantization_config.{key}")
    if diff:
        path, got, was = diff
        raise CheckpointError(f"{path} = {got!r} but the checkpoint was saved with "
                              f"{was!r} (its integrity record in the tensor file)")


def _check_tensor_record(record: dict, have) -> None:
    tensors = record["tensors"]
    for name, (f, _, st_dtype, shape) in have.items():
        rec = tensors.get(name)
        if not (isinstance(rec, list) and len(rec) == 3):
            raise CheckpointError(f"tensor {name!r} in {os.path.basename(f)} is not in the "
                                  "checkpoint's integrity record (added after the save)")
        dtype = _ST_DTYPES.get(st_dtype)
        if dtype is None or _dtype_name(dtype) != rec[0] or list(shape) != rec[1]:
            raise CheckpointError(f"tensor {name!r} in {os.path.basename(f)}: dtype {st_dtype} "
                                  f"shape {list(shape)}, but it was saved as {rec[0]} {rec[1]}")


# ---------------------------------------------------------------------------- values
def _scalar_spec(name: str, qcfg: GETAQuantizationConfig) -> Tuple[str, float, bool]:
    """(config field, expected value, compare |value|) of a quantizer scalar tensor."""
    lname, _, leaf = name.rpartition(".")
    if lname.endswith(".act_quantizer"):
        lname = lname[: -len(".act_quantizer")]
        return (f"quantization_config.layers[{lname!r}].act.{leaf}",
                qcfg.layers[lname]["act"][leaf], leaf == "q_m")
    return f"quantization_config.layers[{lname!r}].{leaf}", qcfg.layers[lname][leaf], False


def _check_scalar(name: str, t: torch.Tensor, qcfg: GETAQuantizationConfig) -> None:
    field, want, absolute = _scalar_spec(name, qcfg)
    v = float(t)
    v = abs(v) if absolute else v
    if not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"tensor {name!r} ({field}) holds {v!r}; allowed: a finite number > 0")
    if v != want:
        raise CheckpointError(f"{field} = {want!r} but the checkpoint tensor {name!r} holds {v!r}")


def _check_codes(lname: str, t: torch.Tensor, spec: Mapping[str, Any]) -> None:
    bits, n = spec["weight_bits"], spec["in_features"] * spec["out_features"]
    where = f"quantization_config.layers[{lname!r}].weight_bits = {bits}"
    low = -(1 << (bits - 1))  # raw value 0: outside the format's symmetric range
    first, count = find_code(t, bits, n, low)
    if count:
        raise CheckpointError(
            f"tensor {lname + '.weight_packed'!r}: code #{first} decodes to {low}, outside "
            f"the symmetric range +-{-low - 1} of {where} ({count} such code(s))")
    spare = n * bits % 8
    if spare and int(t[-1]) >> spare:
        raise CheckpointError(f"tensor {lname + '.weight_packed'!r}: the padding bits after the last "
                              f"code are not zero ({where}, {n} codes)")


def _check_values(have, want: Mapping[str, _Want], record: Optional[dict],
                  qcfg: GETAQuantizationConfig) -> None:
    by_file: Dict[str, List[Tuple[str, str]]] = {}
    for name, (f, key, _, _) in have.items():
        by_file.setdefault(f, []).append((name, key))
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as h:
            for name, key in names:
                t = h.get_tensor(key)
                kind = want[name].kind
                if kind == "scalar":
                    _check_scalar(name, t, qcfg)
                elif kind == "codes":
                    lname = name[: -len(".weight_packed")]
                    _check_codes(lname, t, qcfg.layers[lname])
                if record is not None and _digest(t) != record["tensors"][name][2]:
                    raise CheckpointError(f"tensor {name!r} in {os.path.basename(f)}: its values "
                                          "differ from the ones saved (SHA-256 mismatch with the "
                                          "integrity record); the file is corrupted")


# ---------------------------------------------------------------------------- entry point
def validate_checkpoint(model: nn.Module, qcfg: GETAQuantizationConfig,
                        files: List[str]) -> None:
    """Check the safetensors ``files`` of a compressed checkpoint against ``qcfg`` and the dense
    ``model`` skeleton (usually on the meta device; it is not modified). Raises
    :class:`CheckpointError` naming the layer, field or tensor at the first problem."""
    if not files:
        raise CheckpointError("a GETA checkpoint is loaded from its safetensors files; none were "
                              "given (from_pretrained(state_dict=...) is not supported)")
    _check_names(model, qcfg)
    want, optional, dense = expected_tensors(model, qcfg)
    _check_param_shapes(model, qcfg, want, dense, optional)
    have, metas = _headers(files, _renamer(model))
    record = _load_record(metas, qcfg)
    if record is not None:
        _check_config_record(record, qcfg)
    _check_structure(have, want, optional, qcfg.layers)
    if record is not None:
        _check_tensor_record(record, have)
    _check_values(have, want, record, qcfg)
