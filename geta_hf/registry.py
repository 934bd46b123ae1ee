"""Registration points for model specifics: the one seam between the core and model libraries.

The core (``quant/``, ``graph/``, ``optim/``, ``compress/``) knows ``torch`` and ``nn.Linear``
only. What a model library adds goes through this module, and its integration registers it
(``geta_hf.hf`` registers transformers' GPT-2 ``Conv1D``, the head-count attribute names of its
attention modules and its KV-cache switch; see :mod:`geta_hf.hf.layers`):

* :func:`register_linear_type`: a float layer class that GETA quantizes, with its quantized
  form, the weight dimension that indexes output features and its size attributes;
* :func:`register_shape_attributes`: names of the integer attributes (of attention modules and
  of their ``config``) that hold head counts and head-derived sizes, which compression updates
  when heads are removed;
* :func:`register_forward_default`: keyword arguments that graph capture and ONNX export pass to
  a model whose ``forward`` accepts them, unless the caller set them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torch import nn

__all__ = ["LinearType", "register_linear_type", "linear_type_of", "float_linear_types",
           "SHAPE_KINDS", "register_shape_attributes", "shape_attributes", "shape_attribute_names",
           "register_forward_default", "forward_defaults"]


@dataclass(frozen=True)
class LinearType:
    """A float linear layer class that GETA quantizes.

    Attributes:
        float_cls: the float layer class.
        quant_cls: its fake-quantized form (a ``QuantLayerMixin`` subclass of ``float_cls`` with
            a ``from_float(layer, *, nonlinear, quantize_input)`` constructor).
        weight_out_dim: the weight dimension that indexes output features (0: ``(out, in)`` as
            ``nn.Linear``; 1: ``(in, out)``).
        in_attr, out_attr: the layer's integer attributes holding its input / output features,
            updated when compression resizes the weight.
    """

    float_cls: type
    quant_cls: type
    weight_out_dim: int
    in_attr: str
    out_attr: str

    def io(self, weight_shape) -> Tuple[int, int]:
        """``(in_features, out_features)`` of a weight of this layout."""
        out = int(weight_shape[self.weight_out_dim])
        return int(weight_shape[1 - self.weight_out_dim]), out


_LINEAR_TYPES: Dict[type, LinearType] = {}


def register_linear_type(float_cls: type, quant_cls: type, *, weight_out_dim: int, in_attr: str,
                         out_attr: str) -> LinearType:
    """Make ``float_cls`` quantizable (``prepare_model`` swaps it for ``quant_cls``)."""
    if weight_out_dim not in (0, 1):
        raise ValueError(f"register_linear_type({float_cls.__name__}): weight_out_dim must be 0 "
                         f"or 1, got {weight_out_dim!r}")
    if not (isinstance(quant_cls, type) and issubclass(quant_cls, float_cls)):
        raise TypeError(f"register_linear_type({float_cls.__name__}): the quantized class "
                        f"{getattr(quant_cls, '__name__', quant_cls)!r} must subclass it")
    entry = LinearType(float_cls, quant_cls, weight_out_dim, in_attr, out_attr)
    _LINEAR_TYPES[float_cls] = entry
    return entry


def float_linear_types() -> Tuple[type, ...]:
    """Every registered float linear class (``nn.Linear`` first)."""
    return tuple(_LINEAR_TYPES)


def linear_type_of(module: nn.Module) -> Optional[LinearType]:
    """The registration ``module`` is an instance of (its quantized form included), or None.

    The most derived registered class wins, so a registered subclass of ``nn.Linear`` is not
    taken for a plain ``nn.Linear``."""
    best = None
    for cls, entry in _LINEAR_TYPES.items():
        if isinstance(module, cls) and (best is None or issubclass(cls, best.float_cls)):
            best = entry
    return best


# ---------------------------------------------------------------------------- head attributes
#: kinds of head-related attributes: query heads, kv heads, head-derived sizes (heads x head
#: dim) and query heads per kv head
SHAPE_KINDS = ("query", "kv", "size", "groups")
_SHAPE_ATTRS: Dict[str, Tuple[str, ...]] = {kind: () for kind in SHAPE_KINDS}


def register_shape_attributes(*, query: Tuple[str, ...] = (), kv: Tuple[str, ...] = (),
                              size: Tuple[str, ...] = (), groups: Tuple[str, ...] = ()) -> None:
    """Add attribute names that hold head counts or head-derived sizes.

    After heads are removed, compression sets each such integer attribute of the attention
    modules (and of their ``config``) that holds the old value to the new one, then checks the
    result by running the model."""
    for kind, names in zip(SHAPE_KINDS, (query, kv, size, groups)):
        if isinstance(names, str):
            raise TypeError(f"register_shape_attributes({kind}=...): a tuple of names, not a str")
        _SHAPE_ATTRS[kind] += tuple(n for n in names if n not in _SHAPE_ATTRS[kind])


def shape_attributes() -> Dict[str, Tuple[str, ...]]:
    """Registered attribute names per kind of :data:`SHAPE_KINDS`."""
    return dict(_SHAPE_ATTRS)


def shape_attribute_names() -> frozenset:
    """Every registered head-count / head-size attribute name."""
    return frozenset(n for names in _SHAPE_ATTRS.values() for n in names)


# ---------------------------------------------------------------------------- forward defaults
_FORWARD_DEFAULTS: Dict[str, Any] = {}


def register_forward_default(name: str, value: Any) -> None:
    """Pass ``name=value`` to every traced ``forward`` that accepts ``name`` (unless given)."""
    _FORWARD_DEFAULTS[name] = value


def forward_defaults(model: nn.Module, given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The registered defaults ``model.forward`` accepts and ``given`` does not set."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    given = given or {}
    return {k: v for k, v in _FORWARD_DEFAULTS.items() if k in params and k not in given}
