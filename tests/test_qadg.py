"""QADG: families found from the exported graph, unit zeroing, quantization awareness, errors."""

import copy

import pytest
import torch
from torch import nn

import geta_hf
from geta_hf import GETAConfig, GraphCaptureError, build_qadg

from tiny_models import FAMILIES, build

# What each architecture implies: (family layer name, kind, units), in model order.
L2 = (0, 1)
EXPECTED = {
    "bert": [(f"bert.encoder.layer.{i}{s}", k, n) for i in L2
             for s, k, n in ((".attention", "heads", 4), ("", "channels", 48))],
    "roberta": [(f"roberta.encoder.layer.{i}{s}", k, n) for i in L2
                for s, k, n in ((".attention", "heads", 4), ("", "channels", 40))]
               + [("classifier", "channels", 32)],  # the classification head's hidden layer
    "distilbert": [(f"distilbert.transformer.layer.{i}{s}", k, n) for i in L2
                   for s, k, n in ((".attention", "heads", 4), (".ffn", "channels", 40))],
    "gpt2": [(f"transformer.h.{i}{s}", k, n) for i in L2
             for s, k, n in ((".attn", "heads", 4), (".mlp", "channels", 48))],
    "llama": [(f"model.layers.{i}{s}", k, n) for i in L2
              for s, k, n in ((".self_attn", "kv_groups", 2), (".mlp", "channels", 48))],
    "mistral": [(f"model.layers.{i}{s}", k, n) for i in L2
                for s, k, n in ((".self_attn", "kv_groups", 2), (".mlp", "channels", 40))],
    "qwen2": [(f"model.layers.{i}{s}", k, n) for i in L2
              for s, k, n in ((".self_attn", "kv_groups", 2), (".mlp", "channels", 40))],
    "phi3": [(f"model.layers.{i}{s}", k, n) for i in L2
             for s, k, n in ((".self_attn", "kv_groups", 2), (".mlp", "channels", 40))],
    "vit": [(f"vit.layers.{i}{s}", k, n) for i in L2
            for s, k, n in ((".attention", "heads", 4), (".mlp", "channels", 40))],
    # T5 adds ONE relative-position bias (computed in block 0) to every block of a stack, so head h
    # of all blocks of a stack is one unit; cross-attention shares one zero bias the same way.
    "t5": [("encoder.block.*.layer.0.SelfAttention", "heads", 4)]
          + [(f"encoder.block.{i}.layer.1.DenseReluDense", "channels", 40) for i in L2]
          + [("decoder.block.*.layer.0.SelfAttention", "heads", 4),
             ("decoder.block.*.layer.1.EncDecAttention", "heads", 4)]
          + [(f"decoder.block.{i}.layer.2.DenseReluDense", "channels", 40) for i in L2],
}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    if torch.is_tensor(out):
        return out.reshape(-1)
    return torch.cat([v.reshape(-1) for k, v in out.items() if torch.is_tensor(v) and k != "loss"])


def _family_table(q):
    return [(f.layer, f.kind, f.num_units) for f in q.families]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_match_the_architecture(name):
    model, make = build(name)
    q = build_qadg(model, make(0))
    assert _family_table(q) == EXPECTED[name]
    assert q.num_groups == sum(n for _, _, n in EXPECTED[name])
    for f in q.families:
        assert f.members and f.consumers
        for m in f.members + f.consumers:
            assert m.index.shape[0] == f.num_units
            # units own disjoint slices
            assert m.index.reshape(-1).unique().numel() == m.index.numel()
    text = q.summary()
    assert all(f.name in text for f in q.families)


def _check_unit_vanishes(model, make, q, fam, u):
    inputs = make(0)
    base = _outputs(model, inputs)
    # A: zero the unit's group slices (what GETA does)
    a = copy.deepcopy(model)
    q.zero_groups(a, [fam.offset + u])
    # B: the unit physically absent: its consumer columns read nothing
    b = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(b.named_parameters())
        for m in fam.consumers:
            params[m.param].index_fill_(m.dim, m.index[u], 0.0)
    captured, order = {}, []

    def hook(name):
        def fn(_m, args):
            captured.setdefault(name, []).append(args[0].detach().clone())
            order.append(name[1])
        return fn

    consumer_modules = sorted({m.module for m in fam.consumers})
    for tag, mdl in (("base", model), ("a", a)):
        hs = [mdl.get_submodule(n).register_forward_pre_hook(hook((tag, n))) for n in consumer_modules]
        out = _outputs(mdl, inputs)
        for h in hs:
            h.remove()
        if tag == "a":
            out_a = out
    out_b = _outputs(b, inputs)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out_a, base), f"zeroing {fam.name}[{u}] changed nothing"
    cols_by_module = {}
    for m in fam.consumers:
        cols_by_module.setdefault(m.module, []).append(m.index[u])
    for n in consumer_modules:
        cols = torch.cat(cols_by_module[n])
        other = torch.ones(captured[("a", n)][0].shape[-1], dtype=torch.bool)
        other[cols] = False
        for xa, xb in zip(captured[("a", n)], captured[("base", n)]):
            assert (xb[..., cols] != 0).any(), f"{fam.name}: unit {u} was already silent"
            assert (xa[..., cols] == 0).all(), f"{fam.name}: unit {u} still reaches {n}"
            if n == order[0]:  # the first consumer to run sees the other units unchanged
                torch.testing.assert_close(xa[..., other], xb[..., other], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zeroing_one_unit_removes_exactly_its_contribution(name):
    model, make = build(name)
    q = build_qadg(model, make(0))
    for fam in q.families:
        _check_unit_vanishes(model, make, q, fam, u=fam.num_units - 1)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "phi3", "t5"])
def test_groups_are_identical_with_quantizers(name):
    model, make = build(name)
    q0 = build_qadg(model, make(0))
    geta_hf.prepare_model(model, GETAConfig(activation_bits=(8, 16)), [make(1)])
    q1 = build_qadg(model, make(0))
    assert _family_table(q0) == _family_table(q1)
    for f0, f1 in zip(q0.families, q1.families):
        assert [(m.param, m.dim, m.role) for m in f0.members + f0.consumers] == \
               [(m.param, m.dim, m.role) for m in f1.members + f1.consumers]
        for m0, m1 in zip(f0.members + f0.consumers, f1.members + f1.consumers):
            assert torch.equal(m0.index, m1.index)
        # quantizer scalars are never indexed by unit
        assert not any("quantizer" in p for p in f1.params)
    # zeroing still removes exactly the unit with fake quantization active
    for fam in q1.families[:2]:
        _check_unit_vanishes(model, make, q1, fam, u=0)


def test_group_norms_and_zero_groups():
    model, make = build("llama")
    q = build_qadg(model, make(0))
    norms = q.group_norms(model)
    assert norms.shape == (q.num_groups,) and (norms > 0).all()
    fam = q.families[1]
    q.zero_groups(model, [fam.offset + 3, fam.offset + 5])
    after = q.group_norms(model)
    assert after[fam.offset + 3] == 0 and after[fam.offset + 5] == 0
    keep = torch.ones(q.num_groups, dtype=torch.bool)
    keep[[fam.offset + 3, fam.offset + 5]] = False
    torch.testing.assert_close(after[keep], norms[keep])
    # norms are the L2 norm over all group slices of the unit
    f0 = q.families[0]
    params = dict(model.named_parameters())
    manual = sum(params[m.param].detach().index_select(m.dim, m.index[1]).square().sum()
                 for m in f0.members).sqrt()
    assert after[f0.offset + 1].item() == pytest.approx(manual.item(), rel=1e-5)
    assert q.unit(fam.offset + 3) == (fam, 3)


def test_min_units_are_kept():
    model, make = build("bert")
    q = build_qadg(model, make(0), min_units=2)
    heads = q.families[0]
    q.zero_groups(model, range(heads.offset, heads.offset + heads.num_units - 2))
    with pytest.raises(ValueError, match=r"must keep at least 2 unit\(s\)"):
        q.zero_groups(model, [heads.offset + heads.num_units - 1])
    with pytest.raises(IndexError):
        q.zero_groups(model, [q.num_groups])


def test_mark_unprunable_by_module_and_parameter():
    model, make = build("bert")
    q = build_qadg(model, make(0))
    n = q.num_groups
    removed = q.mark_unprunable("bert.encoder.layer.0.output.dense")  # a consumer module
    assert removed == ["bert.encoder.layer.0.channels"]
    removed = q.mark_unprunable(["bert.encoder.layer.1.attention.self.key.weight"])
    assert removed == ["bert.encoder.layer.1.attention.heads"]
    assert q.num_groups == n - 48 - 4
    assert [f.offset for f in q.families] == [0, 4]
    with pytest.raises(ValueError, match="matches no module or parameter"):
        q.mark_unprunable("bert.encoder.layer.9")
    # a bad pattern after a good one: refused before the good one removes anything
    with pytest.raises(ValueError, match="'nope' matches no .* nothing was changed"):
        q.mark_unprunable(["bert.encoder.layer.1.output.dense", "nope"])
    assert q.num_groups == n - 48 - 4 and [f.offset for f in q.families] == [0, 4]
    q2 = build_qadg(model, make(0), GETAConfig(unprunable_modules=["*.attention.*"]))
    assert [f.kind for f in q2.families] == ["channels", "channels"]


class _Sorted(nn.Module):
    """Every hidden space goes through an op the analysis does not model (sort)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.sort(self.up(x), dim=-1).values)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return self.lin(x)
        return x


def test_clear_errors_for_models_that_cannot_be_analysed():
    with pytest.raises(GraphCaptureError,
                       match=r"no prunable .* aten\.sort\.default in the top-level module \(_Sorted\)"):
        build_qadg(_Sorted(), {"x": torch.randn(2, 8)})
    with pytest.raises(GraphCaptureError, match="mark_unprunable|unprunable_modules"):
        build_qadg(_Sorted(), {"x": torch.randn(2, 8)})
    with pytest.raises(GraphCaptureError, match="torch.export could not capture _Branchy"):
        build_qadg(_Branchy(), {"x": torch.randn(2, 8)})
    with pytest.raises(GraphCaptureError, match="example_inputs must be a dict"):
        build_qadg(_Branchy(), torch.randn(2, 8))


def test_plain_mlp_and_shared_weights():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 10)
            self.b = nn.Linear(10, 6)
            self.c = nn.Linear(6, 10)
            self.c.weight = self.a.weight  # shared across two producers
            self.d = nn.Linear(10, 3)

        def forward(self, x):
            return self.d(torch.relu(self.c(self.b(torch.relu(self.a(x))))))

    model = MLP()
    q = build_qadg(model, {"x": torch.randn(4, 6)})
    # the shared weight ties the two hidden spaces together: one family, units own both
    assert [(f.kind, f.num_units) for f in q.families] == [("channels", 10)]
    f = q.families[0]
    assert {m.param for m in f.consumers} == {"b.weight", "d.weight"}
    _check_unit_vanishes(model, lambda s: {"x": torch.randn(4, 6, generator=torch.Generator().manual_seed(s))},
                         q, f, u=2)


# ----------------------------------------------------------------------------- real models
def _minilm_inputs(tok, seed=0):
    qs = ["Where is the tower?", "Who wrote it?"]
    cs = ["The tower stands in Paris near the river.", "The report was written by a committee."]
    enc = tok(qs, cs, return_tensors="pt", padding="max_length", max_length=32)
    return dict(enc)


def test_real_minilm(minilm):
    model, tok = minilm
    q = build_qadg(model, _minilm_inputs(tok))
    assert _family_table(q) == [(f"bert.encoder.layer.{i}{s}", k, n) for i in range(6)
                                for s, k, n in ((".attention", "heads", 12), ("", "channels", 1536))]
    make = lambda seed: _minilm_inputs(tok, seed)  # noqa: E731
    for fam in q.families:
        _check_unit_vanishes(model, make, q, fam, u=5)


def test_real_smollm2(smollm2):
    model = smollm2
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    q = build_qadg(model, {"input_ids": ids})
    assert _family_table(q) == [(f"model.layers.{i}{s}", k, n) for i in range(30)
                                for s, k, n in ((".self_attn", "kv_groups", 3), (".mlp", "channels", 1536))]
    kv = q.families[0]
    # a kv-group owns its key/value head and its 3 query heads (9 query heads / 3 kv heads)
    widths = {m.param.rsplit(".", 2)[-2]: m.width for m in kv.members + kv.consumers}
    assert widths == {"q_proj": 3 * 64, "k_proj": 64, "v_proj": 64, "o_proj": 3 * 64}
    make = lambda seed: {"input_ids": ids, "use_cache": False}  # noqa: E731
    for fam in [q.families[i] for i in (0, 1, 30, 59)]:
        _check_unit_vanishes(model, make, q, fam, u=1)
