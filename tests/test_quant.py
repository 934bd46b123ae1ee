"""The GETA fake quantizer, its bit math, the quantized layers and `prepare_model`."""

import copy

import pytest
import torch
from torch import nn

import geta_hf
from geta_hf import GETAConfig
from geta_hf.hf import QuantConv1D
from geta_hf.quant import (QuantLinear, bit_width, calibrate_activations, d_for_bits,
                           fake_quantize, quant_layers, quantization_bypassed)

from tiny_models import build

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _surrogate(x, d, qm, t, rho):
    """sign(x) * (u + d * rho) with the rounding residual rho held fixed (the STE surrogate)."""
    u = torch.minimum(x.abs(), qm)
    if t is not None:
        u = u.pow(t)
    return torch.sign(x) * (u + d * rho)


def _residual(x, d, qm, t):
    u = torch.minimum(x.abs(), qm)
    if t is not None:
        u = u.pow(t)
    z = u / d
    return torch.round(z) - z


def _safe_points(n, qm, d, t, seed):
    """Random x away from 0, from |x| = q_m and from rounding boundaries (|rho| < 0.4)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    while len(xs) < n:
        x = (torch.rand((), generator=g, dtype=F64) * 2.4 * qm + 0.02).item()
        if abs(x - qm) < 0.03:
            continue
        u = min(x, qm) ** (1.0 if t is None else t)
        r = round(u / d) - u / d
        if abs(r) > 0.4:
            continue
        sign = -1.0 if torch.rand((), generator=g).item() < 0.5 else 1.0
        xs.append(sign * x)
    return torch.tensor(xs, dtype=F64)


@pytest.mark.parametrize("nonlinear", [True, False])
def test_gradients_match_finite_differences(nonlinear):
    qm0, d0, t0 = 0.9, 0.07, (1.15 if nonlinear else None)
    x0 = _safe_points(40, qm0, d0, t0, seed=1)
    w = torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(2))
    x = x0.clone().requires_grad_(True)
    d = torch.tensor(d0, dtype=F64, requires_grad=True)
    qm = torch.tensor(qm0, dtype=F64, requires_grad=True)
    t = torch.tensor(t0, dtype=F64, requires_grad=True) if nonlinear else None
    (fake_quantize(x, d, qm, t) * w).sum().backward()

    rho = _residual(x0, torch.tensor(d0, dtype=F64), torch.tensor(qm0, dtype=F64),
                    None if t0 is None else torch.tensor(t0, dtype=F64))
    h = 1e-6

    def loss(xv=x0, dv=d0, qv=qm0, tv=t0):
        tt = None if tv is None else torch.tensor(tv, dtype=F64)
        return float((_surrogate(xv, torch.tensor(dv, dtype=F64), torch.tensor(qv, dtype=F64),
                                 tt, rho) * w).sum())

    fd_d = (loss(dv=d0 + h) - loss(dv=d0 - h)) / (2 * h)
    fd_q = (loss(qv=qm0 + h) - loss(qv=qm0 - h)) / (2 * h)
    assert d.grad.item() == pytest.approx(fd_d, rel=1e-6, abs=1e-8)
    assert qm.grad.item() == pytest.approx(fd_q, rel=1e-6, abs=1e-8)
    assert qm.grad.item() != 0.0  # some points are saturated, so the test is not vacuous
    if nonlinear:
        fd_t = (loss(tv=t0 + h) - loss(tv=t0 - h)) / (2 * h)
        assert t.grad.item() == pytest.approx(fd_t, rel=1e-6, abs=1e-8)
    # the STE input gradient, element by element
    fd_x = torch.empty_like(x0)
    for i in range(len(x0)):
        e = torch.zeros_like(x0)
        e[i] = h
        fd_x[i] = (loss(xv=x0 + e) - loss(xv=x0 - e)) / (2 * h)
    torch.testing.assert_close(x.grad, fd_x, rtol=1e-6, atol=1e-8)
    assert (x.grad[x0.abs() > qm0] == 0).all() and (x.grad[x0.abs() < qm0] != 0).all()


def test_forward_is_the_quantization_grid():
    x = torch.linspace(-3, 3, 1001, dtype=F64)
    d, qm, t = torch.tensor(0.25, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(1.3, dtype=F64)
    y = fake_quantize(x, d, qm, t)
    expected = torch.sign(x) * d * torch.round(torch.minimum(x.abs(), qm).pow(t) / d)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    codes = y / d
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-12)
    # saturated values sit on the top code round(q_m^t / d)
    assert y.abs().max().item() == pytest.approx(0.25 * round(2.0 ** 1.3 / 0.25))


@pytest.mark.parametrize("t", [None, 0.8, 1.0, 1.7])
def test_bit_formula_and_inverse_round_trip(t):
    for qm in [1e-3, 0.37, 1.0, 5.5, 300.0]:
        for b in range(2, 17):
            d = d_for_bits(torch.tensor(float(b), dtype=F64), torch.tensor(qm, dtype=F64), t)
            assert bit_width(d, torch.tensor(qm, dtype=F64), t).item() == pytest.approx(b, abs=1e-9)
            d32 = d_for_bits(float(b), torch.tensor(qm), t)
            b32 = bit_width(d32, torch.tensor(qm), t)
            assert abs(b32.item() - b) < 1e-4 and round(b32.item()) == b
    # monotone: a larger step means fewer bits
    ds = torch.tensor([0.01, 0.02, 0.05, 0.1])
    assert (bit_width(ds, 1.0, t).diff() < 0).all()


def test_extreme_inputs_give_finite_values_and_gradients():
    cases = [torch.zeros(8, 4), torch.full((8, 4), 1e30), torch.full((8, 4), -1e30),
             torch.tensor([[0.0, 1e-40, -1e-40, 3.0]]), torch.randn(6, 5) * 1e6]
    for nonlinear in (True, False):
        for x0 in cases:
            for d0, qm0 in [(1e-3, 1.0), (0.0, 0.0), (1e25, 1e30), (-1.0, -2.0)]:
                x = x0.clone().requires_grad_(True)
                d = torch.tensor(d0, requires_grad=True)
                qm = torch.tensor(qm0, requires_grad=True)
                t = torch.tensor(0.9, requires_grad=True) if nonlinear else None
                y = fake_quantize(x, d, qm, t)
                (y * torch.randn_like(y)).sum().backward()
                assert torch.isfinite(y).all()
                for g in (x.grad, d.grad, qm.grad) + ((t.grad,) if nonlinear else ()):
                    assert torch.isfinite(g).all(), (x0, d0, qm0, nonlinear)


def test_quant_linear_with_zero_weight_layer():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()
    q = QuantLinear.from_float(lin, nonlinear=True)
    q.weight_quantizer.init_range(lin.weight.abs().amax(), 8)
    y = q(torch.randn(2, 4))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(q.weight.grad).all()
    torch.testing.assert_close(y, lin.bias.expand(2, 3))


# ----------------------------------------------------------------------------- prepare_model
def _calib_batches(make, n=2):
    return [make(100 + i) for i in range(n)]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("acts", [False, True])
def test_prepared_model_at_16_bits_matches_float(family, acts):
    model, make = build(family)
    inputs = make(0)
    with torch.no_grad():
        ref = model(**inputs).logits if family == "llama" else model(**inputs).start_logits
    cfg = GETAConfig(weight_bits=(4, 16), activation_bits=(4, 16) if acts else None)
    prepared = geta_hf.prepare_model(model, cfg, calibration_data=_calib_batches(make) if acts else None)
    assert prepared is model and isinstance(model, type(build(family)[0]))
    layers = quant_layers(model)
    assert layers and all(round(float(m.weight_quantizer.bits())) == 16 for _, m in layers)
    if acts:
        assert all(m.act_quantizer.calibrated for _, m in layers)
        assert all(round(float(m.act_quantizer.bits())) == 16 for _, m in layers)
    with torch.no_grad():
        out = model(**inputs).logits if family == "llama" else model(**inputs).start_logits
    assert (out - ref).abs().max().item() < 1e-3
    # the quantizers really act: at 4 bits the output moves
    for _, m in layers:
        m.weight_quantizer.set_bits(4)
    with torch.no_grad():
        out4 = model(**inputs).logits if family == "llama" else model(**inputs).start_logits
    assert (out4 - ref).abs().max().item() > 1e-3


def test_prepare_is_idempotent_and_shares_parameters():
    model, make = build("bert")
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    cfg = GETAConfig()
    geta_hf.prepare_model(model, cfg)
    n1 = len(quant_layers(model))
    state = copy.deepcopy(model.state_dict())
    geta_hf.prepare_model(model, cfg)
    assert len(quant_layers(model)) == n1 == 2 * 6 + 1
    assert model.bert.encoder.layer[0].intermediate.dense.weight is w
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="already prepared with different quantization"):
        geta_hf.prepare_model(model, GETAConfig(weight_bits=(2, 8)))


def test_prepare_gpt2_conv1d_and_tied_head():
    model, make = build("gpt2")
    inputs = make(0)
    with torch.no_grad():
        ref = model(**inputs).logits
    # calibrate on the evaluation input too: values beyond the calibrated range are clipped
    geta_hf.prepare_model(model, GETAConfig(activation_bits=(8, 16)), [inputs] + _calib_batches(make))
    names = dict(quant_layers(model))
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantConv1D)
    assert "lm_head" not in names  # tied to the token embedding: left in float
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(**inputs).logits
    assert (out - ref).abs().max().item() < 1e-3
    # naming only the tied head: refused, and the error says why
    with pytest.raises(ValueError, match="lm_head share.* a tied weight"):
        geta_hf.prepare_model(build("gpt2")[0], GETAConfig(include_modules=["lm_head"]))


def test_include_exclude_patterns():
    model, _ = build("bert")
    geta_hf.prepare_model(model, GETAConfig(include_modules=["*.attention.*"],
                                            exclude_modules=["*.output.dense"]))
    names = [n for n, _ in quant_layers(model)]
    assert names and all(".attention.self." in n for n in names)
    model, _ = build("bert")
    with pytest.raises(ValueError, match=r"GETAConfig.exclude_modules: pattern '\*nothing\*' matches no"):
        geta_hf.prepare_model(model, GETAConfig(exclude_modules=["*nothing*"]))
    with pytest.raises(ValueError, match=r"GETAConfig.include_modules"):
        geta_hf.prepare_model(model, GETAConfig(include_modules=["decoder.*"]))
    assert not quant_layers(model)  # a refused call leaves the model untouched
    with pytest.raises(TypeError, match="GETAConfig"):
        geta_hf.prepare_model(model, {"weight_bits": (4, 8)})


def test_activation_quantizers_need_calibration_data():
    model, make = build("llama")
    cfg = GETAConfig(activation_bits=(8, 16))
    geta_hf.prepare_model(model, cfg)
    assert not any(m.act_quantizer.calibrated for _, m in quant_layers(model))
    with pytest.raises(ValueError, match="no calibration batch"):
        calibrate_activations(model, [], cfg)
    ranges = calibrate_activations(model, _calib_batches(make, 3), cfg)
    # ranges come from the data, not from the weights
    for name, m in quant_layers(model):
        assert ranges[name] > 0
        assert m.act_quantizer.q_m.item() != pytest.approx(m.weight.abs().max().item())
    with pytest.raises(ValueError, match="activation_bits is None"):
        calibrate_activations(model, _calib_batches(make), GETAConfig())


def test_percentile_calibration_clips_outliers():
    model, make = build("bert")
    cfg_max = GETAConfig(activation_bits=(8, 16))
    geta_hf.prepare_model(model, cfg_max)
    r_max = calibrate_activations(model, _calib_batches(make), cfg_max)
    r_p = calibrate_activations(model, _calib_batches(make),
                                GETAConfig(activation_bits=(8, 16), act_calibration_percentile=90.0))
    assert all(r_p[k] < r_max[k] for k in r_max)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prepared_model_exports(family):
    model, make = build(family)
    cfg = GETAConfig(activation_bits=(8, 16))
    geta_hf.prepare_model(model, cfg, _calib_batches(make))
    inputs = make(0)
    ep = torch.export.export(model, (), inputs, strict=False)
    with torch.no_grad():
        ref = model(**inputs)
        out = ep.module()(**inputs)
    key = "logits" if family == "llama" else "start_logits"
    torch.testing.assert_close(out[key], ref[key])
    # the quantizer scalars are parameters of the exported program
    params = set(ep.graph_signature.inputs_to_parameters.values())
    assert any(p.endswith("weight_quantizer.d") for p in params)
    assert any(p.endswith("act_quantizer.q_m") for p in params)


def test_bypass_restores_float_behaviour():
    model, make = build("bert")
    inputs = make(0)
    with torch.no_grad():
        ref = model(**inputs).start_logits
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(2, 2)))
    with torch.no_grad():
        q = model(**inputs).start_logits
        with quantization_bypassed(model):
            b = model(**inputs).start_logits
    assert (q - ref).abs().max() > 1e-3
    torch.testing.assert_close(b, ref)


def test_prepared_model_trains_quant_scalars():
    model, make = build("llama")
    cfg = GETAConfig(weight_bits=(4, 8), activation_bits=(6, 8), quantizer="nonlinear")
    geta_hf.prepare_model(model, cfg, _calib_batches(make))
    inputs = make(0)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    for _, m in quant_layers(model):
        for q in (m.weight_quantizer, m.act_quantizer):
            for p in (q.d, q.q_m, q.t):
                assert p.grad is not None and torch.isfinite(p.grad)
    assert any(m.weight_quantizer.d.grad != 0 for _, m in quant_layers(model))
