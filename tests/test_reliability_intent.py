"""Reliability of user intent and of failures: what the user froze, configured or passed in is
respected, and a failing ``compress_model`` leaves the model exactly as it was.

Each case asserts the specific error (naming the field, flag, batch or layer) or the preserved
data.
"""

import dataclasses
import logging
import math
import pickle

import pytest
import torch
import transformers as tf
from torch import nn

import geta_hf
from geta_hf import GETAConfig, GETATrainingArguments, QASSO, build_qadg, prepare_model
from geta_hf.cli import main as cli_main
from geta_hf.compress import CompressionError
from geta_hf.compress import ARCH_ATTR
from geta_hf.graph import GraphCaptureError
from geta_hf.quant import QuantLinear, calibrate_activations, quant_layers

from tiny_models import build

SHORT = dict(target_group_sparsity=0.5, weight_bits=(4, 16), bit_reduction=4,
             projection_periods=3, warmup=4, projection=12, joint=15, pruning_periods=3)
LAYER0 = "bert.encoder.layer.0."


# ----------------------------------------------------------------------------- GETAConfig
def test_config_is_immutable_after_validation():
    bits, weights = [4, 8], {"magnitude": 1.0}
    cfg = GETAConfig(weight_bits=bits, importance_weights=weights, unprunable_modules=["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_bits = (8, 4)
    with pytest.raises(TypeError, match="immutable after validation"):
        cfg.importance_weights["magnitude"] = -1.0
    with pytest.raises(TypeError, match="immutable"):
        cfg.importance_weights.update(avg_magnitude=1.0)
    bits[0], weights["magnitude"] = 16, 0.0  # the caller's objects are not referenced
    assert cfg.weight_bits == (4, 8) and cfg.importance_weights == {"magnitude": 1.0}
    assert isinstance(cfg.unprunable_modules, tuple)


def test_replace_validates_and_configs_copy_and_pickle():
    cfg = GETAConfig(weight_bits=(4, 8))
    with pytest.raises(ValueError, match=r"GETAConfig.weight_bits: got \(8, 4\)"):
        dataclasses.replace(cfg, weight_bits=(8, 4))
    other = dataclasses.replace(cfg, target_group_sparsity=0.3)
    assert other.target_group_sparsity == 0.3 and cfg.target_group_sparsity == 0.5
    assert cfg.diff(other) == {"target_group_sparsity": (0.5, 0.3)}
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and hash(back) == hash(cfg) and len({cfg, back, other}) == 2


@pytest.mark.parametrize("text,match", [
    ('{"quant_lr": 0.1, "quant_lr": 0.2}', r"GETAConfig.from_json: key 'quant_lr' appears twice"),
    ('{"importance_weights": {"magnitude": 1.0, "magnitude": 0.0}}',
     r"key 'magnitude' appears twice"),
])
def test_duplicate_json_keys_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        GETAConfig.from_json(text)


@pytest.mark.parametrize("argv,match", [
    (["--geta_importance_weights", "magnitude=0.5,magnitude=0.3"],
     r"geta_importance_weights: 'magnitude' is given twice"),
    (["--geta_warmup", "inf"], r"--geta_warmup=inf is invalid; allowed: a fraction in \[0, 1\] or "
                               r"a whole number of steps > 1"),
    (["--geta_joint", "nan"], r"--geta_joint=nan is invalid"),
    (["--geta_projection=-inf"], r"--geta_projection=-inf is invalid"),
], ids=["duplicate-importance", "warmup-inf", "joint-nan", "projection-minus-inf"])
def test_bad_flags_are_named_at_parse_time(argv, match):
    parser = tf.HfArgumentParser(GETATrainingArguments)
    with pytest.raises(ValueError, match=match):
        parser.parse_args_into_dataclasses(args=["--output_dir", "x", *argv])


def test_new_flags_reach_the_config():
    parser = tf.HfArgumentParser(GETATrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", "x", "--geta_compress_frozen", "--geta_restart_compression_on_resume"])
    assert args.to_geta_config().compress_frozen is True
    assert args.geta_restart_compression_on_resume is True
    with pytest.raises(ValueError, match="GETAConfig.compress_frozen: got 'yes'; allowed: True or False"):
        GETAConfig(compress_frozen="yes")


# ----------------------------------------------------------------------------- frozen parameters
def _freeze_layer0(model):
    """Freeze layer 0's weights and biases (its quantizer scalars, if any, stay trainable)."""
    for n, p in model.named_parameters():
        if n.startswith(LAYER0) and "quantizer" not in n:
            p.requires_grad_(False)


def test_frozen_layers_are_neither_quantized_nor_pruned(caplog):
    model, make = build("bert")
    _freeze_layer0(model)
    cfg = GETAConfig(**SHORT)
    with caplog.at_level(logging.INFO):
        prepare_model(model, cfg)
        qadg = build_qadg(model, make(0), cfg)
    names = [n for n, _ in quant_layers(model)]
    assert names and not any(n.startswith(LAYER0) for n in names)
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert not any(f.layer.startswith(LAYER0.rstrip(".")) for f in qadg.families)
    assert {f.name for f in qadg.families} == {"bert.encoder.layer.1.attention.heads",
                                               "bert.encoder.layer.1.channels"}
    assert "not quantizing 6 layer(s) with a frozen weight" in caplog.text
    assert "not pruning 2 families with frozen parameters" in caplog.text
    # opting in prunes and quantizes them too
    model2, make2 = build("bert")
    _freeze_layer0(model2)
    cfg2 = GETAConfig(**SHORT, compress_frozen=True)
    prepare_model(model2, cfg2)
    assert len(quant_layers(model2)) == len(names) + 6
    assert len(build_qadg(model2, make2(0), cfg2).families) == 4


def test_layer_frozen_after_prepare_keeps_weights_and_quantizers():
    """Frozen after the quantizers were inserted: 40 QASSO steps (all stages, pruning, bit
    freezing) leave its weights and quantizer scalars bit-identical."""
    model, make = build("bert")
    cfg = GETAConfig(**SHORT)
    prepare_model(model, cfg)
    _freeze_layer0(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(LAYER0)}
    assert any("weight_quantizer" in n and p.requires_grad  # trainable scalars, frozen weight
               for n, p in model.named_parameters() if n in before)
    qadg = build_qadg(model, make(0), cfg)
    opt = QASSO(model, qadg, cfg, lr=2e-3, total_steps=40)
    for k in range(40):
        pos = torch.arange(2) + 1
        model(**make(100 + k), start_positions=pos, end_positions=pos + 2).loss.backward()
        opt.step()
        opt.zero_grad()
    d = opt.describe()
    assert d["zero_units"] == opt.target_units > 0 and d["bits_frozen"]
    assert not any(n.startswith(LAYER0) for n in d["weight_bits"])
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_qadg_built_before_freezing_is_refused_naming_the_family():
    model, make = build("bert")
    cfg = GETAConfig(**SHORT)
    prepare_model(model, cfg)
    qadg = build_qadg(model, make(0), cfg)
    model.bert.encoder.layer[1].output.dense.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"family 'bert.encoder.layer.1.channels' of the qadg touches "
                       r"'bert.encoder.layer.1.output.dense.weight', which is frozen"):
        QASSO(model, qadg, cfg, lr=1e-3, total_steps=40)


def test_everything_frozen_names_the_way_out():
    model, make = build("bert")
    for p in model.bert.encoder.parameters():
        p.requires_grad_(False)
    with pytest.raises(GraphCaptureError, match=r"touch frozen parameters .*"
                                                        r"compress_frozen=True"):
        build_qadg(model, make(0), GETAConfig(**SHORT))


# ----------------------------------------------------------------------------- calibration data
def _act_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = GETAConfig(activation_bits=(8, 16), act_calibration_batches=4)
    prepare_model(model, cfg)
    return model, cfg


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_calibration_batch_is_named(bad):
    model, cfg = _act_model()
    batches = [torch.randn(4, 8) for _ in range(3)]
    batches[2][1, 3] = bad
    with pytest.raises(ValueError, match=r"calibration batch 2 \(0-based\) holds NaN or Inf in "
                                         r"input 'input'"):
        calibrate_activations(model, batches, cfg)
    assert not any(m.act_quantizer.calibrated for _, m in quant_layers(model))  # no range set
    good = calibrate_activations(model, batches[:2], cfg)
    assert all(math.isfinite(v) for v in good.values())


def test_calibration_batch_that_overflows_inside_names_the_layer():
    model, cfg = _act_model()
    hook = model[0].register_forward_hook(lambda m, i, o: o * math.inf)
    batches = [{"input": torch.randn(4, 8)}]
    with pytest.raises(ValueError, match=r"calibration batch 0 \(0-based\) gives a NaN or Inf "
                                         r"input to layer '2'"):
        calibrate_activations(model, [b["input"] for b in batches], cfg)
    hook.remove()
    assert not model[2].act_quantizer.calibrated


# ----------------------------------------------------------------------------- compress_model
def _zeroed_bert(seed=0, name="bert"):
    model, make = build(name)
    prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    qadg = build_qadg(model, make(0))
    g = torch.Generator().manual_seed(seed)
    qadg.zero_groups(model, torch.randperm(qadg.num_groups, generator=g)[: qadg.num_groups // 2].tolist())
    return model, make, qadg


def _fingerprint(model):
    """Everything compress_model may change: modules, parameter objects and values, attributes."""
    mods = {n: (type(m), dict(vars(m).items())) for n, m in model.named_modules()}
    attrs = {n: {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}
             for n, (_, d) in mods.items()}
    return ({n: t for n, (t, _) in mods.items()}, attrs,
            {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
            {n: id(getattr(m, "config", None)) for n, m in model.named_modules()})


def _assert_restored(model, ref):
    types, attrs, params, configs = _fingerprint(model)
    assert types == ref[0] and attrs == ref[1] and configs == ref[3]
    assert params.keys() == ref[2].keys()
    for n, (pid, val) in params.items():
        assert pid == ref[2][n][0], n
        torch.testing.assert_close(val, ref[2][n][1], rtol=0, atol=0, equal_nan=True)
    assert getattr(model, ARCH_ATTR, None) is None


def test_nan_weight_is_refused_naming_the_layer_and_nothing_changes():
    model, make, qadg = _zeroed_bert()
    w = model.bert.encoder.layer[1].output.dense.weight
    with torch.no_grad():
        w[0, 0] = math.nan
    ref = _fingerprint(model)
    with pytest.raises(ValueError, match=r"layer 'bert.encoder.layer.1.output.dense' holds NaN or "
                                         r"Inf in 'weight'; nothing was changed"):
        geta_hf.compress_model(model, qadg, example_inputs=make(0))
    _assert_restored(model, ref)
    with torch.no_grad():  # fixed: the retry compresses
        w[0, 0] = 0.0
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    assert getattr(model, ARCH_ATTR)["compressed"]


def test_failed_verification_restores_the_trained_model():
    model, make, qadg = _zeroed_bert(name="gpt2")
    inputs = make(3)
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    ref = _fingerprint(model)
    from geta_hf import registry

    names = registry._SHAPE_ATTRS["size"]  # simulate modeling code reading an attribute
    registry._SHAPE_ATTRS["size"] = tuple(n for n in names if n != "split_size")  # we miss
    try:
        with pytest.raises(CompressionError, match="left as it was before compress_model"):
            geta_hf.compress_model(model, qadg, example_inputs=make(0))
    finally:
        registry._SHAPE_ATTRS["size"] = names
    _assert_restored(model, ref)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, out)
    geta_hf.compress_model(model, qadg, example_inputs=make(0))  # the retry works: no "already compressed"
    with torch.no_grad():
        assert (model(**inputs).logits - out).abs().max() < 1e-3


@pytest.mark.parametrize("fail_at", [1, 7, 13], ids=["first-layer", "middle", "last-layer"])
def test_interrupt_while_packing_restores_the_model(monkeypatch, fail_at):
    model, make, qadg = _zeroed_bert()
    model.train()
    ref = _fingerprint(model)
    import geta_hf.compress.subnet as subnet

    calls = {"n": 0}
    real = subnet.pack_layer

    def flaky(layer):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("killed while packing")
        return real(layer)

    monkeypatch.setattr(subnet, "pack_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        geta_hf.compress_model(model, qadg, example_inputs=make(0))
    _assert_restored(model, ref)
    assert model.training and all(isinstance(m, QuantLinear) for _, m in quant_layers(model))
    monkeypatch.setattr(subnet, "pack_layer", real)
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    assert model.training and not quant_layers(model)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,match", [
    (["--batch", "0"], r"argument --batch: --batch 0 is out of range; allowed: an integer in \[1, "),
    (["--seq", "-3"], r"argument --seq: --seq -3 is out of range"),
    (["--batch", "two"], r"--batch 'two' is not an integer"),
    (["--batch", str(10 ** 30)], r"--batch 1000000000000000000000000000000 is out of range"),
])
def test_report_sizes_are_checked_by_the_parser(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(tmp_path), *argv])
    assert e.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_report_input_too_large_in_total(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path), "--batch", "100000", "--seq", "100000"]) == 2
    assert "10000000000 tokens; allowed: at most 16777216" in capsys.readouterr().err
