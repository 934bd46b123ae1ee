"""Shared vocabulary of the graph analysis: ATen op sets, node shapes and module names."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.fx as fx

aten = torch.ops.aten

Dims = List[List[int]]


def _ops(*names: str) -> set:
    """The aten op packets among ``names`` that exist in this torch build."""
    return {getattr(aten, n) for n in names if hasattr(aten, n)}

# ops that return a tensor with exactly the input's dimensions (values may differ)
_SAME = _ops("clone", "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "dropout",
    "feature_dropout", "alpha_dropout", "lift_fresh_copy", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "fill_", "zero_", "bernoulli", "bernoulli_", "relu_",
    "requires_grad_", "resolve_conj", "resolve_neg")
# element-wise ops that torch does not tag as pointwise
_POINTWISE_EXTRA = _ops("__and__", "__or__", "__xor__", "__invert__", "copy_", "masked_fill",
    "masked_fill_", "where", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "bitwise_or", "bitwise_not", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isneginf",
    "isposinf", "isfinite", "gelu", "silu", "relu", "hardtanh", "mish", "softplus")
_RESHAPE = _ops("view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "flatten", "unflatten",
    "view_as", "reshape_as", "squeeze_", "unsqueeze_")
# constant-valued creation: their spaces can be resized freely (the code recreates them)
_CREATE_FREE = _ops("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full",
    "new_empty", "empty_strided", "scalar_tensor")
# creation whose values depend on the index: not removable
_CREATE_PINNED = _ops("arange", "rand", "randn", "randint", "linspace", "eye", "tensor",
    "randperm")
_REDUCE = _ops("sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
    "prod", "linalg_vector_norm", "norm", "logsumexp", "argmax", "argmin", "all", "any",
    "count_nonzero")
_ALONG_DIM = _ops("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod",
    "logcumsumexp", "_safe_softmax")
_IGNORE = _ops("_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "_assert_scalar",
    "_assert_async", "sym_constrain_range_for_size")
#: ops that pass a parameter through unchanged in layout (used to find contracted weight dims)
_TRANSPARENT = _ops("to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as",
    "lift_fresh_copy")


def _packet(target):
    return getattr(target, "overloadpacket", None)


def _shape(node) -> Optional[Tuple[int, ...]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _module_of(node: fx.Node) -> str:
    """``'name (Class)'`` of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "the top-level module"
    fqn, cls = list(stack.values())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    cls = cls.rsplit(".", 1)[-1]
    return f"{fqn} ({cls})" if fqn else f"the top-level module ({cls})"


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d
