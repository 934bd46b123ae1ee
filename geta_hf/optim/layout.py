"""Index tables QASSO builds once (or once per pruning period) so that ``step()`` is tensor work.

* :class:`QuantTable` - every weight and input quantizer of the model (weights first), with
  batched access to their scalars ``d``, ``q_m``, ``t`` and the bit-range arithmetic.
* :class:`MemberRef` - one group member (a parameter slice owned by the units of a family) with
  its parameter handle, unit index tensor and the weight quantizer that quantizes it, if any.
* :class:`ActiveLayout` - the rows of this period's redundant units, laid out as one flat vector
  (quantized-weight slices first) with per-element segment ids, plus gather/scatter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..graph.units import unit_slices
from ..quant.functional import EPS
from ..quant.layers import quant_layers

__all__ = ["QuantTable", "MemberRef", "ActiveLayout", "denominators", "trained_quant_layers"]

logger = logging.getLogger(__name__)


def trained_quant_layers(model: nn.Module, compress_frozen: bool = False
                         ) -> List[Tuple[str, nn.Module]]:
    """The quantized layers whose quantizer scalars QASSO trains (the order of its QuantTable).

    Every quantized layer with ``compress_frozen``; otherwise only those whose weight has
    ``requires_grad=True``: a layer the user froze keeps its quantizer as it is (logged).
    """
    layers = quant_layers(model)
    if compress_frozen:
        return layers
    kept = [(n, m) for n, m in layers if m.weight.requires_grad]
    if len(kept) < len(layers):
        frozen = [n for n, m in layers if not m.weight.requires_grad]
        logger.info("QASSO: not training the quantizers of %d layer(s) with a frozen weight "
                    "(requires_grad=False): %s%s; set GETAConfig(compress_frozen=True) to train "
                    "them", len(frozen), ", ".join(frozen[:4]), " ..." if len(frozen) > 4 else "")
    return kept


def denominators(bits: Sequence[float], device=None) -> torch.Tensor:
    """``2^(b-1) - 1`` per entry: ``d(b, q_m, t) = |q_m|^t / (2^(b-1) - 1)`` (method §1.2)."""
    b = torch.as_tensor(list(bits), dtype=torch.float32, device=device)
    return torch.exp2(b - 1.0) - 1.0


class QuantTable:
    """Handles on all quantizers: ``n_weight`` weight quantizers, then ``n_act`` input quantizers.

    ``stacked()`` returns ``(d, q_m, t)`` as 1-D tensors (``t = 1`` for linear quantizers) and
    ``write_d`` stores a 1-D tensor back into the ``d`` parameters with one ``_foreach_copy_``.
    """

    def __init__(self, layers: Sequence[Tuple[str, nn.Module]]) -> None:
        self.layer_names: List[str] = []
        self.kinds: List[str] = []
        self.weight_numel: List[int] = []
        #: the weight tensor of each weight quantizer (same order)
        self.weights: List[torch.Tensor] = []
        quantizers = []
        for name, layer in layers:
            quantizers.append(layer.weight_quantizer)
            self.weights.append(layer.weight)
            self.layer_names.append(name)
            self.kinds.append("weight")
            self.weight_numel.append(layer.weight.numel())
        self.n_weight = len(quantizers)
        for name, layer in layers:
            if layer.act_quantizer is not None:
                quantizers.append(layer.act_quantizer)
                self.layer_names.append(name)
                self.kinds.append("act")
        self.n_act = len(quantizers) - self.n_weight
        self.quantizers = quantizers
        self.d = [q.d for q in quantizers]
        self.q_m = [q.q_m for q in quantizers]
        self.nonlinear = any(q.t is not None for q in quantizers)
        one = None
        t_list = []
        for q in quantizers:
            if q.t is not None:
                t_list.append(q.t)
            else:
                if one is None:
                    one = torch.ones((), dtype=q.d.dtype, device=q.d.device)
                t_list.append(one)
        self.t = t_list
        self.device = quantizers[0].d.device if quantizers else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.quantizers)

    @property
    def params(self) -> List[torch.Tensor]:
        """Every quantizer scalar parameter (``d``, ``q_m``, ``t``)."""
        out = []
        for q in self.quantizers:
            out.extend(p for p in q.parameters())
        return out

    def stacked(self):
        """``(d, q_m, t)`` of all quantizers as detached 1-D tensors (``t`` None if linear)."""
        d = torch.stack([p.detach() for p in self.d])
        q_m = torch.stack([p.detach() for p in self.q_m])
        t = torch.stack([p.detach() for p in self.t]) if self.nonlinear else None
        return d, q_m, t

    @staticmethod
    def top(q_m: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
        """``|q_m|^t`` floored like :func:`geta_hf.quant.d_for_bits`."""
        a = q_m.abs()
        if t is not None:
            a = a.pow(t)
        return a.clamp_min(EPS)

    def write_d(self, values: torch.Tensor) -> None:
        """Write one ``d`` per quantizer from a 1-D tensor."""
        with torch.no_grad():
            torch._foreach_copy_(self.d, list(values.to(self.d[0].dtype).unbind(0)))

    def bits(self) -> torch.Tensor:
        """Real-valued bit widths ``b(d, q_m, t)`` of all quantizers (method §1.2)."""
        d, q_m, t = self.stacked()
        return torch.log2(self.top(q_m, t) / d.clamp_min(EPS) + 1.0) + 1.0

    def rounded_bits(self):
        """``(weight_bits, act_bits, avg_weight_bits, avg_act_bits)``: ``{layer: rounded bits}``
        per kind, the weight bits averaged by weight size, the input bits by layer (None when
        there is none)."""
        wb, ab = {}, {}
        avg_w = avg_a = None
        if not len(self):
            return wb, ab, avg_w, avg_a
        rounded = [int(round(b)) if math.isfinite(b) else None for b in self.bits().cpu().tolist()]
        for i in range(self.n_weight):
            wb[self.layer_names[i]] = rounded[i]
        for i in range(self.n_weight, len(self)):
            ab[self.layer_names[i]] = rounded[i]
        pairs = [(r, n) for r, n in zip(rounded[:self.n_weight], self.weight_numel) if r is not None]
        if pairs:
            avg_w = sum(r * n for r, n in pairs) / sum(n for _, n in pairs)
        acts = [r for r in rounded[self.n_weight:] if r is not None]
        if acts:
            avg_a = sum(acts) / len(acts)
        return wb, ab, avg_w, avg_a


@dataclass
class MemberRef:
    """One group member, resolved against the model once."""

    family: int  # index into QADG.families
    param: torch.Tensor
    dim: int
    index: torch.Tensor  # (num_units, width) long, on the parameter's device
    qidx: int  # index of the weight quantizer of this parameter in the QuantTable, or -1

    def __post_init__(self) -> None:
        n = self.index.numel()
        #: unit u owns positions u*width .. (u+1)*width - 1 of the whole dim (reshape, no gather)
        self.contiguous = n == self.param.shape[self.dim] and bool(
            torch.equal(self.index.reshape(-1).cpu(), torch.arange(n)))

    def rows(self, local_units: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` owned by the given units (1-D long tensor)."""
        return self.index.index_select(0, local_units).reshape(-1)

    def unit_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(num_units, -1)`` entries of ``t`` (shaped like the parameter) owned by each unit."""
        return unit_slices(t, self.dim, self.index, self.contiguous)


class _Slot:
    __slots__ = ("param", "dim", "rows", "shape", "numel", "family", "qidx")

    def __init__(self, param, dim, rows, family, qidx):
        self.param = param
        self.dim = dim
        self.rows = rows
        shape = list(param.shape)
        shape[dim] = rows.numel()
        self.shape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        self.numel = n
        self.family = family
        self.qidx = qidx


class ActiveLayout:
    """The active redundant rows of one pruning period, as one slot per group member.

    A slot holds one member's slices of the active units of its family, read and written with
    ``index_select`` / ``index_copy_`` along the member's dim. Slots are ordered quantized weights
    first (``n_quant_slots`` of them). ``families`` lists the active families (global indices);
    ``slot_family`` maps each slot to its position in that list and ``slot_q`` each quantized slot
    to its weight quantizer. Per-step math runs per slot on contiguous 1-D views, with 0-dim
    per-slot scalars (no per-element index tensors).
    """

    def __init__(self, members: Sequence[MemberRef], active: Dict[int, torch.Tensor]) -> None:
        fam_pos = {f: i for i, f in enumerate(sorted(active))}
        self.families = sorted(active)
        slots: List[_Slot] = []
        for m in members:
            if m.family in active:
                slots.append(_Slot(m.param, m.dim, m.rows(active[m.family]), fam_pos[m.family],
                                   m.qidx))
        slots.sort(key=lambda s: 0 if s.qidx >= 0 else 1)  # stable: quantized weights first
        self.slots = slots
        self.n_quant_slots = sum(1 for s in slots if s.qidx >= 0)
        dev = slots[0].param.device if slots else torch.device("cpu")
        self.numel = sum(s.numel for s in slots)
        self.slot_family = torch.tensor([s.family for s in slots], dtype=torch.long, device=dev)
        self.slot_q = torch.tensor([s.qidx for s in slots[: self.n_quant_slots]], dtype=torch.long,
                                   device=dev)

    @property
    def empty(self) -> bool:
        """Whether the layout has no rows."""
        return not self.slots

    def gather(self, source: Optional[Dict[int, torch.Tensor]] = None) -> List[torch.Tensor]:
        """Each slot's current values as a flat float32 tensor; ``source`` maps ``id(param)`` to
        a tensor to read instead of the parameter (e.g. a snapshot taken before the dense step)."""
        out = []
        for s in self.slots:
            t = s.param if source is None else source[id(s.param)]
            out.append(t.detach().index_select(s.dim, s.rows).reshape(-1).float())
        return out

    def scatter(self, values: Sequence[torch.Tensor]) -> None:
        """Write per-slot flat tensors (as returned by :meth:`gather`) back into the parameters."""
        for s, v in zip(self.slots, values):
            s.param.data.index_copy_(s.dim, s.rows, v.view(s.shape).to(s.param.dtype))
