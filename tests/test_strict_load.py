"""Strict loading of compressed checkpoints (issue 19): the whole checkpoint is validated before
anything is built from it, and every error names the layer, field or tensor.

The property test at the end corrupts a saved checkpoint at random (a config field, a tensor, or
the integrity record) and requires a refusal naming what was changed, or a model whose outputs
equal the original's.
"""

import json
import logging
import math
import random
import shutil

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file

import geta_hf
from geta_hf import CheckpointError
from geta_hf.hf.integrity import RECORD_KEY

from test_checkpoint import _compress_randomly
from tiny_models import build

SELF = "bert.encoder.layer.0.attention.self"
QUERY = SELF + ".query"                          # 32 -> 16 outputs (heads pruned)
OUT = "bert.encoder.layer.0.attention.output.dense"  # 16 of 32 inputs kept


def _compress(model, make, seed=0):
    """Input quantizers (linear), weight bits 3..8 at random (4 for OUT), half of every family
    zeroed."""
    return _compress_randomly(model, make, seed, fixed_bits={OUT: 4})


def _load(path):
    return tf.AutoModelForQuestionAnswering.from_pretrained(str(path))


def _outputs(model, inputs):
    with torch.no_grad():
        out = model.eval()(**inputs)
    return [out.start_logits, out.end_logits]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A saved compressed tiny BERT, the inputs and the outputs of its reloaded model."""
    model, make = build("bert")
    cfg = _compress(model, make)
    path = tmp_path_factory.mktemp("strict") / "good"
    geta_hf.save_compressed(model, str(path), geta_config=cfg.to_dict(), base_model="tiny-bert")
    inputs = make(3)
    return path, inputs, _outputs(_load(path), inputs)


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, dict(h.metadata())


def _variant(good_path, dst, config=None, tensors=None):
    """A copy of the good checkpoint; ``config(qcfg)`` edits the quantization_config,
    ``tensors(tensors, metadata)`` edits the tensor dict / metadata in place."""
    shutil.copytree(good_path, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        ts, meta = _tensors(dst)
        tensors(ts, meta)
        save_file(ts, str(dst / "model.safetensors"), metadata=meta)
    return dst


def _refused(good_path, tmp_path, match, **edits):
    with pytest.raises(CheckpointError, match=match):
        _load(_variant(good_path, tmp_path / "bad", **edits))


# ----------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("name", [QUERY + ".weight_packed", QUERY + ".bias",
                                  QUERY + ".act_quantizer.q_m",
                                  "bert.embeddings.word_embeddings.weight"],
                         ids=["codes", "packed-bias", "input-range", "embedding"])
def test_missing_tensor_is_refused(good, tmp_path, name):
    """Before: a missing tensor silently kept its initial value."""
    _refused(good[0], tmp_path, rf"tensor '{name}' is missing from the checkpoint",
             tensors=lambda ts, meta: ts.pop(name))


@pytest.mark.parametrize("name,match", [
    ("bert.pooler.extra", r"holds tensor 'bert\.pooler\.extra', which the quantization_config does not imply"),
    (QUERY + ".act_quantizer.t", rf"layers\['{QUERY}'\]\.act\.t is null .* holds tensor '{QUERY}\.act_quantizer\.t'"),
], ids=["unknown-name", "exponent-of-a-linear-input-quantizer"])
def test_extra_tensor_is_refused(good, tmp_path, name, match):
    _refused(good[0], tmp_path, match, tensors=lambda ts, meta: ts.update({name: torch.ones(())}))


@pytest.mark.parametrize("leaf,value,field", [
    ("weight_exponent", math.nan, "weight_exponent"),
    ("act_quantizer.d", math.inf, r"act\.d"),
    ("weight_scale", -0.25, "weight_scale"),
], ids=["nan-exponent", "inf-input-step", "negative-step"])
def test_non_finite_or_negative_scalar_tensor_is_refused(good, tmp_path, leaf, value, field):
    """Before: a NaN exponent loaded and the model output NaN."""
    _refused(good[0], tmp_path,
             rf"tensor '{QUERY}\.{leaf}' \(quantization_config\.layers\['{QUERY}'\]\.{field}\) "
             r"holds .*; allowed: a finite number > 0",
             tensors=lambda ts, meta: ts[f"{QUERY}.{leaf}"].fill_(value))


def test_codes_outside_the_symmetric_range_are_refused(good, tmp_path):
    """All-zero bytes decode to -2^(b-1), one below the format's symmetric range."""
    bits = json.loads((good[0] / "config.json").read_text())["quantization_config"]["layers"][QUERY]["weight_bits"]
    low = -(1 << (bits - 1))
    _refused(good[0], tmp_path,
             rf"'{QUERY}\.weight_packed': code #0 decodes to {low}, outside the symmetric range "
             rf"\+-{-low - 1} of quantization_config\.layers\['{QUERY}'\]\.weight_bits = {bits}",
             tensors=lambda ts, meta: ts[QUERY + ".weight_packed"].zero_())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8, 11, 16])
def test_find_code_agrees_with_unpacking(bits):
    """The range check reads codes straight from the packed bytes; it finds exactly the codes
    unpack_codes decodes, including raw zeros (-2^(b-1)) and not the padding after the last."""
    from geta_hf.compress.bitpack import find_code, pack_codes, unpack_codes

    g = torch.Generator().manual_seed(bits)
    half = 1 << (bits - 1)
    for n in (1, 7, 9, 301):
        packed = pack_codes(torch.randint(-half + 1, half, (n,), generator=g), bits)
        for i in torch.randint(0, n, (2,), generator=g).tolist():  # clear code i: raw value 0
            for b in range(i * bits, (i + 1) * bits):
                packed[b // 8] &= 0xFF ^ (1 << (b % 8))
        codes = unpack_codes(packed, bits, n)
        for code in (-half, 0, half - 1):
            hit = torch.nonzero(codes == code).view(-1)
            assert find_code(packed, bits, n, code) == (int(hit[0]) if hit.numel() else -1,
                                                         hit.numel()), (n, code)


@pytest.mark.parametrize("kind", ["dtype", "shape"])
def test_tensor_dtype_or_shape_change_is_refused(good, tmp_path, kind):
    name = "bert.embeddings.LayerNorm.weight"

    def edit(ts, meta):
        ts[name] = ts[name].half() if kind == "dtype" else torch.cat([ts[name], ts[name][:1]])

    match = (rf"tensor '{name}' in model\.safetensors: dtype F16 shape \[32\], but it was saved as float32"
             if kind == "dtype" else rf"tensor '{name}' in model\.safetensors: shape \[33\], but")
    _refused(good[0], tmp_path, match, tensors=edit)


def test_changed_values_are_caught_by_the_digest(good, tmp_path):
    name = "bert.encoder.layer.1.output.LayerNorm.bias"
    _refused(good[0], tmp_path, rf"tensor '{name}' in model\.safetensors: its values differ .*SHA-256",
             tensors=lambda ts, meta: ts[name].view(-1)[3].add_(1e-6))


def test_integrity_record_is_required_from_format_version_2(good, tmp_path):
    _refused(good[0], tmp_path, r"no GETA integrity record \(safetensors metadata 'geta'\)",
             tensors=lambda ts, meta: meta.pop(RECORD_KEY))


def test_format_version_1_without_record_loads_with_a_warning(good, tmp_path, caplog):
    """Checkpoints written before the record existed still load (structure and ranges checked)."""
    path = _variant(good[0], tmp_path / "v1", config=lambda q: q.update(format_version=1),
                    tensors=lambda ts, meta: meta.pop(RECORD_KEY))
    with caplog.at_level(logging.WARNING, logger="geta_hf.hf.integrity"):
        model = _load(path)
    assert "format_version 1 checkpoint carries no integrity record" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, good[1]), good[2]))
    with pytest.raises(CheckpointError, match=rf"'{QUERY}\.weight_packed': code #0"):
        _load(_variant(good[0], tmp_path / "v1bad", config=lambda q: q.update(format_version=1),
                       tensors=lambda ts, meta: (meta.pop(RECORD_KEY),
                                                 ts[QUERY + ".weight_packed"].zero_())))


def test_sharded_checkpoint_is_validated_across_its_files(good, tmp_path):
    """Each shard carries the record; a tensor moved between shards' names is still caught."""
    model = _load(good[0])
    path = tmp_path / "sharded"
    model.save_pretrained(str(path), max_shard_size="20KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert all(torch.equal(a, b) for a, b in zip(_outputs(_load(path), good[1]), good[2]))
    with safe_open(str(path / shards[0]), framework="pt") as h:
        ts, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    name = sorted(ts)[0]
    ts[name] = ts[name].clone()
    ts[name].view(-1)[0] = 7.0
    save_file(ts, str(path / shards[0]), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in {shards[0]}: its values differ"):
        _load(path)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("edit,match", [
    (lambda q: q["layers"][QUERY].update(act=None),
     rf"layers\['{QUERY}'\]\.act is null, but .*param_shapes\['{QUERY}\.act_quantizer\.d'\]"),
    (lambda q: q["layers"][QUERY].update(bias=False),
     rf"layers\['{QUERY}'\]\.bias is false, but .*param_shapes\['{QUERY}\.bias'\]"),
], ids=["act-null", "bias-false"])
def test_config_tensor_disagreement_is_refused(good, tmp_path, edit, match):
    """Before: tensors the config did not mention were dropped silently."""
    _refused(good[0], tmp_path, match, config=edit)


@pytest.mark.parametrize("record", [True, False], ids=["with-record", "format-1-no-record"])
def test_config_tensor_disagreement_is_refused_even_when_the_shapes_agree(good, tmp_path, record):
    """act null, its parameters also gone from param_shapes: the tensors still exist."""
    def edit(q):
        q["layers"][QUERY]["act"] = None
        for k in ("d", "q_m"):
            q["architecture"]["param_shapes"].pop(f"{QUERY}.act_quantizer.{k}")
        if not record:
            q["format_version"] = 1

    match = (rf"layers\['{QUERY}'\]\.act = None but the checkpoint was saved with \{{'bits'" if record
             else rf"layers\['{QUERY}'\]\.act is null, but model\.safetensors holds tensor "
                  rf"'{QUERY}\.act_quantizer\.(d|q_m)'")
    _refused(good[0], tmp_path, match, config=edit,
             tensors=None if record else lambda ts, meta: meta.pop(RECORD_KEY))


@pytest.mark.parametrize("key,value,match", [
    ("scaling", 2.0, r"\['scaling'\]: not a shape attribute geta-hf sets; allowed: \['all_head_size'"),
    ("is_causal", True, r"\['is_causal'\]: not a shape attribute"),
    ("config.scaling", 1, r"\['config\.scaling'\]: not a shape attribute"),
    ("num_attention_heads", "2", r"\['num_attention_heads'\]: got '2'; allowed: an integer >= 1"),
    ("all_head_size", True, r"\['all_head_size'\]: got True; allowed: an integer >= 1"),
    ("num_attention_heads", 0, r"\['num_attention_heads'\]: got 0; allowed: an integer >= 1"),
], ids=["float-attr", "flag", "config-attr", "string", "bool", "zero"])
def test_attribute_map_is_limited_to_shape_attributes(good, tmp_path, key, value, match):
    """Before: the map set any attribute it named (``scaling``, ``is_causal``, strings)."""
    _refused(good[0], tmp_path, rf"module_attrs\['{SELF}'\]" + match,
             config=lambda q: q["architecture"]["module_attrs"][SELF].update({key: value}))


def test_attribute_map_needs_an_existing_integer_attribute(good, tmp_path):
    _refused(good[0], tmp_path, rf"module_attrs\['{QUERY}'\]\['num_heads'\]: the Linear has no "
             "integer attribute 'num_heads'",
             config=lambda q: q["architecture"]["module_attrs"].update({QUERY: {"num_heads": 2}}))


@pytest.mark.parametrize("edit,match", [
    (lambda q: q["architecture"]["module_attrs"].update({"bert.nothing": {"num_heads": 2}}),
     r"module_attrs\['bert\.nothing'\]: BertForQuestionAnswering has no module 'bert\.nothing'"),
    (lambda q: q["architecture"]["param_shapes"].update({"bert.nothing.weight": [2]}),
     r"param_shapes\['bert\.nothing\.weight'\]: BertForQuestionAnswering \(compressed\) has no parameter"),
    (lambda q: q["layers"].update({"bert.embeddings.word_embeddings": q["layers"][QUERY]}),
     r"layers\['bert\.embeddings\.word_embeddings'\]: 'bert\.embeddings\.word_embeddings' is a "
     r"Embedding, not a linear layer"),
], ids=["attribute-map", "param-shape", "layer-on-an-embedding"])
def test_entries_naming_nothing_suitable_are_refused(good, tmp_path, edit, match):
    """Before: such entries were ignored."""
    _refused(good[0], tmp_path, match, config=edit)


def test_shape_fields_that_keep_the_byte_count_are_refused(good, tmp_path):
    """in_features x2 with weight_bits /2 keeps the packed size: the record names the field."""
    def edit(q):
        q["layers"][OUT]["in_features"] *= 2
        q["layers"][OUT]["weight_bits"] //= 2

    _refused(good[0], tmp_path, rf"layers\['{OUT}'\]\.(in_features|weight_bits) = \d+ but the "
             r"checkpoint was saved with \d+", config=edit)


def test_sizes_beyond_the_dense_model_are_refused(good, tmp_path):
    """A huge size is refused by name before anything is allocated."""
    _refused(good[0], tmp_path, rf"layers\['{QUERY}'\]\.out_features: got 10000000000000, more than "
             "the 32 of the dense model",
             config=lambda q: q["layers"][QUERY].update(out_features=10 ** 13))


def test_nothing_is_built_before_the_checkpoint_is_validated(good, tmp_path, monkeypatch):
    import geta_hf.hf.quantizer as hq

    built = []
    monkeypatch.setattr(hq, "build_compressed_skeleton", lambda *a: built.append(a))
    with pytest.raises(CheckpointError, match="is missing from the checkpoint"):
        _load(_variant(good[0], tmp_path / "bad",
                       tensors=lambda ts, meta: ts.pop("bert.embeddings.LayerNorm.bias")))
    assert built == []


# ----------------------------------------------------------------------------- property
def _nodes(obj, path=()):
    """Every (path, value) below ``obj`` (dict keys and list items)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from _nodes(v, path + (k,))


def _other_value(v, rng):
    if isinstance(v, bool):
        return rng.choice([not v, int(v), str(v).lower()])
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, v * 2, v // 2, 0, -v, 10 ** 12, float(v), str(v), None])
    if isinstance(v, float):
        return rng.choice([v * (1 + 1e-6), -v, 0.0, math.nan, math.inf, v * 2, str(v), None])
    if v is None:
        return rng.choice([0, 1.5, "x", {}, []])
    if isinstance(v, str):
        return rng.choice([v + "x", "", 1])
    if isinstance(v, list):
        return rng.choice([[], v[:-1], v + v[-1:], v[::-1]]) if v else [1]
    return rng.choice([{}, {**v, "bogus": 1}, list(v)])


def _corrupt_config(qcfg, rng):
    """Change, delete or add one field of the quantization_config; returns the names an error
    must mention (the field's key and the layer/module/parameter/family it belongs to)."""
    nodes = [(p, v) for p, v in _nodes(qcfg) if p[0] != "quant_method"]
    path, value = rng.choice(nodes)
    parent = qcfg
    for k in path[:-1]:
        parent = parent[k]
    op = rng.choice(["change", "change", "delete", "add"])
    if op == "add" and isinstance(value, dict):
        value["bogus_field"] = 1
        path = path + ("bogus_field",)
    elif op == "delete":
        del parent[path[-1]]
    else:
        new = _other_value(value, rng)
        if new == value and type(new) is type(value) and not (isinstance(new, float) and math.isnan(new)):
            new = "changed"
        parent[path[-1]] = new
    strs = [k for k in path if isinstance(k, str)]
    named = [path[i + 1] for i, k in enumerate(path[:-1])
             if k in ("layers", "param_shapes", "module_attrs", "families")]
    return set(named) | {strs[-1]}, f"config {op} {path}"


def _corrupt_tensors(ts, meta, rng):
    """Drop, add, reshape, retype or change the values of one tensor, or damage the integrity
    record; returns the names an error must mention."""
    name = rng.choice(sorted(ts))
    t = ts[name]
    op = rng.choice(["drop", "add", "shape", "dtype", "values", "values", "record"])
    if op == "values" and not t.numel():
        op = "record"
    if op == "drop":
        del ts[name]
    elif op == "add":
        name = name.rpartition(".")[0] + ".extra_" + name.rpartition(".")[2]
        ts[name] = t.clone()
    elif op == "shape":
        flat = t.reshape(-1)
        ts[name] = flat[:-1].clone() if t.numel() > 1 else torch.cat([flat, flat.new_zeros(1)])
    elif op == "dtype":
        ts[name] = t.to(torch.int16 if t.dtype == torch.uint8 else
                        rng.choice([torch.float16, torch.bfloat16, torch.float64]))
    elif op == "values":
        flat = t.view(-1)
        i = rng.randrange(flat.numel())
        if t.dtype == torch.uint8:
            flat[i] ^= 1 << rng.randrange(8)
        else:
            flat[i] = rng.choice([float(flat[i]) * (1 + 1e-3) + 1e-6, -float(flat[i]) - 1e-6, math.nan])
    else:  # the record: dropped or cut short
        if rng.random() < 0.5:
            del meta[RECORD_KEY]
        else:
            meta[RECORD_KEY] = meta[RECORD_KEY][: rng.randrange(len(meta[RECORD_KEY]))]
        return {RECORD_KEY}, "record"
    return {name}, f"tensor {op} {name}"


@pytest.mark.parametrize("seed", range(48))
def test_random_corruption_is_refused_by_name_or_harmless(good, tmp_path, seed):
    """A random corruption of a saved checkpoint (a quantization_config field, a tensor, or the
    integrity record) is refused with a CheckpointError naming what was changed, or the model
    loads and computes exactly what the original does."""
    good_path, inputs, reference = good
    rng = random.Random(seed)
    names, what = set(), ""

    def config(q):
        nonlocal names, what
        names, what = _corrupt_config(q, rng)

    def tensors(ts, meta):
        nonlocal names, what
        names, what = _corrupt_tensors(ts, meta, rng)

    edit = {"config": config} if rng.random() < 0.5 else {"tensors": tensors}
    path = _variant(good_path, tmp_path / "bad", **edit)
    try:
        model = _load(path)
    except CheckpointError as e:
        msg = str(e)
        assert all(str(n) in msg for n in names), f"{what}: the error does not name {names}: {msg}"
        return
    out = _outputs(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, reference)), f"{what}: loaded, outputs differ"
