"""GETAConfig: validation with clear errors, schedule resolution, JSON round trip."""

import json

import pytest

from geta_hf import GETAConfig
from geta_hf.config import IMPORTANCE_CRITERIA

BAD = [
    (dict(target_group_sparsity=1.0), r"GETAConfig.target_group_sparsity: got 1.0; allowed: a number in \[0, 1\)"),
    (dict(target_group_sparsity=-0.1), r"target_group_sparsity.*\[0, 1\)"),
    (dict(target_group_sparsity=float("nan")), r"target_group_sparsity"),
    (dict(target_group_sparsity="0.5"), r"target_group_sparsity"),
    (dict(weight_bits=(8, 4)), r"GETAConfig.weight_bits: got \(8, 4\).*b_l <= b_u"),
    (dict(weight_bits=(1, 8)), r"weight_bits.*2 <= b_l <= b_u <= 16"),
    (dict(weight_bits=(4, 17)), r"weight_bits"),
    (dict(weight_bits=(4.0, 8)), r"weight_bits"),
    (dict(weight_bits=8), r"weight_bits"),
    (dict(weight_bits=None), r"weight_bits"),
    (dict(activation_bits=(16, 8)), r"activation_bits.*or None"),
    (dict(activation_bits=(4, 8, 16)), r"activation_bits"),
    (dict(bit_reduction=-1), r"bit_reduction.*>= 0"),
    (dict(quantizer="log"), r"GETAConfig.quantizer: got 'log'; allowed: 'linear' or 'nonlinear'"),
    (dict(warmup=1.5), r"GETAConfig.warmup: got 1.5"),
    (dict(projection=-3), r"GETAConfig.projection"),
    (dict(joint="10%"), r"GETAConfig.joint"),
    (dict(warmup=0.5, projection=0.4, joint=0.3), r"stage fractions sum to 1.2"),
    (dict(projection_periods=0), r"projection_periods.*>= 1"),
    (dict(pruning_periods=2.0), r"pruning_periods"),
    (dict(group_divisible=0), r"group_divisible"),
    (dict(min_units_per_family=0), r"min_units_per_family"),
    (dict(importance_weights={"magnitude": -1.0}), r"importance_weights\['magnitude'\].*>= 0"),
    (dict(importance_weights={"saliency": 1.0}), r"importance_weights.*keys among"),
    (dict(importance_weights={"magnitude": 0.0}), r"at least one weight > 0"),
    (dict(include_modules=[]), r"include_modules"),
    (dict(exclude_modules="*.dense"), r"exclude_modules.*list of glob patterns"),
    (dict(unprunable_modules=[3]), r"unprunable_modules"),
    (dict(quant_lr=0.0), r"quant_lr.*> 0"),
    (dict(act_calibration_percentile=0.0), r"act_calibration_percentile"),
    (dict(act_calibration_batches=0), r"act_calibration_batches"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(k) for k, _ in BAD])
def test_invalid_values_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GETAConfig(**kwargs)


def test_defaults_are_valid_and_documented_values():
    cfg = GETAConfig()
    assert cfg.target_group_sparsity == 0.5 and tuple(cfg.weight_bits) == (4, 16)
    assert cfg.activation_bits is None and cfg.quantizer == "linear" and not cfg.nonlinear
    assert set(cfg.importance_weights) == set(IMPORTANCE_CRITERIA)
    assert all(v == 0.2 for v in cfg.importance_weights.values())


@pytest.mark.parametrize("cfg", [
    GETAConfig(),
    GETAConfig(target_group_sparsity=0.3, weight_bits=(3, 8), activation_bits=(8, 16),
               quantizer="linear", warmup=10, projection=0.25, joint=40, projection_periods=3,
               pruning_periods=4, importance_weights={"magnitude": 1.0}, group_divisible=8,
               include_modules=["*.attention.*"], exclude_modules=["*.key"],
               unprunable_modules=["*.layer.0.*"], min_units_per_family=2, quant_lr=1e-4,
               act_calibration_batches=2, act_calibration_percentile=99.9),
])
def test_round_trip_through_dict_and_json(cfg):
    d = cfg.to_dict()
    json.dumps(d)  # JSON-safe
    assert GETAConfig.from_dict(d) == cfg
    again = GETAConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_dict() == d
    # ints stay ints (absolute steps) and floats stay floats (fractions)
    assert type(again.warmup) is type(cfg.warmup) and type(again.joint) is type(cfg.joint)


def test_from_dict_rejects_unknown_and_bad_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sparsity'\]"):
        GETAConfig.from_dict({"sparsity": 0.5})
    with pytest.raises(ValueError, match="weight_bits"):
        GETAConfig.from_dict({"weight_bits": [9, 3]})


def test_user_values_are_kept_as_immutable_copies():
    bits, pats = [4, 8], ["a*"]
    cfg = GETAConfig(weight_bits=bits, exclude_modules=pats)
    assert cfg.weight_bits == (4, 8) and cfg.exclude_modules == ("a*",)  # same values, as tuples
    bits[0], pats[0] = 16, "b*"  # the caller's lists are not referenced
    assert cfg.weight_bits == (4, 8) and cfg.exclude_modules == ("a*",)


def test_schedule_from_fractions_and_absolute_steps():
    s = GETAConfig(warmup=0.1, projection=0.2, joint=0.4).resolve_schedule(100)
    assert (s.warmup_end, s.projection_end, s.joint_end, s.cooldown_steps) == (10, 30, 70, 30)
    assert [s.stage(k) for k in (0, 9, 10, 29, 30, 69, 70, 99)] == [
        "warmup", "warmup", "projection", "projection", "joint", "joint", "cooldown", "cooldown"]
    s = GETAConfig(warmup=0, projection=5, joint=0.5).resolve_schedule(20)
    assert (s.warmup_steps, s.projection_steps, s.joint_steps, s.cooldown_steps) == (0, 5, 10, 5)
    s = GETAConfig(warmup=0.0, projection=0.0, joint=0.0).resolve_schedule(3)
    assert s.stage(0) == "cooldown"
    with pytest.raises(ValueError, match=r"need 60 steps .* total_steps=50"):
        GETAConfig(warmup=20, projection=20, joint=20).resolve_schedule(50)
    with pytest.raises(ValueError, match="total_steps"):
        GETAConfig().resolve_schedule(0)


def test_training_arguments_are_generated_from_every_config_field(tmp_path):
    """Config in one place: each GETAConfig field is a --geta_<field> flag with GETAConfig's
    default and help text, and the defaults give back GETAConfig()."""
    import dataclasses

    import transformers as tf

    from geta_hf import GETAConfig, GETATrainingArguments

    flags = {f.name: f for f in dataclasses.fields(GETATrainingArguments)}
    for f in dataclasses.fields(GETAConfig):
        assert f"geta_{f.name}" in flags, f.name
        assert f.metadata.get("help") and flags[f"geta_{f.name}"].metadata["help"] == f.metadata["help"]
    args = GETATrainingArguments(output_dir=str(tmp_path))
    assert args.to_geta_config() == GETAConfig()
    parser = tf.HfArgumentParser(GETATrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--geta_importance_source", "update", "--geta_joint",
         "30", "--geta_exclude_modules", "qa_outputs", "--geta_activation_bits", "8", "16"])
    cfg = parsed.to_geta_config()
    assert cfg == GETAConfig(importance_source="update", joint=30, exclude_modules=("qa_outputs",),
                             activation_bits=(8, 16))
