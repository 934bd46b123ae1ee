"""Model surgery shared by quantizer insertion, compression, checkpoint loading and export.

One place for the operations that change a model's structure: replacing a submodule, resizing a
parameter in every module that holds it (tied weights included), keeping modules' size and head
attributes in step with their weights, and the record of a compressed model's architecture
(:class:`CompressedArch`, stored on the model as ``model.geta_arch``) that
:func:`geta_hf.compress_model` writes and checkpoint loading reads back (method §4.1).
Every setter can go through a :class:`Journal`, so a failed operation can be undone.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .registry import linear_type_of

__all__ = ["ARCH_ATTR", "CompressedArch", "Journal", "set_submodule", "param_owners",
           "sync_shape_attrs", "apply_module_attrs", "resize_parameters"]

#: attribute of a compressed model holding its architecture record (``CompressedArch.to_dict()``)
ARCH_ATTR = "geta_arch"

_ABSENT = object()


class Journal:
    """Attribute assignments that can be undone, newest first."""

    def __init__(self) -> None:
        self._undo: List[Tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering the previous value (or its absence)."""
        self._undo.append((obj, name, getattr(obj, name, _ABSENT)))
        setattr(obj, name, value)

    def rollback(self) -> None:
        """Undo every assignment, newest first."""
        for obj, name, old in reversed(self._undo):
            if old is _ABSENT:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.clear()


def _setter(journal: Optional[Journal]):
    return journal.set if journal is not None else setattr


def set_submodule(model: nn.Module, name: str, new: nn.Module,
                  journal: Optional[Journal] = None) -> None:
    """Replace the submodule ``name`` (dotted path) of ``model`` with ``new``."""
    parent, _, leaf = name.rpartition(".")
    _setter(journal)(model.get_submodule(parent) if parent else model, leaf, new)


def param_owners(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """``id(parameter)`` -> every ``(module, attribute)`` holding it (tied weights included)."""
    out: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
    for _, mod in model.named_modules(remove_duplicate=False):
        for leaf, p in mod.named_parameters(recurse=False):
            if (mod, leaf) not in out[id(p)]:
                out[id(p)].append((mod, leaf))
    return out


def sync_shape_attrs(mod: nn.Module, journal: Optional[Journal] = None) -> None:
    """Set a resized layer's size attributes from its weight (a registered linear type's
    in/out attributes, ``nn.Embedding``'s sizes)."""
    w = getattr(mod, "weight", None)
    kind = linear_type_of(mod)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return
    if kind is not None:
        n_in, n_out = kind.io(w.shape)
        pairs = ((kind.out_attr, n_out), (kind.in_attr, n_in))
    elif isinstance(mod, nn.Embedding):
        pairs = (("num_embeddings", w.shape[0]), ("embedding_dim", w.shape[1]))
    else:
        return
    put = _setter(journal)
    for name, value in pairs:
        put(mod, name, int(value))


def apply_module_attrs(model: nn.Module, module_attrs: Mapping[str, Mapping[str, Any]]) -> None:
    """Re-apply recorded attribute changes (``{module: {attr or "config.attr": value}}``).

    A ``config.<attr>`` change goes into a private copy of the module's config, so a config
    object shared by several layers is never changed for all of them."""
    for mname, attrs in module_attrs.items():
        mod = model.get_submodule(mname)
        for key, value in attrs.items():
            if key.startswith("config."):
                own_config(mod)
                setattr(mod.config, key[len("config."):], value)
            else:
                setattr(mod, key, value)


def own_config(mod: nn.Module, journal: Optional[Journal] = None) -> None:
    """Give ``mod`` its own shallow copy of its ``config`` (once)."""
    if not getattr(mod, "_geta_own_config", False):
        put = _setter(journal)
        put(mod, "config", copy.copy(mod.config))
        put(mod, "_geta_own_config", True)


def resize_parameters(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Give every parameter named in ``shapes`` that shape (new, uninitialised storage on the
    same device and dtype) in every module holding it; names ``model`` lacks are skipped.

    Raises ``ValueError`` naming the parameter when the rank differs."""
    owners = param_owners(model)
    params = dict(model.named_parameters())
    for name, shape in shapes.items():
        p = params.get(name)
        if p is None or list(p.shape) == list(shape):
            continue
        if len(shape) != p.dim():
            raise ValueError(f"param_shapes[{name!r}]: {list(shape)} does not match the "
                             f"parameter's rank ({p.dim()})")
        new = nn.Parameter(torch.empty(list(shape), dtype=p.dtype, device=p.device),
                           requires_grad=p.requires_grad)
        for mod, leaf in owners[id(p)]:
            setattr(mod, leaf, new)
            sync_shape_attrs(mod)


@dataclass
class CompressedArch:
    """What compression changed: enough to rebuild the compressed model from the dense one.

    ``families``: ``{family: {"kind", "layer", "units", "kept": [unit indices]}}``;
    ``param_shapes``: ``{parameter: shape}`` after compression; ``module_attrs``: the changed
    head/size attributes ``{module: {attr or "config.attr": value}}``; ``packed_layers``:
    ``{layer: weight bits}`` of the bit-packed layers.
    """

    families: Dict[str, Any] = field(default_factory=dict)
    param_shapes: Dict[str, List[int]] = field(default_factory=dict)
    module_attrs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    packed_layers: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (``compressed: True`` marks a compressed model)."""
        return {"compressed": True, "families": dict(self.families),
                "param_shapes": {k: list(v) for k, v in self.param_shapes.items()},
                "module_attrs": {k: dict(v) for k, v in self.module_attrs.items()},
                "packed_layers": dict(self.packed_layers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressedArch":
        """Inverse of :meth:`to_dict`; missing parts are empty. ``ValueError`` names a part
        that is not a dict."""
        parts = {}
        for key in ("families", "param_shapes", "module_attrs", "packed_layers"):
            value = data.get(key, {}) if isinstance(data, Mapping) else None
            if not isinstance(value, Mapping):
                raise ValueError(f"{key}: got {type(value).__name__}; allowed: a dict")
            parts[key] = dict(value)
        return cls(**parts)

    @classmethod
    def of(cls, model: nn.Module) -> Optional["CompressedArch"]:
        """The record of a compressed ``model``, or ``None`` if it is not compressed."""
        data = getattr(model, ARCH_ATTR, None)
        if not isinstance(data, Mapping) or not data.get("compressed"):
            return None
        return cls.from_dict(data)
