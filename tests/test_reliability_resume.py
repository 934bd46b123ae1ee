"""Reliability of resuming: a QASSO state continues only the run it was written by.

The state (format ``geta_hf.QASSO/3``) records the full GETAConfig and the search space's
fingerprint; every mismatch is refused naming the differing fields, through ``QASSO`` and
through ``GETATrainer`` (naming the ``--geta_*`` flags). A Trainer checkpoint without optimizer
state is refused unless the user asks to restart the compression.
"""

import copy
import dataclasses
import json

import pytest
import torch
import transformers as tf

from geta_hf import GETAConfig, GETATrainer, QASSO, build_qadg, prepare_model
from geta_hf.hf.resume import ResumeStateError, check_resume_state
from geta_hf.optim import StateMismatchError

from test_trainer import geta_args, qa_rows, tiny_bert_qa
from tiny_models import build

# 40 steps: warm-up 0-3, projection 4-15, joint 16-30 (3 periods of 5 steps), cool-down 31-39
SHORT = dict(target_group_sparsity=0.5, weight_bits=(4, 16), bit_reduction=4,
             projection_periods=3, warmup=4, projection=12, joint=15, pruning_periods=3)


def _qasso(cfg=None, seed=0, unprunable=None, intermediate=None):
    cfg = cfg or GETAConfig(**SHORT)
    model, make = build("bert")
    if intermediate is not None:  # same family names, other widths
        c = model.config
        c.intermediate_size = intermediate
        torch.manual_seed(seed)
        model = tf.BertForQuestionAnswering(c)
    prepare_model(model, cfg)
    qadg = build_qadg(model, make(0), cfg)
    if unprunable:
        qadg.mark_unprunable(unprunable)
    return model, make, QASSO(model, qadg, cfg, lr=2e-3, total_steps=40)


def _train(model, make, opt, steps):
    for k in range(steps):
        pos = torch.arange(2) + 1
        model(**make(100 + k), start_positions=pos, end_positions=pos + 2).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def saved_state():
    """The state of a QASSO run stopped inside the joint stage (step 22)."""
    model, make, opt = _qasso()
    _train(model, make, opt, 22)
    return opt.state_dict()


def _copy(sd):
    """A deep copy of QASSO's own state (it holds the saliency tensors of the window) and the
    rest of the optimizer state."""
    return copy.deepcopy(sd["qasso"]), {k: v for k, v in sd.items() if k != "qasso"}


# ----------------------------------------------------------------------------- QASSO state
def test_state_records_the_config_and_the_search_space(saved_state):
    s = saved_state["qasso"]
    assert s["format"] == "geta_hf.QASSO/3"
    assert GETAConfig.from_dict(s["config"]) == GETAConfig(**SHORT)
    space = s["search_space"]
    assert len(space["fingerprint"]) == 64 and int(space["fingerprint"], 16) >= 0
    assert [f[0] for f in space["families"]][:2] == ["bert.encoder.layer.0.attention.heads",
                                                     "bert.encoder.layer.0.channels"]
    assert all(kind == "weight" for _, kind, _ in space["quantizers"])
    # the same run loads it and continues from step 22 with the same units
    model, make, opt = _qasso()
    opt.load_state_dict(saved_state)
    assert opt.step_count == 22 and opt.pruned_units == s["pruned_units"]


@pytest.mark.parametrize("changes", [
    dict(target_group_sparsity=0.3),
    dict(weight_bits=(4, 8)),
    dict(pruning_periods=5),
    dict(importance_weights={"magnitude": 1.0}),
    dict(target_group_sparsity=0.3, bit_reduction=2, quant_lr=1e-2),
], ids=["sparsity", "bits", "periods", "importance", "three-fields"])
def test_other_settings_are_refused_naming_every_field(saved_state, changes):
    cfg = dataclasses.replace(GETAConfig(**SHORT), **changes)
    model, make, opt = _qasso(cfg)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(StateMismatchError, match="saved with other GETA settings") as e:
        opt.load_state_dict(saved_state)
    assert sorted(e.value.fields) == sorted(changes)
    for name in changes:
        assert f"{name} (saved " in str(e.value)
    assert "target_group_sparsity (saved 0.5, now 0.3)" in str(e.value) or \
        "target_group_sparsity" not in changes
    # nothing was loaded
    assert opt.step_count == 0 and opt.pruned_units == [] and not opt.state
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_another_search_space_is_refused_naming_the_families(saved_state):
    _, _, opt = _qasso(unprunable=["bert.encoder.layer.1.intermediate.dense"])
    with pytest.raises(StateMismatchError, match=r"another search space \(families only in the "
                       r"checkpoint: bert\.encoder\.layer\.1\.channels \(channels, 48 units\)\)") as e:
        opt.load_state_dict(saved_state)
    assert e.value.fields == ["search_space"]


def test_same_family_names_but_other_widths_are_refused(saved_state):
    # intermediate 48 -> 40: the same families by name, other unit counts and slices
    _, _, opt = _qasso(intermediate=40)
    with pytest.raises(StateMismatchError, match="another search space") as e:
        opt.load_state_dict(saved_state)
    msg = str(e.value)
    assert "families only in the checkpoint: bert.encoder.layer.0.channels (channels, 48 units)" in msg
    assert "families only in this run: bert.encoder.layer.0.channels (channels, 40 units)" in msg
    assert "quantizers only in this run: bert.encoder.layer.0.intermediate.dense (weight 40x32)" in msg


def test_tampered_fingerprint_is_refused(saved_state):
    s, rest = _copy(saved_state)
    s["search_space"]["fingerprint"] = "0" * 64
    _, _, opt = _qasso()
    with pytest.raises(StateMismatchError, match="same families, but their units own other "
                                                 "parameter slices"):
        opt.load_state_dict({**rest, "qasso": s})


def test_fingerprint_is_deterministic_and_structural():
    def fp(seed, inter=48):
        torch.manual_seed(seed)
        c = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=inter, max_position_embeddings=64)
        model = tf.BertForQuestionAnswering(c)
        _, make = build("bert")
        return build_qadg(model, make(seed)).fingerprint()

    assert fp(0) == fp(1)  # other weights, other example batch: same search space
    assert fp(0) != fp(0, inter=40)


@pytest.mark.parametrize("fmt", ["geta_hf.QASSO/2", "something/9", None])
def test_old_or_unknown_formats_are_refused(saved_state, fmt):
    s, rest = _copy(saved_state)
    if fmt is None:
        del s["format"]
    else:
        s["format"] = fmt
    if fmt == "geta_hf.QASSO/2":  # what an older geta-hf wrote
        del s["config"], s["search_space"]
    _, _, opt = _qasso()
    match = "older geta-hf.*does not record the GETA configuration" if fmt == "geta_hf.QASSO/2" \
        else "unknown state format"
    with pytest.raises(StateMismatchError, match=match) as e:
        opt.load_state_dict({**rest, "qasso": s})
    assert e.value.fields == ["format"]


@pytest.mark.parametrize("field,value,match", [
    ("pruned_units", [10 ** 30], r"pruned_units is \[1000000000000000000000000000000\]; allowed: "
                                 r"a list of unit ids in \[0, 104\)"),
    ("active_units", [-1], r"active_units is \[-1\]; allowed: a list of unit ids in \[0, 104\)"),
    ("pruned_units", [3, 3], r"pruned_units is \[3, 3\]; allowed: unit ids listed once each"),
    ("period", 99, r"period is 99; allowed: an integer in \[-1, 3\)"),
    ("step", -5, r"step is -5; allowed: an integer >= 0"),
    ("frozen_bits", [8] * 3, r"frozen_bits is \[8, 8, 8\]; allowed: None or 13 integers in \[2, 16\]"),
    ("frozen_bits", [99] * 13, r"frozen_bits .*allowed: None or 13 integers in \[2, 16\]"),
], ids=["huge-id", "negative-id", "duplicate-id", "period", "step", "bits-count", "bits-range"])
def test_damaged_progress_fields_are_named(saved_state, field, value, match):
    s, rest = _copy(saved_state)
    s[field] = value
    _, _, opt = _qasso()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict({**rest, "qasso": s})
    assert opt.step_count == 0


# ----------------------------------------------------------------------------- GETATrainer
def _checkpointed_run(out, steps=6, save_steps=3, **kw):
    args = geta_args(out, save_strategy="steps", save_steps=save_steps, max_steps=steps, **kw)
    trainer = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows())
    trainer.train()
    return out / f"checkpoint-{save_steps}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpointed_run(tmp_path_factory.mktemp("run"))


def test_trainer_refuses_changed_flags_naming_them(checkpoint, tmp_path):
    args = geta_args(tmp_path, max_steps=6, geta_target_group_sparsity=0.3,
                     geta_weight_bits=[4, 8])
    trainer = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows())
    with pytest.raises(ResumeStateError, match=r"trained with other GETA settings: "
                       r"--geta_target_group_sparsity \(saved 0.5, now 0.3\), "
                       r"--geta_weight_bits \(saved 4 16, now 4 8\)") as e:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(e.value.fields) == ["target_group_sparsity", "weight_bits"]
    assert trainer.state.global_step == 0 and trainer.geta_optimizer is None  # nothing ran


def test_trainer_resumes_with_the_same_flags(checkpoint, tmp_path):
    trainer = GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path, max_steps=6),
                          train_dataset=qa_rows())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6 and trainer.geta_optimizer.step_count == 6


@pytest.mark.parametrize("missing", [["optimizer.pt"], ["scheduler.pt"],
                                     ["optimizer.pt", "scheduler.pt"]])
def test_checkpoint_without_optimizer_state_is_refused(checkpoint, tmp_path, missing):
    import shutil

    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, ckpt)
    for name in missing:
        (ckpt / name).unlink()
    with pytest.raises(ResumeStateError, match=r"holds no optimizer state \(" + " and ".join(missing)
                       + r" missing, e.g. saved with save_only_model=True\).*"
                         r"--geta_restart_compression_on_resume"):
        check_resume_state(str(ckpt), GETAConfig(), {"fingerprint": ""})
    assert check_resume_state(str(ckpt), GETAConfig(), {"fingerprint": ""}, restart=True) is False


def test_optimizer_state_of_another_optimizer_is_refused(checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, ckpt)
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    trainer = GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path, max_steps=6),
                          train_dataset=qa_rows())
    with pytest.raises(ResumeStateError, match="optimizer.pt holds no QASSO state"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_save_only_model_checkpoint_needs_an_explicit_restart(tmp_path):
    """save_only_model=True: refused; with the restart flag, QASSO runs its whole schedule over
    the remaining steps and the run ends with the target pruned and the bits in range."""
    ckpt = _checkpointed_run(tmp_path / "first", steps=10, save_steps=10, save_only_model=True)
    assert not (ckpt / "optimizer.pt").exists()
    args = geta_args(tmp_path / "second", max_steps=40)
    with pytest.raises(ResumeStateError, match="holds no optimizer state"):
        GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows()).train(
            resume_from_checkpoint=str(ckpt))
    args = geta_args(tmp_path / "second", max_steps=40, geta_restart_compression_on_resume=True)
    trainer = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows())
    trainer.train(resume_from_checkpoint=str(ckpt))
    opt = trainer.geta_optimizer
    assert trainer.state.global_step == 40 and opt.plan.total_steps == 30 == opt.step_count
    d = opt.describe()
    assert d["stage"] == "cooldown" and d["bits_frozen"]
    assert d["zero_units"] == opt.target_units == int(0.5 * trainer.qadg.num_groups)
    assert all(4 <= b <= 8 for b in d["weight_bits"].values())
