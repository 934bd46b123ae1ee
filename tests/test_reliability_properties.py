"""Property-based tests (hypothesis): the quantizer, the bit math, the config round trip, and
random-zero-then-compress equality on random tiny configs of real HF architectures."""

import json
import math

import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geta_hf import GETAConfig, build_qadg, compress_model, prepare_model
from geta_hf.config import IMPORTANCE_CRITERIA
from geta_hf.quant.functional import bit_width, d_for_bits, fake_quantize

from test_compress import _expected_shapes, _outputs

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EXTREMES = [0.0, -0.0, 1e-40, -1e-40, 1e-12, 1e30, -1e30, 3.0e38, -3.0e38]


# ----------------------------------------------------------------------------- quantizer
@st.composite
def quant_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
    bits = draw(st.integers(2, 16))
    q_m = draw(st.floats(1e-4, 1e4))
    t = draw(st.one_of(st.none(), st.floats(0.5, 2.0)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.floats(1e-3, 1e3))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if x.numel():  # plant extreme values
        flat = x.view(-1)
        for i, v in enumerate(draw(st.lists(st.sampled_from(EXTREMES), max_size=3))):
            flat[i % flat.numel()] = v
    return x.to(dtype), bits, q_m, t


@FAST
@given(quant_case())
def test_quantizer_levels_range_sign_and_finite_gradients(case):
    x, bits, q_m, t = case
    dtype = x.dtype
    # the scalars are float32, as GETAQuantizer holds them, whatever the tensor's dtype
    q = torch.tensor(q_m, dtype=torch.float32, requires_grad=True)
    tt = None if t is None else torch.tensor(t, dtype=torch.float32, requires_grad=True)
    d = d_for_bits(bits, q.detach(), None if tt is None else tt.detach()).requires_grad_()
    x = x.clone().requires_grad_()
    y = fake_quantize(x, d, q, tt)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert ((y * x.detach()) >= 0).all()  # sign kept (0 stays 0)
    n_max = 2 ** (bits - 1) - 1
    # the grid, computed where the quantizer computes it (in the tensor's dtype)
    d_x = float(d.detach().to(dtype))
    levels = y.detach().double() / d_x
    if dtype == torch.bfloat16:  # 8 mantissa bits: the clip level itself may round up by one
        assert (levels.abs() <= n_max + 1 + 1e-2 * n_max).all()
    else:
        eps = torch.finfo(dtype).eps
        assert (levels.abs() <= n_max * (1 + 8 * eps) + 1e-3).all()  # never beyond the clip
        assert ((levels - levels.round()).abs() <= 1e-3 + 8 * eps * levels.abs()).all()  # a grid
        assert torch.unique(y.detach()).numel() <= 2 * n_max + 1
    y.float().sum().backward()
    for name, v in (("x", x), ("d", d), ("q_m", q), ("t", tt)):
        if v is not None:
            assert torch.isfinite(v.grad).all(), name


@FAST
@given(st.floats(2.0, 16.0), st.floats(1e-4, 1e4), st.one_of(st.none(), st.floats(0.5, 2.0)))
def test_bit_math_round_trips(bits, q_m, t):
    d = d_for_bits(torch.tensor(bits, dtype=torch.float64), torch.tensor(q_m, dtype=torch.float64),
                   t)
    assert d > 0
    assert abs(float(bit_width(d, torch.tensor(q_m, dtype=torch.float64), t)) - bits) < 1e-9
    # more bits, finer step
    d2 = d_for_bits(torch.tensor(min(bits + 1, 16.0), dtype=torch.float64),
                    torch.tensor(q_m, dtype=torch.float64), t)
    assert d2 <= d


# ----------------------------------------------------------------------------- config
@st.composite
def valid_config(draw):
    bits = sorted(draw(st.lists(st.integers(2, 16), min_size=2, max_size=2)))
    act = draw(st.one_of(st.none(), st.lists(st.integers(2, 16), min_size=2, max_size=2).map(sorted)))
    fractions = draw(st.lists(st.floats(0.0, 0.33), min_size=3, max_size=3))
    weights = draw(st.dictionaries(st.sampled_from(IMPORTANCE_CRITERIA), st.floats(0.0, 5.0),
                                   min_size=1))
    if not any(v > 0 for v in weights.values()):
        weights[IMPORTANCE_CRITERIA[0]] = 1.0
    pattern = st.text("abc.*", min_size=1, max_size=6)
    return GETAConfig(
        target_group_sparsity=draw(st.floats(0.0, 0.99)), weight_bits=tuple(bits),
        activation_bits=None if act is None else tuple(act),
        bit_reduction=draw(st.integers(0, 8)), quantizer=draw(st.sampled_from(["linear", "nonlinear"])),
        warmup=fractions[0], projection=fractions[1], joint=fractions[2],
        projection_periods=draw(st.integers(1, 10)), pruning_periods=draw(st.integers(1, 10)),
        importance_weights=weights, group_divisible=draw(st.integers(1, 8)),
        exclude_modules=tuple(draw(st.lists(pattern, max_size=2))),
        unprunable_modules=tuple(draw(st.lists(pattern, max_size=2))),
        min_units_per_family=draw(st.integers(1, 4)), quant_lr=draw(st.floats(1e-6, 1.0)))


@FAST
@given(valid_config())
def test_config_round_trips_through_dict_and_json(cfg):
    assert GETAConfig.from_dict(cfg.to_dict()) == cfg
    assert GETAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _assert_refused(field, value, allowed):
    try:
        GETAConfig(**{field: value})
    except ValueError as e:
        assert f"GETAConfig.{field}" in str(e) and allowed in str(e), str(e)
    else:
        raise AssertionError(f"accepted {field}={value!r}")


@FAST
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v < 1),
                 st.text(max_size=3), st.none()))
def test_any_bad_sparsity_is_a_value_error_naming_the_field(value):
    _assert_refused("target_group_sparsity", value, "allowed: a number in [0, 1)")


@FAST
@given(st.tuples(st.integers(-4, 40), st.integers(-4, 40)).filter(
    lambda b: not 2 <= b[0] <= b[1] <= 16))
def test_any_bad_bit_range_is_a_value_error_naming_the_field(bits):
    _assert_refused("weight_bits", bits, "2 <= b_l <= b_u <= 16")


# ----------------------------------------------------------------------------- compression
@st.composite
def tiny_model(draw):
    kind = draw(st.sampled_from(["bert", "llama"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    common = dict(vocab_size=64, hidden_size=heads * head_dim, num_hidden_layers=draw(st.integers(1, 2)),
                  num_attention_heads=heads, intermediate_size=draw(st.integers(3, 24)),
                  max_position_embeddings=32)
    torch.manual_seed(draw(st.integers(0, 1000)))
    if kind == "bert":
        model = tf.BertForQuestionAnswering(tf.BertConfig(**common))
    else:
        kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=kv, pad_token_id=0))
    return model.eval()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@SLOW
@given(tiny_model(), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_random_zero_then_compress_is_exact(model, fraction, quantize, seed):
    if quantize:
        prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    qadg = build_qadg(model, _inputs(0))
    g = torch.Generator().manual_seed(seed)
    removed = []
    for f in qadg.families:  # any number of units, but never the last one of a family
        k = min(math.floor(fraction * f.num_units), f.num_units - f.min_units)
        removed += (torch.randperm(f.num_units, generator=g)[:k] + f.offset).tolist()
    qadg.zero_groups(model, removed)
    expected = _expected_shapes(qadg, model, removed)
    ref = [_outputs(model, _inputs(s)) for s in (1, 2)]
    compress_model(model, qadg, example_inputs=_inputs(0))
    for s, r in zip((1, 2), ref):
        for a, b in zip(_outputs(model, _inputs(s)), r):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    if not quantize:  # float: every parameter has exactly the analytical shape
        assert {n: list(p.shape) for n, p in model.named_parameters()} == expected
