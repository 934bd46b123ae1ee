"""Subnet construction (physical removal + packing) and compression metrics."""

import copy
import json
import math

import pytest
import torch

import geta_hf
from geta_hf import GETAConfig, build_qadg, compress_model, model_stats
from geta_hf.compress import CompressionError, PackedQuantLinear, pack_layer
from geta_hf.quant import QuantLinear, quant_layers

from tiny_models import FAMILIES, build


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [v for k, v in out.items() if torch.is_tensor(v) and k != "loss"]


def _zero_half(q, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = []
    for f in q.families:
        k = min(f.num_units // 2, f.num_units - f.min_units)
        ids += (torch.randperm(f.num_units, generator=g)[:k] + f.offset).tolist()
    q.zero_groups(model, ids)
    return ids


def _expected_shapes(q, model, removed):
    """Analytical parameter shapes after removing the given units."""
    removed = set(removed)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    for f in q.families:
        gone = sum(1 for u in range(f.num_units) if f.offset + u in removed)
        for m in f.members + f.consumers:
            shapes[m.param][m.dim] -= gone * m.width
    return shapes


def _randomise_bits(model, lo=4, hi=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, m in quant_layers(model):
        m.weight_quantizer.set_bits(int(torch.randint(lo, hi + 1, (), generator=g)))


def _check(model, make, quantize, acts=True):
    if quantize:
        # Real, deep models are checked with weight quantization only: with input quantization an
        # activation on a rounding boundary can flip to the next level once the float summation
        # order changes (see compress_model's docstring); the tiny models check both.
        geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8),
                                                activation_bits=(8, 8) if acts else None),
                              [make(5), make(6)] if acts else None)
        _randomise_bits(model)
    q = build_qadg(model, make(0))
    removed = _zero_half(q, model)
    expected = _expected_shapes(q, model, removed)
    ref = [_outputs(model, make(s)) for s in (1, 2)]
    compress_model(model, q, example_inputs=make(0))
    for s, r in zip((1, 2), ref):
        out = _outputs(model, make(s))
        assert len(out) == len(r)
        for a, b in zip(out, r):
            assert a.shape == b.shape
            # within 1e-4 of the output's scale (SmolLM2's logits reach ~30; fp32 noise over 30
            # layers is ~1e-4 absolute there, 1e-6 relative)
            assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    # parameter count equals the analytical count
    actual = {n: list(p.shape) for n, p in model.named_parameters()}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedQuantLinear):
            w = name + ".weight"
            actual[w] = [mod.out_features, mod.in_features]
            if actual[w] != expected[w]:  # Conv1D weights are stored transposed
                actual[w] = actual[w][::-1]
            assert mod.weight_packed.numel() == (mod.out_features * mod.in_features
                                                 * mod.weight_bits + 7) // 8
    for n, shape in expected.items():
        if "quantizer" in n:
            continue
        assert actual[n] == shape, n
    n_expected = sum(math.prod(s) for n, s in expected.items() if "quantizer" not in n)
    n_actual = sum(math.prod(s) for n, s in actual.items() if "quantizer" not in n)
    assert n_actual == n_expected
    assert model.geta_arch["compressed"]
    return q


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "fake-quant"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_compressed_model_equals_zeroed_model(name, quantize):
    model, make = build(name)
    _check(model, make, quantize)
    if quantize:
        packed = [m for m in model.modules() if isinstance(m, PackedQuantLinear)]
        assert packed and all(4 <= m.weight_bits <= 8 for m in packed)
        assert not quant_layers(model)


def _minilm_make(tok):
    texts = [("Where is the tower?", "The tower stands in Paris near the river Seine."),
             ("Who wrote it?", "The report was written by a committee in 2019."),
             ("What is red?", "Apples are red and bananas are yellow."),
             ("When did it open?", "The museum opened in May after a long delay.")]

    def make(seed):
        pair = texts[seed % 2 * 2: seed % 2 * 2 + 2]
        enc = tok([a for a, _ in pair], [b for _, b in pair], return_tensors="pt",
                  padding="max_length", max_length=32)
        return dict(enc)

    return make


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "fake-quant"])
def test_real_minilm_compression(minilm, quantize):
    model, tok = minilm
    _check(copy.deepcopy(model), _minilm_make(tok), quantize, acts=False)


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "fake-quant"])
def test_real_smollm2_compression(smollm2, quantize):
    def make(seed):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 49152, (1, 8), generator=g), "use_cache": False}

    _check(copy.deepcopy(smollm2), make, quantize, acts=False)


def test_packed_weights_equal_fake_quantized_weights_exactly():
    torch.manual_seed(0)
    for nonlinear in (True, False):
        lin = torch.nn.Linear(16, 12)
        q = QuantLinear.from_float(lin, nonlinear=nonlinear)
        q.weight_quantizer.init_range(lin.weight.abs().max(), 5)
        if nonlinear:
            with torch.no_grad():
                q.weight_quantizer.t.fill_(1.3)
                q.weight_quantizer.set_bits(5)
        p = pack_layer(q)
        assert torch.equal(p.dequantized_weight(), q.quantized_weight().detach())
        assert p.weight_bits == 5 and p.weight_packed.numel() == (16 * 12 * 5 + 7) // 8
        assert int(p.codes().abs().max()) <= 2 ** 4 - 1
        x = torch.randn(3, 16)
        assert torch.equal(p(x), q(x).detach())
        p.eval()
        assert torch.equal(p(x), q(x).detach())  # cached dequantized weight
    q.weight_quantizer.set_bits(12)
    assert pack_layer(q).weight_bits == 12


@pytest.mark.parametrize("bits", list(range(2, 17)))
def test_bit_packing_round_trip(bits):
    from geta_hf.compress.bitpack import pack_codes, packed_nbytes, unpack_codes

    g = torch.Generator().manual_seed(bits)
    half = 2 ** (bits - 1) - 1
    for n in (0, 1, 7, 8, 9, 1000, (1 << 20) + 13):
        codes = torch.randint(-half, half + 1, (n,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
        assert torch.equal(unpack_codes(packed, bits, n).long(), codes)
    with pytest.raises(ValueError, match="exceeds"):
        pack_codes(torch.tensor([half + 1]), bits)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), bits, 1000)


def test_compress_refuses_twice_and_foreign_qadg():
    model, make = build("bert")
    q = build_qadg(model, make(0))
    _zero_half(q, model)
    other, _ = build("llama")
    with pytest.raises(ValueError, match="does not belong to this model"):
        compress_model(other, q)
    compress_model(model, q, example_inputs=make(0))
    with pytest.raises(ValueError, match="already compressed"):
        compress_model(model, q, example_inputs=make(0))


def test_qadg_keeps_no_data_and_compress_without_inputs_warns(caplog):
    """A QADG is structure only; compress_model verifies on the inputs it is given, and
    without them checks the structure and says that the outputs were not compared."""
    model, make = build("bert")
    q = build_qadg(model, make(0))
    assert not any(isinstance(v, dict) for v in vars(q).values() if v is not q.timings)
    with pytest.raises(AttributeError, match="keeps no data"):
        q.example_inputs
    _zero_half(q, model)
    with torch.no_grad():
        ref = model(**make(1)).start_logits
    with caplog.at_level("WARNING", logger="geta_hf.compress.subnet"):
        compress_model(model, q)
    assert "not checked" in caplog.text
    with torch.no_grad():
        assert torch.allclose(model(**make(1)).start_logits, ref, atol=1e-4)


def test_compress_keeps_at_least_one_unit():
    model, make = build("bert")
    q = build_qadg(model, make(0))
    fam = q.families[1]  # MLP channels of layer 0
    with torch.no_grad():  # bypass zero_groups' guard: zero every channel by hand
        params = dict(model.named_parameters())
        for m in fam.members:
            params[m.param].index_fill_(m.dim, m.index.reshape(-1), 0.0)
    compress_model(model, q, example_inputs=make(0))
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 1


def test_verification_catches_a_broken_forward():
    model, make = build("gpt2")
    q = build_qadg(model, make(0))
    _zero_half(q, model)
    # simulate modeling code that reads an attribute geta-hf cannot know about
    for block in model.transformer.h:
        block.attn.split_size_hidden = block.attn.split_size
        block.attn.forward_orig = block.attn.forward

    from geta_hf import registry

    names = registry._SHAPE_ATTRS["size"]
    registry._SHAPE_ATTRS["size"] = tuple(n for n in names if n != "split_size")
    try:
        with pytest.raises(CompressionError, match="no longer runs|differs"):
            compress_model(model, q, example_inputs=make(0))
    finally:
        registry._SHAPE_ATTRS["size"] = names


def test_verification_catches_a_dropped_output():
    """An output the compressed model no longer returns is an error, not skipped by zip."""
    model, make = build("bert")
    q = build_qadg(model, make(0))
    _zero_half(q, model)

    shapes = {n: p.shape for n, p in model.named_parameters()}
    calls = []

    def hook(mod, args, out):
        calls.append(1)
        return out if len(calls) == 1 else type(out)(start_logits=out.start_logits)

    model.register_forward_hook(hook)
    with pytest.raises(CompressionError, match="returns 1 output tensor.*zeroed model 2"):
        compress_model(model, q, example_inputs=make(0))
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # rolled back


# ----------------------------------------------------------------------------- metrics
def test_macs_and_bops_by_hand_tiny_bert():
    model, make = build("bert")  # hidden 32, 4 heads of 8, MLP 48, 2 layers, QA head
    inputs = make(0)  # batch 2 x seq 12 -> 24 tokens
    T, H, I = 24, 32, 48
    per_layer_linear = 4 * (T * H * H) + 2 * (T * H * I)  # q,k,v,o + up, down
    attn = 2 * 4 * 12 * 12 * (8 + 8)  # batch x heads x L x S x (QK^T dim + AV dim)
    qa = T * H * 2
    s = model_stats(model, inputs)
    assert s["macs"] == 2 * (per_layer_linear + attn) + qa == 382464
    assert s["bops"] == s["macs"] * 32 * 32
    assert s["relative"]["bops"] == pytest.approx(1.0)
    # quantize: weights at 4 bits in layer 0, 8 elsewhere; inputs at 8 bits
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8), activation_bits=(8, 8)), [make(1)])
    for name, m in quant_layers(model):
        m.weight_quantizer.set_bits(4 if ".layer.0." in name else 8)
    s = model_stats(model, inputs)
    lin0, lin1 = per_layer_linear, per_layer_linear
    expected_bops = (lin0 * 4 * 8 + lin1 * 8 * 8 + qa * 8 * 8  # quantized linears
                     + 2 * attn * 32 * 32)  # attention products stay float x float
    assert s["bops"] == expected_bops
    assert s["relative"]["bops"] == pytest.approx(expected_bops / (382464 * 32 * 32))
    by_name = {r["name"]: r for r in s["layers"]}
    assert by_name["bert.encoder.layer.0.attention.self.query"]["weight_bits"] == 4
    assert by_name["bert.encoder.layer.0.attention.self"]["macs"] == attn
    # weight size: quantized weights at their bits, everything else at 32
    qw = sum(m.weight.numel() * (4 if ".layer.0." in n else 8) for n, m in quant_layers(model))
    n_q = sum(m.weight.numel() for _, m in quant_layers(model))
    total = sum(p.numel() for p in model.parameters())
    assert s["size_bits"] == qw + (total - n_q) * 32
    assert s["avg_weight_bits"] == pytest.approx(s["size_bits"] / total)


def test_macs_by_hand_tiny_llama_after_compression():
    model, make = build("llama")  # hidden 32, 4 q-heads / 2 kv-heads of 8, MLP 48, vocab 96
    inputs = make(0)
    T, H, I, V = 24, 32, 48, 96
    dense = 2 * (T * H * 32 + 2 * T * H * 16 + T * 32 * H + 3 * T * H * I + 2 * 4 * 12 * 12 * 16) \
        + T * H * V
    s = model_stats(model, inputs)
    assert s["macs"] == dense
    q = build_qadg(model, make(0))
    # remove one kv-group (2 query heads) and 24 channels in layer 0 only
    kv0, mlp0 = q.families[0], q.families[1]
    q.zero_groups(model, [kv0.offset + 1] + list(range(mlp0.offset, mlp0.offset + 24)))
    compress_model(model, q, example_inputs=make(0))
    layer0 = (T * H * 16 + 2 * T * H * 8 + T * 16 * H + 3 * T * H * 24 + 2 * 2 * 12 * 12 * 16)
    layer1 = T * H * 32 + 2 * T * H * 16 + T * 32 * H + 3 * T * H * I + 2 * 4 * 12 * 12 * 16
    s = model_stats(model, inputs)
    assert s["macs"] == layer0 + layer1 + T * H * V
    assert s["reference"]["macs"] == dense
    assert s["relative"]["macs"] == pytest.approx(s["macs"] / dense)
    assert s["params"] < s["reference"]["params"]


def test_report_writes_markdown_and_plots(tmp_path):
    model, make = build("llama")
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    _randomise_bits(model)
    q = build_qadg(model, make(0))
    _zero_half(q, model)
    compress_model(model, q, example_inputs=make(0))
    out = geta_hf.report(model, make(0), str(tmp_path), eval_results={"f1": 80.5})
    files = out["files"]
    for key in ("markdown", "json", "bits", "units"):
        assert (tmp_path / files[key].split("/")[-1]).exists(), key
    text = (tmp_path / "report.md").read_text()
    assert "| BOPs |" in text and "| f1 | 80.5 |" in text and "kv_groups" in text
    assert (tmp_path / "bits_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    # numpy / torch scalars are numbers; a value JSON cannot hold fails before anything is
    # written, so the earlier report stays whole (no truncated report.json, no stray files)
    import numpy as np

    geta_hf.report(model, make(0), str(tmp_path), eval_results={"f1": np.float32(81.0)})
    assert json.loads((tmp_path / "report.json").read_text())["eval"] == {"f1": 81.0}
    names = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"eval_results\['f1'\]"):
        geta_hf.report(model, make(0), str(tmp_path), eval_results={"f1": "high"})
    assert json.loads((tmp_path / "report.json").read_text())["eval"] == {"f1": 81.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == names
