"""geta_hf.surgery: the model surgery shared by quantizer insertion, compression and loading."""

import pytest
from torch import nn

from geta_hf.surgery import (ARCH_ATTR, CompressedArch, Journal, apply_module_attrs, param_owners,
                             resize_parameters, set_submodule)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.block = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))


def test_param_owners_lists_every_holder_of_a_tied_weight():
    m = _Tied()
    owners = param_owners(m)[id(m.emb.weight)]
    assert {(type(mod).__name__, leaf) for mod, leaf in owners} == {("Embedding", "weight"),
                                                                     ("Linear", "weight")}


def test_resize_parameters_resizes_all_holders_and_their_size_attributes():
    m = _Tied()
    resize_parameters(m, {"emb.weight": [7, 4], "block.0.weight": [3, 4], "block.0.bias": [3],
                          "absent.weight": [1, 1]})
    assert m.head.weight is m.emb.weight and tuple(m.emb.weight.shape) == (7, 4)
    assert (m.emb.num_embeddings, m.head.out_features) == (7, 7)
    assert (m.block[0].out_features, m.block[0].in_features) == (3, 4)
    with pytest.raises(ValueError, match=r"param_shapes\['block.2.weight'\].*rank"):
        resize_parameters(m, {"block.2.weight": [4]})


def test_set_submodule_through_a_journal_can_be_undone():
    m = _Tied()
    old, new = m.block[2], nn.Identity()
    j = Journal()
    set_submodule(m, "block.2", new, j)
    j.set(m, ARCH_ATTR, {"compressed": True})
    assert m.block[2] is new and CompressedArch.of(m) is not None
    j.rollback()
    assert m.block[2] is old and not hasattr(m, ARCH_ATTR) and CompressedArch.of(m) is None


def test_compressed_arch_round_trip_and_errors():
    arch = CompressedArch(families={"f": {"kind": "channels", "layer": "block", "units": 6,
                                          "kept": [0, 2]}},
                          param_shapes={"block.0.weight": (2, 4)},
                          module_attrs={"block": {"config.n": 2}}, packed_layers={"block.0": 4})
    d = arch.to_dict()
    assert d["compressed"] and d["param_shapes"]["block.0.weight"] == [2, 4]
    assert CompressedArch.from_dict(d).to_dict() == d
    assert CompressedArch.from_dict({"compressed": True}) == CompressedArch()
    with pytest.raises(ValueError, match="module_attrs: got list"):
        CompressedArch.from_dict({"module_attrs": []})


def test_apply_module_attrs_copies_a_shared_config_before_changing_it():
    class Cfg:
        n = 4

    shared = Cfg()
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a.config = b.config = shared
    m = nn.ModuleDict({"a": a, "b": b})
    apply_module_attrs(m, {"a": {"config.n": 2, "extra": 1}})
    assert a.config.n == 2 and b.config.n == 4 and shared.n == 4 and a.extra == 1
