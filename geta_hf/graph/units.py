"""The units of a search space, as immutable records: `Member` (the slices of one parameter
that a family's units own) and `Family` (the units of one index space), with the enums
`UnitKind` and `Role`. See :mod:`geta_hf.graph.qadg` for the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Tuple

import torch

__all__ = ["UnitKind", "Role", "Member", "Family", "unit_slices"]


class _StrEnum(str, Enum):
    """An enum whose members are their string values (equal to, formatted and serialised as)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class UnitKind(_StrEnum):
    """What one unit of a family is."""

    HEADS = "heads"  #: an attention head
    KV_GROUPS = "kv_groups"  #: a key/value head with the query heads that share it (GQA/MQA)
    CHANNELS = "channels"  #: an MLP (or other) channel


class Role(_StrEnum):
    """What a member's slices are to the unit."""

    OUT = "out"  #: group member: producer rows, biases, head-carrying parameters (zeroed, scored)
    IN = "in"  #: consumer: input columns of a layer that reads the unit (removed with it)


@dataclass(frozen=True, eq=False)
class Member:
    """The slices of one parameter that belong to the units of a family."""

    param: str
    dim: int
    #: ``(num_units, width)`` long tensor: positions along ``dim`` owned by each unit
    index: torch.Tensor
    role: Role
    size: int  # the parameter's size along ``dim``
    numel: int  # the parameter's number of elements

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))

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


@dataclass(frozen=True, eq=False)
class Family:
    """The units of one index space (e.g. the heads of one attention layer)."""

    name: str
    kind: UnitKind
    layer: str
    num_units: int
    min_units: int
    members: Tuple[Member, ...]
    consumers: Tuple[Member, ...] = field(default_factory=tuple)
    offset: int = 0  # global id of unit 0
    #: query heads per unit (GQA group size for kv-groups, 1 otherwise)
    heads_per_unit: int = 1
    #: size of one head (0 for channel families)
    head_dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", UnitKind(self.kind))
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "consumers", tuple(self.consumers))

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


def unit_slices(t: torch.Tensor, dim: int, index: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """``(num_units, -1)`` entries of ``t`` owned by each unit: ``index`` is the
    ``(num_units, width)`` table of positions along ``dim``; ``contiguous`` when unit ``u`` owns
    positions ``u*width .. (u+1)*width - 1`` of the whole dim (a view then, else a copy)."""
    units = index.shape[0]
    if contiguous:
        return t.movedim(dim, 0).reshape(units, -1)
    idx = index.reshape(-1).to(t.device)
    return t.index_select(dim, idx).movedim(dim, 0).reshape(units, -1)
