"""Reliability under faults: NaN/Inf steps, interrupted saves, incomplete or tampered checkpoints.

Each test injects one fault and asserts the specific recovery or error.
"""

import json
import logging
import math
import os

import pytest
import torch
import transformers as tf

import geta_hf
from geta_hf import GETAConfig, GETATrainer, QASSO, build_qadg, prepare_model
from geta_hf.hf import CheckpointError, IncompleteCheckpointError
from geta_hf.quant import quant_layers

from test_checkpoint import _corrupt
from test_trainer import geta_args, qa_rows, tiny_bert_qa
from tiny_models import build

# 40 steps: warm-up 0-3, projection 4-15, joint 16-30 (3 periods of 5 steps), cool-down 31-39
SHORT = dict(target_group_sparsity=0.5, weight_bits=(4, 16), bit_reduction=4,
             projection_periods=3, warmup=4, projection=12, joint=15, pruning_periods=3)


def _qa_loss(model, inputs):
    pos = torch.arange(inputs["input_ids"].shape[0]) + 1
    return model(**inputs, start_positions=pos, end_positions=pos + 2).loss


def _setup(**over):
    cfg = GETAConfig(**{**SHORT, **over})
    model, make = build("bert")
    prepare_model(model, cfg)
    qadg = build_qadg(model, make(0), cfg)
    return model, make, qadg, QASSO(model, qadg, cfg, lr=2e-3, total_steps=40)


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def _step(model, make, opt, k, poison=None):
    _qa_loss(model, make(100 + k)).backward()
    if poison is not None:  # a gradient fault in one tensor
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[3] = poison
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("at", [2, 10, 18], ids=["warmup", "projection", "joint"])
def test_non_finite_gradient_skips_the_step_and_keeps_state(poison, at, caplog):
    model, make, qadg, opt = _setup()
    for k in range(at):
        _step(model, make, opt, k)
    params, state = _snapshot(model, opt)
    with caplog.at_level(logging.WARNING, logger="geta_hf.optim.qasso"):
        _step(model, make, opt, at, poison=poison)
    assert "NaN or Inf gradient and is skipped" in caplog.text
    assert opt.skipped_steps == 1 and opt.step_count == at + 1
    for n, p in model.named_parameters():  # weights and quantizer scalars untouched
        assert torch.equal(p, params[n]), n
    for p, s in opt.state.items():  # Adam moments and step counters untouched
        for key, v in s.items():
            assert torch.equal(v, state[id(p)][key]) if torch.is_tensor(v) else v == state[id(p)][key]
    for k in range(at + 1, 40):  # training goes on and ends where the schedule says
        _step(model, make, opt, k)
    d = opt.describe()
    assert d["skipped_steps"] == 1 and d["zero_units"] == opt.target_units
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state_dict()["qasso"]["skipped_steps"] == 1


@pytest.mark.parametrize("bad_steps", [[16], [20], list(range(16, 21)), list(range(31, 40))],
                         ids=["period-start", "period-end", "whole-period", "whole-cooldown"])
def test_skipped_schedule_events_still_happen(bad_steps):
    """A period whose start/end step is skipped still selects and commits; cool-down freezes."""
    model, make, qadg, opt = _setup()
    for k in range(40):
        _step(model, make, opt, k, poison=math.nan if k in bad_steps else None)
    d = opt.describe()
    assert d["skipped_steps"] == len(bad_steps)
    norms = qadg.group_norms(model)
    assert int((norms == 0).sum()) == opt.target_units == d["pruned_units"]
    assert d["bits_frozen"]
    for _, m in quant_layers(model):
        b = float(m.weight_quantizer.bits())
        assert abs(b - round(b)) < 1e-4 and 4 <= round(b) <= 8


def test_nan_loss_inside_the_trainer_is_skipped(tmp_path):
    """A NaN loss at one step of GETATrainer: the run finishes, the skip is logged and counted."""
    model = tiny_bert_qa(dropout=0.0)
    poison = {"on": False}
    model.qa_outputs.register_forward_hook(
        lambda mod, inp, out: out * math.nan if poison["on"] else None)

    class Inject(tf.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            poison["on"] = state.global_step == 7

    args = geta_args(tmp_path, geta_activation_bits=None)
    trainer = GETATrainer(model=model, args=args, train_dataset=qa_rows(), callbacks=[Inject()])
    trainer.train()
    opt = trainer.geta_optimizer
    assert opt.skipped_steps == 1
    logged = [h["geta/skipped_steps"] for h in trainer.state.log_history if "geta/skipped_steps" in h]
    assert logged[0] == 0.0 and logged[-1] == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.describe()["zero_units"] == opt.target_units


def test_skip_check_can_be_turned_off_but_is_validated():
    model, make = build("bert")
    cfg = GETAConfig(**SHORT)
    prepare_model(model, cfg)
    qadg = build_qadg(model, make(0), cfg)
    with pytest.raises(ValueError, match="skip_nonfinite='yes' is invalid"):
        QASSO(model, qadg, cfg, lr=1e-3, total_steps=40, skip_nonfinite="yes")
    opt = QASSO(model, qadg, cfg, lr=1e-3, total_steps=40, skip_nonfinite=False)
    _step(model, make, opt, 0, poison=math.nan)
    assert opt.skipped_steps == 0  # the caller asked to handle faults itself


# ----------------------------------------------------------------------------- interruption
def _killing_rng_save(at_step):
    """Patch the Trainer's last-but-one checkpoint write to die at ``checkpoint-{at_step}``."""
    original = tf.Trainer._save_rng_state

    def save_rng(self, output_dir):
        if output_dir.endswith(f"checkpoint-{at_step}"):
            raise KeyboardInterrupt("killed mid-save")
        return original(self, output_dir)

    return save_rng


def test_interrupted_trainer_checkpoint_is_skipped_on_resume(tmp_path, monkeypatch, caplog):
    rows = qa_rows()
    full = GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path / "full"), train_dataset=rows)
    full.train()
    args = geta_args(tmp_path / "cut", save_strategy="steps", save_steps=10, max_steps=40)
    first = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=rows)
    monkeypatch.setattr(tf.Trainer, "_save_rng_state", _killing_rng_save(20))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert sorted(os.listdir(cut)) == ["checkpoint-10", "checkpoint-20"]
    assert not (cut / "checkpoint-20" / "trainer_state.json").exists()  # left partial
    with pytest.raises(IncompleteCheckpointError, match="checkpoint-20.*its save was interrupted"):
        GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=rows).train(
            resume_from_checkpoint=str(cut / "checkpoint-20"))
    resumed = GETATrainer(model=tiny_bert_qa(seed=1), args=args, train_dataset=rows)
    with caplog.at_level(logging.WARNING, logger="geta_hf.hf.resume"):
        resumed.train(resume_from_checkpoint=True)
    assert "skipping checkpoint" in caplog.text and "checkpoint-20" in caplog.text
    ref = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():  # resumed from checkpoint-10: same result
        assert torch.equal(p, ref[n]), n


def _fake_checkpoint(root, step, state=True, weights=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    if state is True:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


@pytest.mark.parametrize("kind,match", [
    ("truncated-state", "trainer_state.json is unreadable"),
    ("wrong-step", "records global_step=3, not 8"),
    ("no-weights", "holds no model weights"),
    ("missing", "no such folder"),
])
def test_incomplete_checkpoints_are_named(tmp_path, kind, match):
    from geta_hf.hf.resume import check_checkpoint, last_complete_checkpoint

    good = _fake_checkpoint(tmp_path, 4)
    if kind == "truncated-state":
        bad = _fake_checkpoint(tmp_path, 8, state='{"global_step": 8, "log_hi')
    elif kind == "wrong-step":
        bad = _fake_checkpoint(tmp_path, 8, state=json.dumps({"global_step": 3}))
    elif kind == "no-weights":
        bad = _fake_checkpoint(tmp_path, 8, weights=False)
    else:
        bad = tmp_path / "checkpoint-8"
    with pytest.raises(IncompleteCheckpointError, match=match):
        check_checkpoint(str(bad))
    assert last_complete_checkpoint(str(tmp_path)) == str(good)


def test_resume_with_no_complete_checkpoint_is_an_error(tmp_path):
    _fake_checkpoint(tmp_path, 5, state=None)
    trainer = GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path), train_dataset=qa_rows())
    with pytest.raises(ValueError, match="holds no complete checkpoint-N folder"):
        trainer.train(resume_from_checkpoint=True)


def _compressed_bert(tmp_path):
    model, make = build("bert")
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    qadg = build_qadg(model, make(0))
    g = torch.Generator().manual_seed(0)
    qadg.zero_groups(model, torch.randperm(qadg.num_groups, generator=g)[: qadg.num_groups // 2].tolist())
    geta_hf.compress_model(model, qadg, example_inputs=make(0))
    path = tmp_path / "good"
    geta_hf.save_compressed(model, str(path))
    return model, path


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = _compressed_bert(tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        geta_hf.save_compressed(model, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["good"]  # no partial folder, no temporary folder


# ----------------------------------------------------------------------------- loading
def _first_layer(q):
    return q["layers"][next(iter(q["layers"]))]


@pytest.mark.parametrize("edit,match", [
    (lambda q: _first_layer(q).update(weight_bits=1), r"weight_bits: got 1; allowed: 2\.\.16"),
    (lambda q: q.update(format_version="1"), r"format_version"),
    (lambda q: _first_layer(q).update(weight_scale=-0.5), r"weight_scale: got -0.5; allowed: a finite number > 0"),
    (lambda q: q.pop("layers"), r"missing field\(s\) \['layers'\]"),
    (lambda q: q["layers"].update({"not.a.module": dict(_first_layer(q))}), r"not\.a\.module"),
], ids=["bits-below-2", "version-type", "negative-scale", "no-layers", "unknown-layer"])
def test_tampered_quantization_config_is_refused(tmp_path, edit, match):
    _, good = _compressed_bert(tmp_path)
    bad = _corrupt(good, tmp_path / "bad", edit)
    with pytest.raises((CheckpointError, ValueError), match=match):
        tf.AutoModelForQuestionAnswering.from_pretrained(str(bad))


def test_truncated_tensors_are_refused_with_a_clear_error(tmp_path):
    _, good = _compressed_bert(tmp_path)
    f = good / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(Exception, match=r"(?i)deserializ|incomplete|truncat|size"):
        tf.AutoModelForQuestionAnswering.from_pretrained(str(good))


def test_pickle_weights_are_never_read(tmp_path):
    """A compressed checkpoint whose weights are a pickle (not safetensors) is refused."""
    _, good = _compressed_bert(tmp_path)
    (good / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, good / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"safetensors files only; refusing 'pytorch_model.bin'"):
        tf.AutoModelForQuestionAnswering.from_pretrained(str(good))
