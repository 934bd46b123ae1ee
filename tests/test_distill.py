"""Knowledge distillation: distillation_loss, DistillationTrainer, GETATrainer(teacher_model=...)."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file

from geta_hf import DistillationTrainer, GETATrainer, GETATrainingArguments, distillation_loss
from test_trainer import geta_args, qa_rows, tiny_bert_qa

STUDENT = [[[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]],
           [[3.0, 1.0, 0.5], [-2.0, 0.0, 2.0]]]   # (2, 2, 3): 4 rows of 3 classes
TEACHER = [[[0.5, 0.5, -1.0], [1.0, 1.0, 1.0]],
           [[-1.0, 2.0, 0.0], [0.3, -0.7, 1.5]]]


def _hand_kd(student, teacher, T):
    """sum over rows and classes of p_t * (log p_t - log p_s), times T^2, over the row count."""
    def log_softmax(row):
        m = max(x / T for x in row)
        lse = m + math.log(sum(math.exp(x / T - m) for x in row))
        return [x / T - lse for x in row]

    rows = [(s, t) for bs, bt in zip(student, teacher) for s, t in zip(bs, bt)]
    total = 0.0
    for s, t in rows:
        ls, lt = log_softmax(s), log_softmax(t)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return total * T * T / len(rows)


# ---------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_loss_matches_hand_computation(T):
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    got = distillation_loss(s, t, T)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_hand_kd(STUDENT, TEACHER, T), rel=1e-5)
    # rows of a 2-D input are averaged the same way (batchmean over all leading dims)
    flat = distillation_loss(s.reshape(4, 3), t.reshape(4, 3), T)
    assert flat.item() == pytest.approx(got.item(), rel=1e-6)
    assert distillation_loss(s, s.clone(), T).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(s, t, T).item() > 1e-3


def test_loss_gradients_match_gradcheck_in_float64():
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: distillation_loss(a, b, 3.0), (s, t))
    assert distillation_loss(s, t, 3.0).dtype == torch.float64


def test_loss_is_finite_with_masked_and_huge_logits():
    inf = float("inf")
    s = torch.tensor([[0.0, -inf, 1.0, 1e30], [1.0, 2.0, -inf, -3e38]], requires_grad=True)
    t = torch.tensor([[1.0, -inf, 0.5, 2e30], [0.0, 1.0, -inf, -1e38]])
    loss = distillation_loss(s, t, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # masked classes (-inf in both) change nothing: same value as without those classes
    a = torch.tensor([[0.0, -inf, 1.0], [2.0, 0.5, -inf]])
    b = torch.tensor([[1.0, -inf, 0.5], [0.0, 1.0, -inf]])
    ref = _hand_kd([[[0.0, 1.0], [2.0, 0.5]]], [[[1.0, 0.5], [0.0, 1.0]]], 2.0)
    assert distillation_loss(a, b, 2.0).item() == pytest.approx(ref, rel=1e-5)


def test_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


# ---------------------------------------------------------------------------- the trainer
def _plain_args(tmp_path, **kw):
    return tf.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                disable_tqdm=True, **kw)


def _batch(n=4, seed=3):
    rows = qa_rows(n, seed=seed)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _hand_loss(student, teacher, batch, w, T):
    out = student(**batch)
    with torch.no_grad():
        ref = teacher(**batch)
    kd = [F.kl_div(F.log_softmax(out[k] / T, -1), F.log_softmax(ref[k] / T, -1), log_target=True,
                   reduction="batchmean") * T * T for k in ("start_logits", "end_logits")]
    return out.loss, (kd[0] + kd[1]) / 2


def test_trainer_loss_is_the_weighted_sum(tmp_path):
    student, teacher = tiny_bert_qa(dropout=0.0), tiny_bert_qa(dropout=0.0, seed=1).train()
    w, T = 0.3, 2.5
    trainer = DistillationTrainer(model=student, args=_plain_args(tmp_path), teacher_model=teacher,
                                  distillation_weight=w, distillation_temperature=T)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    batch = _batch()
    student.train()
    loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
    task, kd = _hand_loss(student, teacher, batch, w, T)
    assert kd.item() > 1e-4
    assert loss.item() == pytest.approx(((1 - w) * task + w * kd).item(), rel=1e-5)
    assert "start_logits" in outputs
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.qa_outputs.weight.grad is not None
    # when the Trainer will not divide the loss by GA steps, the KD term is divided instead
    ga = DistillationTrainer(model=student, args=_plain_args(tmp_path, gradient_accumulation_steps=2),
                             teacher_model=teacher, distillation_weight=w, distillation_temperature=T)
    ga.model_accepts_loss_kwargs = True
    scaled = ga.compute_loss(student, batch, num_items_in_batch=torch.tensor(8))
    assert scaled.item() == pytest.approx(((1 - w) * task + w * kd / 2).item(), rel=1e-5)
    ga.model_accepts_loss_kwargs = False
    assert ga.compute_loss(student, batch, num_items_in_batch=torch.tensor(8)).item() == \
        pytest.approx(loss.item(), rel=1e-6)
    # evaluation reports the task loss alone and skips the teacher
    calls = _count_calls(teacher)
    student.eval()
    with torch.no_grad():
        assert trainer.compute_loss(student, batch).item() == pytest.approx(task.item(), rel=1e-6)
    assert not calls


def test_without_teacher_or_with_weight_zero_nothing_changes(tmp_path, caplog):
    student, teacher = tiny_bert_qa(dropout=0.0), tiny_bert_qa(dropout=0.0, seed=1)
    batch = _batch()
    student.train()
    task = student(**batch).loss.item()
    plain = DistillationTrainer(model=student, args=_plain_args(tmp_path))
    assert plain.teacher_model is None and plain.distillation_weight == 0.5
    assert plain.compute_loss(student, batch).item() == pytest.approx(task, rel=1e-6)
    calls = _count_calls(teacher)
    with caplog.at_level(logging.WARNING, logger="geta_hf.hf.distill"):
        zero = DistillationTrainer(model=student, args=_plain_args(tmp_path), teacher_model=teacher,
                                   distillation_weight=0.0)
    assert "ignored" in caplog.text and zero.teacher_model is None
    assert zero.compute_loss(student, batch).item() == pytest.approx(task, rel=1e-6)
    assert not calls and not plain.distillation_metrics()


def test_geta_trainer_distils_while_compressing(tmp_path):
    student, teacher = tiny_bert_qa(), tiny_bert_qa(seed=1)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    args = geta_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=8, logging_steps=2, save_strategy="steps", save_steps=8,
                     geta_distillation_weight=0.6, geta_distillation_temperature=3.0)
    trainer = GETATrainer(model=student, args=args, train_dataset=qa_rows(32), teacher_model=teacher)
    assert (trainer.distillation_weight, trainer.distillation_temperature) == (0.6, 3.0)
    trainer.train()
    assert trainer.geta_optimizer.describe()["zero_units"] > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) >= 4  # every 2 steps, plus one at each GETA stage change
    for h in logs:
        assert h["distill/kd_loss"] > 0 and math.isfinite(h["distill/task_loss"])
        assert "geta/group_sparsity" in h  # GETATrainer.log and DistillationTrainer.log both ran
        assert h["loss"] == pytest.approx(0.4 * h["distill/task_loss"] + 0.6 * h["distill/kd_loss"],
                                          rel=1e-3)
    # the teacher: frozen, untouched, not optimized, not saved
    for n, p in teacher.named_parameters():
        assert not p.requires_grad and torch.equal(p, before[n]), n
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized and not optimized & {id(p) for p in teacher.parameters()}
    saved = load_file(str(tmp_path / "checkpoint-8" / "model.safetensors"))
    student_keys = set(trainer.model.state_dict())
    assert set(saved) <= student_keys and len(saved) >= len(student_keys) - 2  # tied weights at most


# ---------------------------------------------------------------------------- errors and flags
def test_bad_values_raise_naming_the_argument(tmp_path):
    args = _plain_args(tmp_path)
    teacher = tiny_bert_qa(seed=1)
    with pytest.raises(ValueError, match=r"distillation_weight: got 1.5; allowed: .*\[0, 1\]"):
        DistillationTrainer(model=tiny_bert_qa(), args=args, teacher_model=teacher, distillation_weight=1.5)
    with pytest.raises(ValueError, match=r"distillation_temperature: got 0.0; allowed: .*> 0"):
        DistillationTrainer(model=tiny_bert_qa(), args=args, teacher_model=teacher,
                            distillation_temperature=0)
    with pytest.raises(ValueError, match="distillation_temperature"):
        DistillationTrainer(model=tiny_bert_qa(), args=args, teacher_model=teacher,
                            distillation_temperature=float("nan"))
    with pytest.raises(ValueError, match="distillation_weight=0.5 needs a teacher_model"):
        DistillationTrainer(model=tiny_bert_qa(), args=args, distillation_weight=0.5)
    with pytest.raises(ValueError, match="distillation_weight=0.5 needs a teacher_model"):
        GETATrainer(model=tiny_bert_qa(), args=geta_args(tmp_path), train_dataset=qa_rows(8),
                    distillation_weight=0.5)
    model = tiny_bert_qa()
    with pytest.raises(ValueError, match="teacher_model is the model being trained"):
        DistillationTrainer(model=model, args=args, teacher_model=model)
    teacher.config.return_dict = False  # tuple outputs: no '*logits' key to distil
    trainer = DistillationTrainer(model=model, args=args, teacher_model=teacher)
    with pytest.raises(ValueError, match="share no '\\*logits'"):
        trainer.compute_loss(model.train(), _batch())


def test_training_arguments_flags():
    with pytest.raises(ValueError, match="--geta_distillation_temperature"):
        GETATrainingArguments(output_dir="x", geta_distillation_temperature=-1)
    with pytest.raises(ValueError, match="--geta_distillation_weight"):
        GETATrainingArguments(output_dir="x", geta_distillation_weight=1.5)
    parser = tf.HfArgumentParser(GETATrainingArguments)
    assert "--geta_distillation_weight" in parser.format_help()
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", "x", "--geta_distillation_weight", "0.7",
        "--geta_distillation_temperature", "4", "--use_cpu", "--report_to", "none"])
    assert (args.geta_distillation_weight, args.geta_distillation_temperature) == (0.7, 4.0)
    assert not hasattr(args.to_geta_config(), "distillation_weight")
    trainer = DistillationTrainer(model=tiny_bert_qa(), args=args, teacher_model=tiny_bert_qa(seed=1))
    assert (trainer.distillation_weight, trainer.distillation_temperature) == (0.7, 4.0)
