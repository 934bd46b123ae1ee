"""PEFT / LoRA on a GETA-compressed model (issue #18): peft targets the packed layers."""

import peft  # a test dependency ("pip install -e .[test]"): the tests fail, not skip, without it
import pytest
import torch
import transformers as tf

import geta_hf
from geta_hf.compress import PackedQuantLinear

from test_int_inference import compress_tiny, outputs, packed_layers

# (tiny family, Auto class, peft task type, LoRA targets)
CASES = {
    "bert": (tf.AutoModelForQuestionAnswering, "QUESTION_ANS", ["query", "value", "dense"]),
    "llama": (tf.AutoModelForCausalLM, "CAUSAL_LM", ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]),
}


def _rows(name, make, n=4):
    batch = make(0)
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i] for k, v in batch.items() if torch.is_tensor(v)}
        if name == "bert":
            row.update(start_positions=torch.tensor(1 + i), end_positions=torch.tensor(3 + i))
        else:
            row["labels"] = row["input_ids"].clone()
        rows.append(row)
    return rows * (n // len(rows))


def _compressed(tmp_path, name):
    model, make = compress_tiny(name, weight_bits=(3, 8))
    geta_hf.save_compressed(model, str(tmp_path / "c"))
    return make


def _train(model, rows, out, steps=12):
    args = tf.TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=len(rows),
                                learning_rate=2e-2, report_to=[], save_strategy="no",
                                use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_recovery_on_a_compressed_checkpoint(tmp_path, name):
    auto, task, targets = CASES[name]
    make = _compressed(tmp_path, name)
    base = auto.from_pretrained(str(tmp_path / "c"))
    codes = [m.weight_packed.clone() for m in packed_layers(base)]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task)
    model = peft.get_peft_model(base, cfg)
    wrapped = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped and all(isinstance(m.get_base_layer(), PackedQuantLinear) for m in wrapped)
    # only the adapters train; the packed base is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable if "qa_outputs" not in n)

    losses = _train(model, _rows(name, make), tmp_path / "run")
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(torch.equal(a, m.weight_packed) for a, m in zip(codes, packed_layers(model)))
    model.eval()
    ref = outputs(model, make(7))
    model.save_pretrained(str(tmp_path / "adapter"))

    again = peft.PeftModel.from_pretrained(auto.from_pretrained(str(tmp_path / "c")),
                                           str(tmp_path / "adapter")).eval()
    for a, b in zip(ref, outputs(again, make(7))):
        assert torch.equal(a, b)
    assert all(m.kernel == "int8" for m in packed_layers(again))  # the base keeps its kernels

    # transformers' own PEFT integration: load_adapter onto the compressed model
    plain = auto.from_pretrained(str(tmp_path / "c"))
    plain.load_adapter(str(tmp_path / "adapter"))
    for a, b in zip(ref, outputs(plain.eval(), make(7))):
        assert torch.equal(a, b)


def _peft_at_least(version):
    from packaging.version import Version

    return Version(peft.__version__) >= Version(version)


def test_add_adapter_through_transformers(tmp_path):
    make = _compressed(tmp_path, "bert")
    model = tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "c"))
    cfg = peft.LoraConfig(r=2, target_modules=CASES["bert"][2])
    if _peft_at_least("0.22"):
        model.add_adapter(cfg)
    else:  # transformers 5's add_adapter asks for peft >= 0.22 (not on this index): what it calls
        peft.inject_adapter_in_model(cfg, model)
    wrapped = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 10 and all(isinstance(m.get_base_layer(), PackedQuantLinear)
                                     for m in wrapped)
    losses = _train(model, _rows("bert", make), tmp_path / "run")
    assert sum(losses[-3:]) < sum(losses[:3])


def test_prepare_model_does_not_quantize_packed_layers_again(tmp_path):
    _compressed(tmp_path, "bert")
    model = tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "c"))
    assert packed_layers(model) and all(isinstance(m, torch.nn.Linear) for m in packed_layers(model))
    with pytest.raises(ValueError, match="no quantizable layer"):  # every linear is packed
        geta_hf.prepare_model(model, geta_hf.GETAConfig())


# ---------------------------------------------------------------------------- GETA on a PEFT model
def _lm_rows(n=32, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 96, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "labels": ids.clone()})
    return rows


def _cls_rows(n=32, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 96, (seq,), generator=g),
             "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def _geta_case(name):
    from tiny_models import build
    from test_trainer import qa_rows

    if name == "bert-qa":
        model, _ = build("bert")
        return model, qa_rows(32), "QUESTION_ANS", ["query", "key", "value", "dense"], \
            tf.AutoModelForQuestionAnswering
    if name == "bert-cls":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=48,
                            max_position_embeddings=64, num_labels=3)
        return tf.BertForSequenceClassification(cfg), _cls_rows(), "SEQ_CLS", \
            ["query", "value", "dense"], tf.AutoModelForSequenceClassification
    model, _ = build("llama")
    return model, _lm_rows(), "CAUSAL_LM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"], tf.AutoModelForCausalLM


@pytest.mark.parametrize("name", ["bert-qa", "bert-cls", "llama"])
def test_geta_through_lora_reaches_k_units_and_saves_the_merged_model(tmp_path, name):
    from test_trainer import geta_args

    from geta_hf import GETATrainer
    from geta_hf.quant import quant_layers

    torch.manual_seed(0)
    base, rows, task, targets, auto = _geta_case(name)
    plain_families = geta_hf.build_qadg(base, {k: torch.stack([r[k] for r in rows[:2]])
                                               for k in ("input_ids", "attention_mask")})
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      task_type=task, lora_dropout=0.0))
    trainer = GETATrainer(model=model, args=geta_args(tmp_path, num_train_epochs=4),
                          train_dataset=rows)
    q = trainer.qadg
    # the base model's units: the same families as without the adapters, no rank space
    assert [f.num_units for f in q.families] == [f.num_units for f in plain_families.families]
    assert all("lora_" not in m.param for f in q.families for m in f.members[:1])
    assert any("lora_B" in m.param for f in q.families for m in f.members)
    assert not any("lora_A" in n or "lora_B" in n for n, _ in quant_layers(model))
    trainer.train()
    k = int(0.5 * q.num_groups)
    assert int((q.group_norms(model) == 0).sum()) == k
    for _, m in quant_layers(model):
        b = float(m.weight_quantizer.bits())
        assert abs(b - round(b)) < 1e-4 and 4 <= round(b) <= 8
    # the adapters were trained, the base weights were not (beyond the zeroed units)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)

    inputs = {k_: torch.stack([r[k_] for r in rows[:4]]) for k_ in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits if task != "QUESTION_ANS" else model(**inputs).start_logits
    trainer.save_compressed(str(tmp_path / "compressed"))
    back = auto.from_pretrained(str(tmp_path / "compressed")).eval()
    assert not peft_model_like(back)
    with torch.no_grad():
        got = back(**inputs).logits if task != "QUESTION_ANS" else back(**inputs).start_logits
    assert (ref - got).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in base.parameters())


def peft_model_like(model):
    return any("lora_" in n for n, _ in model.named_parameters())


def test_unsupported_peft_settings_are_refused(tmp_path):
    from test_trainer import geta_args, qa_rows

    from geta_hf import GETATrainer

    for bad, match in ((dict(use_dora=True), "DoRA"), (dict(lora_bias=True), "lora_bias")):
        model = peft.get_peft_model(
            tf.BertForQuestionAnswering(tf.BertConfig(vocab_size=96, hidden_size=32,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      intermediate_size=48)),
            peft.LoraConfig(r=2, target_modules=["query"], **bad))
        with pytest.raises(ValueError, match=match):
            GETATrainer(model=model, args=geta_args(tmp_path), train_dataset=qa_rows(8))


def _lora_bert(adapter_seed=0):
    """Tiny BERT QA (always the same base weights: a PEFT checkpoint holds no base model) with
    LoRA adapters initialised from ``adapter_seed``."""
    from test_trainer import tiny_bert_qa

    model = tiny_bert_qa(seed=0)
    torch.manual_seed(adapter_seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value", "dense"],
                                                      task_type="QUESTION_ANS", lora_dropout=0.0))


def test_peft_checkpoint_resumes_inside_the_joint_stage_bit_identically(tmp_path):
    from test_trainer import check_resume_inside_joint_stage, qa_rows

    from geta_hf import GETATrainer

    ckpt, args = check_resume_inside_joint_stage(tmp_path, _lora_bert,
                                                 lambda: _lora_bert(adapter_seed=1))
    assert (ckpt / "adapter_model.safetensors").is_file()
    (ckpt / "geta_base_state.safetensors").unlink()
    again = GETATrainer(model=_lora_bert(adapter_seed=1), args=args, train_dataset=qa_rows())
    with pytest.raises(ValueError, match="geta_base_state"):
        again.train(resume_from_checkpoint=str(ckpt))


def test_geta_on_a_transformers_model_with_an_injected_adapter(tmp_path):
    """transformers' own PEFT integration (``model.add_adapter`` = peft's
    ``inject_adapter_in_model``): the model stays a transformers model holding LoRA layers."""
    from test_trainer import geta_args, qa_rows, tiny_bert_qa

    from geta_hf import GETATrainer

    model = tiny_bert_qa(dropout=0.0)
    cfg = peft.LoraConfig(r=4, target_modules=["query", "value", "dense"], lora_dropout=0.0)
    if _peft_at_least("0.22"):
        model.add_adapter(cfg)
    else:
        peft.inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "qa_outputs" in n)
    trainer = GETATrainer(model=model, args=geta_args(tmp_path), train_dataset=qa_rows())
    trainer.train()
    assert int((trainer.qadg.group_norms(model) == 0).sum()) == int(0.5 * trainer.qadg.num_groups)
    inputs = {k: torch.stack([r[k] for r in qa_rows(4, seed=9)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).start_logits
    trainer.save_compressed(str(tmp_path / "c"))
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "c")).eval()
    with torch.no_grad():
        assert (back(**inputs).start_logits - ref).abs().max().item() <= 1e-4
    assert not peft_model_like(back)
