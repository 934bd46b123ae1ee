"""QADG: the pruning search space, derived from the exported graph of a model."""

from .capture import GraphCaptureError, capture_graph
from .propagate import OP_RULES, register_op
from .qadg import QADG, Family, Member, build_qadg

__all__ = ["QADG", "Family", "Member", "build_qadg", "capture_graph", "GraphCaptureError",
           "register_op", "OP_RULES"]
