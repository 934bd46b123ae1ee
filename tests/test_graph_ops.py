"""The graph analysis, one op family per test (Torch-Pruning style): each scenario is a tiny
module whose index spaces exercise one propagation rule; the test checks the units found and
that zeroing one unit removes exactly its contribution. Also the ``register_op`` extension point.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_hf.graph.propagate as propagate
from geta_hf import GraphCaptureError, build_qadg, register_op

from test_qadg import _check_unit_vanishes

aten = torch.ops.aten
D, H = 16, 4  # hidden size, heads (head_dim 4)


def _inputs(seed=0, batch=2, seq=5):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, seq, D, generator=g)}


def _heads(t, n):
    b, s, _ = t.shape
    return t.view(b, s, n, -1).transpose(1, 2)


def _merge(t):
    b, n, s, dh = t.shape
    return t.transpose(1, 2).reshape(b, s, n * dh)


def _table(q):
    return [(f.kind, f.num_units, sorted(m.param for m in f.members),
             sorted(m.param for m in f.consumers)) for f in q.families]


def _units_vanish(model, q):
    for f in q.families:
        _check_unit_vanishes(model, _inputs, q, f, u=f.num_units - 1)


class _SeparateQKV(nn.Module):
    """reshape/transpose into heads, attention, merge heads."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        a = F.scaled_dot_product_attention(_heads(self.q(x), H), _heads(self.k(x), H),
                                           _heads(self.v(x), H))
        return self.o(_merge(a))


def test_heads_through_reshape_transpose_and_attention():
    model = _SeparateQKV()
    q = build_qadg(model, _inputs())
    assert _table(q) == [("heads", H, ["k.bias", "k.weight", "q.bias", "q.weight", "v.bias",
                                       "v.weight"], ["o.weight"])]
    _units_vanish(model, q)


class _FusedQKV(nn.Module):
    """one projection split into q, k, v (cat/split of a fused projection)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        qq, kk, vv = self.qkv(x).split(D, dim=-1)
        return self.o(_merge(F.scaled_dot_product_attention(_heads(qq, H), _heads(kk, H),
                                                            _heads(vv, H))))


def test_heads_of_a_fused_projection_split_in_three():
    model = _FusedQKV()
    q = build_qadg(model, _inputs())
    assert _table(q) == [("heads", H, ["qkv.bias", "qkv.weight"], ["o.weight"])]
    member = q.families[0].members[0]
    assert member.index.shape == (H, 3 * D // H)  # each head owns its rows in q, k and v
    _units_vanish(model, q)


class _GQA(nn.Module):
    """2 kv heads shared by 4 query heads: repeat_kv as expand + reshape."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.k, self.v = nn.Linear(D, D // 2), nn.Linear(D, D // 2)

    def forward(self, x):
        kk, vv = _heads(self.k(x), 2), _heads(self.v(x), 2)
        b, n, s, dh = kk.shape
        kk = kk[:, :, None].expand(b, n, 2, s, dh).reshape(b, n * 2, s, dh)
        vv = vv[:, :, None].expand(b, n, 2, s, dh).reshape(b, n * 2, s, dh)
        return self.o(_merge(F.scaled_dot_product_attention(_heads(self.q(x), H), kk, vv)))


def test_kv_groups_through_expand_and_repeat():
    model = _GQA()
    q = build_qadg(model, _inputs())
    fam = q.families[0]
    assert (fam.kind, fam.num_units, fam.heads_per_unit) == ("kv_groups", 2, 2)
    _units_vanish(model, q)


class _Concat(nn.Module):
    """two producers concatenated into one consumer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(D, 6), nn.Linear(D, 10), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


def test_concatenated_producers_one_family_per_consumer_dim():
    """Both producers' channels reach the consumer's columns through ``cat`` (b's at columns
    6..15), but a parameter dim holds the units of one family only (compression slices each
    dim once), so the second producer is reported as rejected, not silently mis-indexed."""
    model = _Concat()
    q = build_qadg(model, _inputs())
    assert _table(q) == [("channels", 6, ["a.bias", "a.weight"], ["out.weight"])]
    assert q.families[0].consumers[0].index.reshape(-1).tolist() == list(range(6))
    assert any("nested inside the units of" in why for _, why in q.unprunable)
    _units_vanish(model, q)


class _HeldAside(nn.Module):
    """An MLP with a layer the forward never calls (a PEFT adapter or a ``modules_to_save``
    original held aside)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 24), nn.Linear(24, D)
        self.unused = nn.Linear(D, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_parameters_the_forward_does_not_use_form_no_family():
    model = _HeldAside()
    q = build_qadg(model, _inputs())
    assert _table(q) == [("channels", 24, ["up.bias", "up.weight"], ["down.weight"])]


class _SortedOverBatch(nn.Module):
    """an op the analysis does not know (sort), along a dim that is not the hidden one."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.down(torch.sort(torch.relu(self.up(x)), dim=0).values)


@pytest.fixture
def registry(monkeypatch):
    """register_op calls inside a test are undone after it."""
    monkeypatch.setattr(propagate, "_REGISTERED", {})
    monkeypatch.setattr(propagate, "_CONTRACTS", dict(propagate._CONTRACTS))


def test_register_op_makes_an_unknown_op_analysable(registry):
    model = _SortedOverBatch()
    with pytest.raises(GraphCaptureError, match="aten.sort"):
        build_qadg(model, _inputs())
    register_op(aten.sort, "along_dim")  # mixes values along args[1] (the batch here) only
    q = build_qadg(model, _inputs())
    assert _table(q) == [("channels", 12, ["up.bias", "up.weight"], ["down.weight"])]
    _units_vanish(model, q)


def test_register_op_along_the_hidden_dim_keeps_it_unprunable(registry):
    class SortedHidden(_SortedOverBatch):
        def forward(self, x):
            return self.down(torch.sort(torch.relu(self.up(x)), dim=-1).values)

    register_op(aten.sort.default, "along_dim")  # an overload stands for its packet
    with pytest.raises(GraphCaptureError, match="no prunable"):
        build_qadg(SortedHidden(), _inputs())


def test_register_op_rejects_bad_rules(registry):
    with pytest.raises(ValueError, match="rule 'mix' is unknown; allowed: one of"):
        register_op(aten.sort, "mix")
    with pytest.raises(ValueError, match="rule must be a name"):
        register_op(aten.sort, 3)
    with pytest.raises(ValueError, match="contracts must map"):
        register_op(aten.sort, "same", contracts={"weight": -1})
