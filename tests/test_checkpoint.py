"""Compressed checkpoints: save_compressed / save_pretrained, plain from_pretrained, strict loading."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import geta_hf
from geta_hf import CheckpointError, GETAConfig, build_qadg
from geta_hf.compress import PackedQuantLinear
from geta_hf.hf.quantizer import QUANT_METHOD
from geta_hf.quant import quant_layers

from tiny_models import FAMILIES, build

AUTO = {
    "bert": tf.AutoModelForQuestionAnswering, "roberta": tf.AutoModelForSequenceClassification,
    "distilbert": tf.AutoModelForQuestionAnswering, "gpt2": tf.AutoModelForCausalLM,
    "llama": tf.AutoModelForCausalLM, "mistral": tf.AutoModelForCausalLM,
    "qwen2": tf.AutoModelForCausalLM, "phi3": tf.AutoModelForCausalLM,
    "vit": tf.AutoModelForImageClassification, "t5": tf.AutoModelForSeq2SeqLM,
}


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return [v for k, v in out.items() if torch.is_tensor(v) and k != "loss"]


def _compress_randomly(model, make, seed=0, acts=True, fixed_bits=None):
    """Weight bits 3..8 at random (``fixed_bits``: {layer name: bits} overrides), half of every
    family zeroed, then compressed."""
    cfg = GETAConfig(weight_bits=(3, 8), activation_bits=(6, 8) if acts else None)
    geta_hf.prepare_model(model, cfg, [make(7)] if acts else None)
    g = torch.Generator().manual_seed(seed)
    for name, m in quant_layers(model):
        bits = int(torch.randint(3, 9, (), generator=g))
        m.weight_quantizer.set_bits((fixed_bits or {}).get(name, bits))
    q = build_qadg(model, make(0))
    ids = []
    for f in q.families:
        ids += (torch.randperm(f.num_units, generator=g)[: f.num_units // 2] + f.offset).tolist()
    q.zero_groups(model, ids)
    geta_hf.compress_model(model, q, example_inputs=make(0))
    return cfg


def _tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_with_auto_class(name, tmp_path):
    model, make = build(name)
    cfg = _compress_randomly(model, make)
    d1, d2 = tmp_path / "a", tmp_path / "b"
    geta_hf.save_compressed(model, str(d1), geta_config=cfg.to_dict())
    reloaded = AUTO[name].from_pretrained(str(d1))
    assert type(reloaded) is type(model)
    for s in (1, 2):
        for a, b in zip(_outputs(model, make(s)), _outputs(reloaded, make(s))):
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    assert reloaded.geta_arch["families"] == model.geta_arch["families"]
    # a second save of the reloaded model is byte-identical in tensors
    reloaded.save_pretrained(str(d2))
    t1, t2 = _tensors(d1), _tensors(d2)
    assert t1.keys() == t2.keys()
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]), k
    qc = json.loads((d1 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["format_version"] == 2
    assert qc["geta_config"] == cfg.to_dict()


def test_plain_save_pretrained_of_a_compressed_model(tmp_path):
    model, make = build("llama")
    _compress_randomly(model, make, acts=False)
    model.save_pretrained(str(tmp_path))  # no save_compressed: the quantizer is attached already
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for a, b in zip(_outputs(model, make(1)), _outputs(back, make(1))):
        assert (a - b).abs().max().item() <= 1e-5


def _minilm_inputs(tok, n=4):
    qs = ["Where is the tower?", "Who wrote it?", "What is red?", "When did it open?"][:n]
    cs = ["The tower stands in Paris.", "A committee wrote it.", "Apples are red.",
          "It opened in May."][:n]
    return dict(tok(qs, cs, return_tensors="pt", padding="max_length", max_length=32))


def test_real_minilm_round_trip_size_and_card(minilm, tmp_path):
    base, tok = minilm
    model = copy.deepcopy(base)
    make = lambda seed: _minilm_inputs(tok)  # noqa: E731
    _compress_randomly(model, make, acts=True)
    out = tmp_path / "minilm"
    geta_hf.save_compressed(model, str(out), processing_class=tok, example_inputs=make(0),
                            eval_results={"f1": 12.5})
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(out))
    tok2 = tf.AutoTokenizer.from_pretrained(str(out))
    assert tok2("a b")["input_ids"] == tok("a b")["input_ids"]
    for a, b in zip(_outputs(model, make(0)), _outputs(back, make(0))):
        assert (a - b).abs().max().item() <= 1e-5
    # size on disk: packed weights at their bits (+5%) plus the unquantized tensors
    packed = [m for m in back.modules() if isinstance(m, PackedQuantLinear)]
    n_q = sum(m.in_features * m.out_features for m in packed)
    avg_bits = sum(m.in_features * m.out_features * m.weight_bits for m in packed) / n_q
    tensors = _tensors(out)
    unquantized = sum(t.numel() * t.element_size() for k, t in tensors.items()
                      if not k.endswith("weight_packed"))
    size = os.path.getsize(out / "model.safetensors")
    assert size <= n_q * avg_bits / 8 * 1.05 + unquantized
    assert size < 0.6 * sum(p.numel() * 4 for p in base.parameters())  # embeddings stay fp32
    card = (out / "README.md").read_text()
    assert "compressed with GETA" in card and "| BOPs |" in card and "| f1 | 12.5 |" in card
    assert "Heads and channels kept" in card


def test_fine_tune_reloaded_model_with_plain_trainer(minilm, tmp_path):
    base, tok = minilm
    model = copy.deepcopy(base)
    make = lambda seed: _minilm_inputs(tok)  # noqa: E731
    _compress_randomly(model, make, acts=True)
    geta_hf.save_compressed(model, str(tmp_path / "ck"))
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "ck"))
    assert back.hf_quantizer.is_qat_trainable
    enc = _minilm_inputs(tok)
    rows = [{k: v[i] for k, v in enc.items()} | {"start_positions": torch.tensor(3),
                                                 "end_positions": torch.tensor(5)} for i in range(4)]
    before = {n: p.detach().clone() for n, p in back.named_parameters()}
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                max_steps=3, learning_rate=1e-3, report_to="none", save_strategy="no",
                                use_cpu=True)
    trainer = tf.Trainer(model=back, args=args, train_dataset=rows)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in back.named_parameters() if not torch.equal(p, before[n])]
    assert any("act_quantizer" in n for n in changed) and any("bias" in n for n in changed)


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_corrupted_configs_raise_clear_errors(tmp_path):
    model, make = build("bert")
    _compress_randomly(model, make)
    good = tmp_path / "good"
    geta_hf.save_compressed(model, str(good))
    layer = next(iter(json.loads((good / "config.json").read_text())["quantization_config"]["layers"]))
    param = next(iter(json.loads((good / "config.json").read_text())
                      ["quantization_config"]["architecture"]["param_shapes"]))
    cases = [
        (lambda q: q.update(format_version=99), r"format_version: got 99"),
        (lambda q: q["layers"][layer].update(weight_bits=17), r"weight_bits: got 17; allowed: 2..16"),
        (lambda q: q["layers"][layer].update(weight_scale=0.123), r"weight_scale = 0.123 but the checkpoint"),
        (lambda q: q["architecture"]["param_shapes"].update({param: [3, 5]}), r"param_shapes"),
        (lambda q: q.update(extra_field=1), r"unknown field\(s\) \['extra_field'\]"),
        (lambda q: q["layers"][layer].pop("act"), r"missing \['act'\]"),
        (lambda q: q["architecture"]["families"][next(iter(q["architecture"]["families"]))]
         .update(kept=[999]), r"families"),
    ]
    for i, (edit, match) in enumerate(cases):
        bad = _corrupt(good, tmp_path / f"bad{i}", edit)
        with pytest.raises((CheckpointError, RuntimeError, ValueError), match=match):
            tf.AutoModelForQuestionAnswering.from_pretrained(str(bad))


def test_truncated_tensor_file_is_refused(tmp_path):
    model, make = build("bert")
    _compress_randomly(model, make)
    geta_hf.save_compressed(model, str(tmp_path / "ck"))
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "ck"))


def test_loading_without_geta_hf_fails_loudly(tmp_path):
    model, make = build("bert")
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    q = build_qadg(model, make(0))
    # quantized, nothing pruned: shapes alone would not differ
    geta_hf.compress_model(model, q, example_inputs=make(0))
    geta_hf.save_compressed(model, str(tmp_path / "ck"))
    code = ("import transformers as tf\n"
            f"tf.AutoModelForQuestionAnswering.from_pretrained({str(tmp_path / 'ck')!r})\n"
            "print('LOADED')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    out = r.stderr + r.stdout
    assert "mismatch" in out.lower()
    # transformers prints the checkpoint's quant_method, which carries the install hint
    assert "Unknown quantization type, got geta (pip install geta-hf; import geta_hf)" in out
    # a checkpoint written before the hint ("quant_method": "geta") still loads
    old = _corrupt(tmp_path / "ck", tmp_path / "old", lambda q: q.update(quant_method="geta"))
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(old))
    assert back.geta_arch["compressed"]
    with torch.no_grad():
        assert torch.equal(back(**make(1)).start_logits, model(**make(1)).start_logits)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, make = build("bert")
    _compress_randomly(model, make)
    target = tmp_path / "ck"
    geta_hf.save_compressed(model, str(target))
    before = _tensors(target)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        geta_hf.save_compressed(model, str(target))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left behind
    after = _tensors(target)
    assert all(torch.equal(before[k], after[k]) for k in before)
    tf.AutoModelForQuestionAnswering.from_pretrained(str(target))


def test_save_requires_a_compressed_model(tmp_path):
    model, _ = build("bert")
    with pytest.raises(ValueError, match="not compressed"):
        geta_hf.save_compressed(model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_registration_is_idempotent():
    import importlib

    import geta_hf.hf.quantizer as hq

    hq._registered = False
    hq.register()  # already in transformers' registry: must not raise
    importlib.reload(geta_hf)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert "geta" in AUTO_QUANTIZER_MAPPING and QUANT_METHOD in AUTO_QUANTIZER_MAPPING


# ----------------------------------------------------------------------------- saves never destroy
def test_save_refuses_a_folder_it_did_not_write_and_a_file(tmp_path):
    model, make = build("bert")
    _compress_randomly(model, make)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        geta_hf.save_compressed(model, str(user))
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("data")
    with pytest.raises(FileExistsError, match="is a file"):
        geta_hf.save_compressed(model, str(a_file))
    assert a_file.read_text() == "data"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "mine"]  # no temporary folder left


def test_resave_replaces_only_its_own_files(tmp_path):
    model, make = build("bert")
    _compress_randomly(model, make)
    target = tmp_path / "ck"
    geta_hf.save_compressed(model, str(target))
    written = json.loads((target / geta_hf.hf.serialization.MANIFEST).read_text())["files"]
    assert "model.safetensors" in written and "config.json" in written
    (target / "notes.txt").write_text("keep me")
    other, _ = build("bert", seed=1)
    _compress_randomly(other, make, seed=1)
    geta_hf.save_compressed(other, str(target))
    assert (target / "notes.txt").read_text() == "keep me"
    after = _tensors(target)
    want = {k: v for k, v in other.state_dict().items() if k in after}
    assert want and all(torch.equal(want[k], after[k]) for k in want)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    tf.AutoModelForQuestionAnswering.from_pretrained(str(target))


@pytest.mark.parametrize("fail_at", [1, 3, -1])
def test_failed_file_swap_puts_the_previous_save_back(tmp_path, monkeypatch, fail_at):
    """os.replace fails at the n-th call of the swap (moving old files out, or new ones in):
    every earlier file is back in place, bit-identical, and nothing is left behind."""
    import geta_hf.hf.serialization as ser

    model, make = build("bert")
    _compress_randomly(model, make)
    target = tmp_path / "ck"
    geta_hf.save_compressed(model, str(target))
    (target / "notes.txt").write_text("keep me")
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}
    n_old = len(json.loads((target / ser.MANIFEST).read_text())["files"])
    stop = n_old + 2 if fail_at == -1 else fail_at  # -1: while moving the new files in
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == stop:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    other, _ = build("bert", seed=1)
    _compress_randomly(other, make, seed=1)
    monkeypatch.setattr(ser.os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        geta_hf.save_compressed(other, str(target))
    monkeypatch.undo()
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]
