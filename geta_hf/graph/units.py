"""The units of a search space: `Member` (the slices of one parameter a family's units own) and
`Family` (the units of one index space). See :mod:`geta_hf.graph.qadg` for the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

__all__ = ["Member", "Family"]


@dataclass
class Member:
    """The slices of one parameter that belong to the units of a family."""

    param: str
    dim: int
    #: ``(num_units, width)`` long tensor: positions along ``dim`` owned by each unit
    index: torch.Tensor
    role: str  # "out" (group member) or "in" (consumer columns)
    size: int  # the parameter's size along ``dim``
    numel: int  # the parameter's number of elements

    @property
    def width(self) -> int:
        """Entries of the member's dimension owned by one unit."""
        return int(self.index.shape[1])

    @property
    def module(self) -> str:
        """Name of the module that holds the parameter."""
        return self.param.rpartition(".")[0]

    @property
    def params_per_unit(self) -> int:
        """Parameter entries one unit owns in this member."""
        return self.width * (self.numel // self.size)

    @property
    def contiguous(self) -> bool:
        """True when unit ``u`` owns positions ``u*width .. (u+1)*width - 1`` of the whole dim."""
        n = self.index.numel()
        return n == self.size and bool(torch.equal(self.index.reshape(-1), torch.arange(n)))


@dataclass
class Family:
    """The units of one index space (e.g. the heads of one attention layer)."""

    name: str
    kind: str  # "heads", "kv_groups" or "channels"
    layer: str
    num_units: int
    min_units: int
    members: List[Member]
    consumers: List[Member] = field(default_factory=list)
    offset: int = 0  # global id of unit 0
    #: query heads per unit (GQA group size for kv-groups, 1 otherwise)
    heads_per_unit: int = 1
    #: size of one head (0 for channel families)
    head_dim: int = 0

    @property
    def params(self) -> List[str]:
        """Names of the parameters of the family's members and consumers."""
        return [m.param for m in self.members + self.consumers]

    @property
    def params_per_unit(self) -> int:
        """Parameter entries one unit owns, members and consumers together."""
        return sum(m.params_per_unit for m in self.members + self.consumers)

    @property
    def group_params_per_unit(self) -> int:
        """Parameter entries one unit owns in its members (the slices QASSO scores and forgets)."""
        return sum(m.params_per_unit for m in self.members)
