"""Knowledge distillation (Hinton logit KD) for the Hugging Face `Trainer`.

:func:`distillation_loss` is the temperature-scaled KL divergence between teacher and student
logits. :class:`DistillationTrainer` mixes it into the training loss,
``(1 - w) * task_loss + w * KD``, through the public ``compute_loss`` hook; `GETATrainer`
inherits it, so ``GETATrainer(..., teacher_model=teacher)`` distils while it compresses.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import Trainer

__all__ = ["DistillationTrainer", "distillation_loss", "check_distillation_weight",
           "check_distillation_temperature"]

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 2.0


# ---------------------------------------------------------------------------- validation
def _as_float(value: Any, name: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number ({allowed}); got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")
    return value


def check_distillation_weight(value: Any, name: str = "distillation_weight") -> float:
    """``value`` as a float if it is a finite number in [0, 1]; else a ValueError naming ``name``."""
    allowed = "a finite number in [0, 1]"
    value = _as_float(value, name, allowed)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")
    return value


def check_distillation_temperature(value: Any, name: str = "distillation_temperature") -> float:
    """``value`` as a float if it is a finite number > 0; else a ValueError naming ``name``."""
    allowed = "a finite number > 0"
    value = _as_float(value, name, allowed)
    if value <= 0.0:
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")
    return value


# ---------------------------------------------------------------------------- the loss
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Hinton's logit distillation loss: ``KL(softmax(t/T) || softmax(s/T)) * T**2``.

    The last dimension holds the classes; the KL divergence of each row (every index of the
    leading dimensions: batch, or batch x sequence) is averaged over the rows (``batchmean``).
    The ``T**2`` factor keeps the gradient scale independent of ``T``.

    Computed from ``log_softmax`` in at least float32, so very large logits are stable, and a
    class with teacher probability 0 (logit ``-inf``, e.g. a masked position) contributes 0
    rather than NaN. A student logit of ``-inf`` where the teacher's probability is positive
    gives ``+inf`` (the KL divergence is unbounded there). Gradients flow into both arguments;
    detach the teacher's logits (or compute them under ``torch.no_grad()``) to train the
    student only.

    Args:
        student_logits: tensor ``(..., C)``.
        teacher_logits: tensor of the same shape.
        temperature: ``T > 0``.

    Returns:
        A scalar tensor (dtype: the promotion of the inputs' dtypes and float32).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {tuple(student_logits.shape)} and "
                         f"teacher logits {tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() == 0:
        raise ValueError("distillation_loss: logits need a class dimension (got a scalar)")
    t = check_distillation_temperature(temperature, "distillation_loss: temperature")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                                torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
    # 0 * log 0 := 0; zero both logs there, or the product's gradient is NaN (0 * inf)
    support = log_p_t > float("-inf")
    zero = log_p_t.new_zeros(())
    log_p_t = torch.where(support, log_p_t, zero)
    log_p_s = torch.where(support, log_p_s, zero)
    p_t = torch.where(support, log_p_t.exp(), zero)
    kl = (p_t * (log_p_t - log_p_s)).sum()
    rows = max(1, student_logits.numel() // max(1, student_logits.shape[-1]))
    return kl / rows * (t * t)


# ---------------------------------------------------------------------------- the trainer
def _logit_keys(student_out: Any, teacher_out: Any) -> List[str]:
    """Output keys ending in ``logits`` that both outputs hold as tensors of equal shape."""
    if not isinstance(student_out, Mapping) or not isinstance(teacher_out, Mapping):
        return []
    return [k for k, v in student_out.items()
            if k.endswith("logits") and torch.is_tensor(v) and torch.is_tensor(teacher_out.get(k))
            and teacher_out[k].shape == v.shape]


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that adds logit knowledge distillation from a teacher model.

    The training loss is ``(1 - w) * task_loss + w * KD`` where ``task_loss`` is the model's own
    loss and ``KD`` is the mean of :func:`distillation_loss` over every output key ending in
    ``logits`` that student and teacher both return with the same shape (QA: ``start_logits``
    and ``end_logits``; classification and language modelling: ``logits``). For a causal LM
    with ``labels``, every position counts in the KD term (nothing is masked or shifted).

    The teacher sees the same inputs, in eval mode under ``torch.no_grad()``; its own loss (if
    it computes one from the labels) is discarded. It is moved once to the student's device,
    frozen (``requires_grad_(False)``), and is not part of ``trainer.model``: the optimizer never
    sees it and checkpoints never hold it. Evaluation (``model.eval()``) reports the task loss
    alone and skips the teacher. The KD term is a per-batch mean, scaled for gradient
    accumulation like the task loss (see ``Trainer.loss_is_scaled_for_ga``). Training logs get
    ``distill/kd_loss`` and ``distill/task_loss``: their means over the micro-batches since the
    previous log. Without a teacher this is a plain `Trainer` (no extra forward pass).

    Args:
        teacher_model: the teacher (any module whose outputs share ``*logits`` keys with the
            student's), or None.
        distillation_weight: ``w`` in [0, 1]; default ``args.geta_distillation_weight`` if the
            arguments have it, else 0.5. A teacher with ``w = 0`` is ignored (with a warning);
            an explicit ``w > 0`` without a teacher is an error.
        distillation_temperature: ``T > 0``; default ``args.geta_distillation_temperature`` if
            the arguments have it, else 2.0.
        Everything else as for `transformers.Trainer`.
    """

    def __init__(self, model=None, args=None, *a, teacher_model: Optional[torch.nn.Module] = None,
                 distillation_weight: Optional[float] = None,
                 distillation_temperature: Optional[float] = None, **kwargs) -> None:
        weight, temperature = self._resolve_distillation(args, teacher_model, distillation_weight,
                                                         distillation_temperature)
        if teacher_model is not None and teacher_model is model:
            raise ValueError("DistillationTrainer: teacher_model is the model being trained; pass "
                             "a separate (e.g. copied and fine-tuned) teacher")
        if teacher_model is not None and weight == 0.0:
            logger.warning("DistillationTrainer: distillation_weight is 0, the teacher model is "
                           "ignored")
            teacher_model = None
        self.distillation_weight = weight
        self.distillation_temperature = temperature
        self.teacher_model = self._freeze(teacher_model)
        self._teacher_placed = False
        self._distill_sums: Dict[str, torch.Tensor] = {}
        self._distill_count = 0
        super().__init__(model, args, *a, **kwargs)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_distillation(args, teacher, weight, temperature) -> Tuple[float, float]:
        """Validated (weight, temperature): explicit values, else the arguments', else defaults."""
        if weight is None:
            weight = check_distillation_weight(
                getattr(args, "geta_distillation_weight", DEFAULT_WEIGHT),
                "DistillationTrainer: args.geta_distillation_weight")
        else:
            weight = check_distillation_weight(weight, "DistillationTrainer: distillation_weight")
            if weight > 0 and teacher is None:
                raise ValueError(f"DistillationTrainer: distillation_weight={weight} needs a "
                                 "teacher_model (pass teacher_model=..., or omit the weight)")
        if temperature is None:
            temperature = check_distillation_temperature(
                getattr(args, "geta_distillation_temperature", DEFAULT_TEMPERATURE),
                "DistillationTrainer: args.geta_distillation_temperature")
        else:
            temperature = check_distillation_temperature(
                temperature, "DistillationTrainer: distillation_temperature")
        return weight, temperature

    @staticmethod
    def _freeze(teacher: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
        if teacher is None:
            return None
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError("DistillationTrainer: teacher_model must be a torch.nn.Module, got "
                            f"{type(teacher).__name__}")
        teacher.requires_grad_(False)
        return teacher.eval()

    def _place_teacher(self, model) -> None:
        """Move the teacher to the student's device, once (a device-mapped teacher stays put)."""
        self._teacher_placed = True
        if len(set((getattr(self.teacher_model, "hf_device_map", None) or {}).values())) > 1:
            return
        param = next(model.parameters(), None)
        self.teacher_model.to(param.device if param is not None else self.args.device)

    # ------------------------------------------------------------------ loss
    def _teacher_outputs(self, model, inputs: Mapping[str, Any]):
        if not self._teacher_placed:
            self._place_teacher(model)
        teacher = self.teacher_model
        if teacher.training:
            teacher.eval()
        with torch.no_grad():
            return teacher(**inputs)

    def _kd_term(self, student_out, teacher_out) -> torch.Tensor:
        keys = _logit_keys(student_out, teacher_out)
        if not keys:
            found = (list(student_out.keys()) if isinstance(student_out, Mapping)
                     else type(student_out).__name__)
            raise ValueError("DistillationTrainer: student and teacher outputs share no '*logits' "
                             f"tensor of equal shape (student output: {found}); both models must "
                             "return dict-like outputs (return_dict=True)")
        terms = [distillation_loss(student_out[k], teacher_out[k], self.distillation_temperature)
                 for k in keys]
        return torch.stack(terms).mean()

    def _kd_scale(self, num_items_in_batch) -> float:
        """1, or 1/GA when the Trainer will not divide the (already GA-normalised) task loss."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        if not scaled:
            return 1.0
        ga = getattr(self, "current_gradient_accumulation_steps", None)
        return 1.0 / float(ga or self.args.gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None,
                     **kwargs):
        """``(1 - w) * task_loss + w * KD`` while training with a teacher; else `Trainer`'s loss."""
        if self.teacher_model is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        teacher_out = self._teacher_outputs(model, inputs)  # before super() may pop "labels"
        task_loss, outputs = super().compute_loss(model, dict(inputs), return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch, **kwargs)
        kd = self._kd_term(outputs, teacher_out)
        w = self.distillation_weight
        loss = (1.0 - w) * task_loss + w * self._kd_scale(num_items_in_batch) * kd
        self._record(task_loss, kd)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record(self, task_loss: torch.Tensor, kd: torch.Tensor) -> None:
        for key, value in (("distill/kd_loss", kd), ("distill/task_loss", task_loss)):
            value = value.detach().float()
            self._distill_sums[key] = self._distill_sums.get(key, 0.0) + value
        self._distill_count += 1

    def distillation_metrics(self) -> Dict[str, float]:
        """Mean KD and task loss over the training micro-batches since the last call, then reset."""
        if not self._distill_count:
            return {}
        out = {k: float(v) / self._distill_count for k, v in self._distill_sums.items()}
        self._distill_sums, self._distill_count = {}, 0
        return out

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """`Trainer.log`, adding ``distill/kd_loss`` and ``distill/task_loss`` to training logs."""
        if "loss" in logs:
            logs = {**logs, **self.distillation_metrics()}
        super().log(logs, *args, **kwargs)
