"""PEFT / LoRA on a GETA-compressed model (issue #18): peft targets the packed layers."""

import pytest
import torch
import transformers as tf

import geta_hf
from geta_hf.compress import PackedQuantLinear

from test_int_inference import compress_tiny, outputs, packed_layers

peft = pytest.importorskip("peft")

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
