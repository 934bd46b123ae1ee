"""Reliability on bad input: arguments, module patterns, models GETA cannot or need not prune.

Each case asserts the specific error (naming the field, flag or module and what is allowed) or
the documented, logged safe behaviour. Field-by-field GETAConfig validation is in test_config.py.
"""

import logging

import pytest
import torch
import transformers as tf
from torch import nn

import geta_hf
from geta_hf import GETAConfig, GETATrainingArguments, QASSO, build_qadg, prepare_model
from geta_hf.graph import GraphCaptureError

from tiny_models import build


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv,match", [
    (["--geta_target_group_sparsity", "1.5"],
     r"--geta_target_group_sparsity \(GETAConfig.target_group_sparsity\): got 1.5; allowed"),
    (["--geta_weight_bits", "8", "4"], r"--geta_weight_bits .*b_l <= b_u"),
    (["--geta_weight_bits", "4"], r"--geta_weight_bits"),
    (["--geta_activation_bits", "8", "32"], r"--geta_activation_bits"),
    (["--geta_warmup", "0.6", "--geta_projection", "0.6"], r"stage fractions sum to 1.3; allowed: a sum <= 1"),
    (["--geta_importance_weights", "magnitude=lots"], r"geta_importance_weights: 'lots' is not a number"),
], ids=["sparsity", "bits-order", "one-bit-value", "act-bits-32", "stages-overflow", "weights-text"])
def test_bad_command_line_values_fail_at_parse_time(argv, match):
    parser = tf.HfArgumentParser(GETATrainingArguments)
    with pytest.raises(ValueError, match=match):
        parser.parse_args_into_dataclasses(args=["--output_dir", "x", *argv])


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    parser = tf.HfArgumentParser(GETATrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", "x", "--geta_quantizer", "log"])
    assert "invalid choice: 'log'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- module patterns
@pytest.mark.parametrize("field,value,match", [
    ("include_modules", ("*.no_such_module",), r"GETAConfig.include_modules: pattern '\*.no_such_module' "
                                               r"matches no quantizable module \(Linear, Conv1D\) of BertForQuestionAnswering"),
    ("exclude_modules", ("decoder.*",), r"GETAConfig.exclude_modules: pattern 'decoder.\*' matches no"),
    ("exclude_modules", ("*",), r"no quantizable layer \(Linear, Conv1D\) of BertForQuestionAnswering was "
                                       r"selected"),
])
def test_patterns_that_match_nothing_or_everything(field, value, match):
    model, _ = build("bert")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        prepare_model(model, GETAConfig(**{field: value}))
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()  # left untouched
    assert not any(hasattr(m, "weight_quantizer") for m in model.modules())


def test_unprunable_pattern_that_matches_nothing():
    model, make = build("bert")
    with pytest.raises(ValueError, match=r"mark_unprunable: 'encoder.nothing.\*' matches no module"):
        build_qadg(model, make(0), GETAConfig(unprunable_modules=("encoder.nothing.*",)))


def test_absolute_stage_lengths_longer_than_the_run():
    cfg = GETAConfig(weight_bits=(4, 8), warmup=30, projection=30, joint=30)
    model, make = build("bert")
    prepare_model(model, cfg)
    with pytest.raises(ValueError, match=r"total_steps|do not fit"):
        QASSO(model, build_qadg(model, make(0), cfg), cfg, lr=1e-3, total_steps=50)


# ----------------------------------------------------------------------------- models
class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        if h.sum() > 0:  # data-dependent Python control flow
            h = h * 2
        return self.down(h)


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def test_untraceable_model_names_the_model_and_the_way_out():
    with pytest.raises(GraphCaptureError, match=r"torch.export could not capture _Branchy"):
        build_qadg(_Branchy(), {"x": torch.randn(2, 8)})


def test_no_prunable_unit_with_a_sparsity_target_is_an_error():
    with pytest.raises(GraphCaptureError, match=r"found no prunable .* in _OneLinear.*"
                                                r"target_group_sparsity=0 \(quantization only\)"):
        build_qadg(_OneLinear(), {"x": torch.randn(2, 8)}, GETAConfig(target_group_sparsity=0.3))


def test_no_prunable_unit_is_fine_for_quantization_only(caplog):
    cfg = GETAConfig(target_group_sparsity=0.0, weight_bits=(4, 8), warmup=2, projection=4,
                     joint=2, projection_periods=2, pruning_periods=1)
    model = prepare_model(_OneLinear(), cfg)
    with caplog.at_level(logging.WARNING, logger="geta_hf.graph.qadg"):
        qadg = build_qadg(model, {"x": torch.randn(2, 8)}, cfg)
    assert qadg.num_groups == 0 and "has no prunable unit" in caplog.text
    opt = QASSO(model, qadg, cfg, lr=1e-2, total_steps=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        model(torch.randn(4, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    d = opt.describe()
    assert d["bits_frozen"] and 4 <= d["weight_bits"]["lin"] <= 8
    geta_hf.compress_model(model, qadg, example_inputs={"x": torch.randn(2, 8)})
    assert model.lin.weight_packed.dtype == torch.uint8


def test_weights_shared_across_layers_prune_together():
    """ALBERT shares one layer's weights across all blocks: its units form one family each, and
    removing a unit removes it from every block (the function stays exact)."""
    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    model = tf.AlbertForQuestionAnswering(cfg).eval()
    inputs = {"input_ids": torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))}
    qadg = build_qadg(model, inputs)
    assert sorted((f.kind, f.num_units) for f in qadg.families) == [("channels", 48), ("heads", 4)]
    qadg.zero_groups(model, [0, 1, 10, 11, 12])
    with torch.no_grad():
        ref = model(**inputs).start_logits
    n_before = sum(p.numel() for p in model.parameters())
    geta_hf.compress_model(model, qadg, example_inputs=inputs)
    with torch.no_grad():
        out = model(**inputs).start_logits
    assert (out - ref).abs().max() <= 1e-5
    assert n_before - sum(p.numel() for p in model.parameters()) == \
        2 * qadg.families[0].params_per_unit + 3 * qadg.families[1].params_per_unit


def test_sparsity_that_would_empty_a_layer_keeps_min_units(caplog):
    cfg = GETAConfig(target_group_sparsity=0.99, weight_bits=(8, 8), warmup=1, projection=1,
                     joint=4, projection_periods=1, pruning_periods=2, min_units_per_family=2)
    model, make = build("llama")
    prepare_model(model, cfg)
    qadg = build_qadg(model, make(0), cfg)
    opt = QASSO(model, qadg, cfg, lr=1e-3, total_steps=8)
    with caplog.at_level(logging.WARNING, logger="geta_hf.optim.qasso"):
        for k in range(8):
            model(**make(k), labels=make(k)["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()
    assert f"of the K={opt.target_units} units asked for" in caplog.text
    norms = qadg.group_norms(model)
    for f in qadg.families:  # never below the floor: no layer loses all its heads or channels
        assert int((norms[f.offset:f.offset + f.num_units] != 0).sum()) == min(2, f.num_units)
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    assert torch.isfinite(model(**make(5)).logits).all()


def test_qadg_of_another_model_is_refused():
    model, make = build("bert")
    other, other_make = build("llama")
    qadg = build_qadg(other, other_make(0))
    with pytest.raises(ValueError, match=r"(?i)qadg|does not match"):
        geta_hf.compress_model(model, qadg)


def test_uncalibrated_input_quantizers_are_refused_before_compression(tmp_path):
    """Compressing with input quantizers never calibrated used to save a checkpoint that
    from_pretrained refused; now compress_model names the layer and changes nothing."""
    model, make = build("bert")
    cfg = GETAConfig(weight_bits=(4, 8), activation_bits=(8, 16))
    prepare_model(model, cfg)  # no calibration batches
    qadg = build_qadg(model, make(0), cfg)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"never calibrated \(first: 'bert\.encoder"):
        geta_hf.compress_model(model, qadg)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    geta_hf.calibrate_activations(model, [make(1)], cfg)
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    geta_hf.save_compressed(model, str(tmp_path))
    type(model).from_pretrained(str(tmp_path))  # loads (it used to raise CheckpointError)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_counts_and_tolerances_are_named(bad):
    """Values that used to be clamped or ignored (min_units=0 became 1, max_batches=0 the
    default, atol=nan made every output comparison pass) are refused by name."""
    model, make = build("bert")
    cfg = GETAConfig(weight_bits=(4, 8), activation_bits=(8, 16))
    with pytest.raises(ValueError, match="min_units="):
        build_qadg(model, make(0), min_units=bad)
    prepare_model(model, cfg)
    with pytest.raises(ValueError, match="max_batches="):
        geta_hf.calibrate_activations(model, [make(1)], cfg, max_batches=bad)
    geta_hf.calibrate_activations(model, [make(1)], cfg)
    qadg = build_qadg(model, make(0), cfg)
    for atol in (float("nan"), -1e-4, float("inf")):
        with pytest.raises(ValueError, match="atol="):
            geta_hf.compress_model(model, qadg, example_inputs=make(0), atol=atol)


def test_calibration_data_without_input_quantization_is_refused():
    model, make = build("bert")
    with pytest.raises(ValueError, match="calibration_data was given but GETAConfig.activation_bits"):
        prepare_model(model, GETAConfig(weight_bits=(4, 8)), [make(1)])
    assert not geta_hf.quant.quant_layers(model)  # nothing was changed


def test_unit_ids_out_of_range():
    model, make = build("bert")
    qadg = build_qadg(model, make(0))
    with pytest.raises(IndexError, match=rf"unit ids must lie in \[0, {qadg.num_groups}\)"):
        qadg.zero_groups(model, [qadg.num_groups])


def test_preparing_twice_with_other_settings():
    model, _ = build("bert")
    prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    with pytest.raises(ValueError, match="already prepared with different quantization settings"):
        prepare_model(model, GETAConfig(weight_bits=(2, 4)))


def test_trainer_without_a_usable_dataset(tmp_path):
    from test_trainer import geta_args, tiny_bert_qa

    with pytest.raises(ValueError, match="a train_dataset is needed"):
        geta_hf.GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path))
    with pytest.raises(ValueError, match="produced no batch"):
        geta_hf.GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path), train_dataset=[])


def test_user_hooks_survive_quantization_and_compression():
    """Hooks registered on a layer keep firing after prepare_model and compress_model swap it."""
    model, make = build("bert")
    layer = model.bert.encoder.layer[0].intermediate.dense
    seen = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(type(mod).__name__))
    pre = layer.register_forward_pre_hook(lambda mod, inp: None)
    prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    model(**make(1))
    assert seen == ["QuantLinear"]
    pre.remove()  # handles registered before the swap still work
    qadg = build_qadg(model, make(0))
    seen.clear()
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    seen.clear()
    model(**make(1))
    assert seen == ["PackedQuantLinear"]
    handle.remove()
    model(**make(1))
    assert seen == ["PackedQuantLinear"]


def test_multi_query_attention_heads_prune_exactly():
    """MQA (one shared key/value head): a query head's unit also owns its o_proj columns, since
    zero query rows alone give uniform attention, not a zero output (found by the property test)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=8, max_position_embeddings=32,
                         pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    qadg = build_qadg(model, {"input_ids": ids})
    heads = [f for f in qadg.families if f.kind == "heads"]
    assert len(heads) == 2 and all(f.num_units == 4 for f in heads)
    assert {(m.param.split(".")[-2], m.dim) for m in heads[0].members} == {("q_proj", 0), ("o_proj", 1)}
    qadg.zero_groups(model, [heads[0].offset, heads[0].offset + 2, heads[1].offset + 1])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    geta_hf.compress_model(model, qadg, example_inputs={"input_ids": ids})
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 8 and attn.num_key_value_groups == 2
